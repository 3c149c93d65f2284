"""sia_cli.text: how messages name a list of things."""

from sia_cli.text import first_few


def test_first_few_names_the_first_and_counts_the_rest():
    assert first_few(["a", "b", "c", "d"], 2) == "a, b and 2 more"
    assert first_few(iter(["a", "b"]), 2) == "a, b"
    assert first_few(["x (bad)", "y (bad)"], 1, "; ") == "x (bad) and 1 more"
    assert first_few([], 3) == ""
