"""The table of measures (sia_cli.measures.table) against what diagnosis writes and the readers read."""

import numpy as np
import pytest

from sia_cli.errors import SiaError
from sia_cli.jobs.diagnose import DiagnoseConfig, diagnose, measures
from sia_cli.measures import table as M

ATTRS = ["a", "b", "c"]
PROTECTED = ["c"]
# Two images worked by hand; column c is protected, so its (large) numbers must never show.
RECORDS = [
    {"attrs_start": [0.0, 0.5, 0.0], "attrs_end": [1.0, 0.5, 0.9], "ablation": [0.2, 0.0, 9.0],
     "flip": [0.5, 0.1, 9.0], "single_effect": [0.1, 0.6, 9.0], "single_flip": [True, False, True]},
    {"attrs_start": [0.5, 0.5, 0.0], "attrs_end": [0.0, 0.75, 0.9], "ablation": [0.4, 0.1, 9.0],
     "flip": [0.3, 0.0, 9.0], "single_effect": [0.3, 0.2, 9.0], "single_flip": [False, False, True]},
]
EXPECTED = {  # report key -> per-attribute mean over the two records above
    "sensitivity": {"a": 0.75, "b": 0.125},  # |end - start|
    "sensitivity_ablation": {"a": 0.3, "b": 0.05},
    "sensitivity_flip": {"a": 0.4, "b": 0.05},
    "sensitivity_single": {"a": 0.2, "b": 0.4},
}


def config(tmp_path, **changes) -> DiagnoseConfig:
    return DiagnoseConfig(model=tmp_path / "absent.pt", images=tmp_path, out=tmp_path / "out", **changes)


def test_each_measure_computes_its_report_values_from_records():
    assert {measure.key for measure in M.TABLE} == set(EXPECTED)
    for measure in M.TABLE:
        assert measure.function(RECORDS, ATTRS, PROTECTED) == pytest.approx(EXPECTED[measure.key]), measure.name


def test_names_keys_and_titles_are_unique_and_name_their_measure():
    for field in ("name", "key", "title", "label"):
        values = [getattr(measure, field) for measure in M.TABLE]
        assert len(set(values)) == len(values), field
    for measure in M.TABLE:
        assert M.by_name(measure.name) is measure
        assert M.report_key(measure.name) == measure.key
        assert measure.normalized_key == measure.key + "_normalized"


@pytest.mark.parametrize("mode", M.MODES)
def test_diagnosis_writes_exactly_the_table_measures_of_each_mode(mode):
    found = measures(RECORDS, ATTRS, PROTECTED, mode)
    raw = {key for key in found if not key.endswith("_normalized")} - {"sdar", "flip_rate"}
    assert raw == {measure.key for measure in M.for_mode(mode)}
    assert set(found) - raw - {"sdar", "flip_rate"} == {measure.normalized_key for measure in M.for_mode(mode)}
    for measure in M.for_mode(mode):
        assert found[measure.key] == pytest.approx(EXPECTED[measure.key])
        assert sum(found[measure.normalized_key].values()) == pytest.approx(1.0)
    # SDAR stays the paper's: the spread of Eq. 2, whichever measure is the headline.
    assert found["sdar"] == pytest.approx(np.std(list(EXPECTED["sensitivity"].values())))


def test_the_report_keys_the_readme_documents_per_mode():
    assert [measure.key for measure in M.for_mode("multi")] == ["sensitivity", "sensitivity_flip",
                                                              "sensitivity_ablation"]
    assert [measure.key for measure in M.for_mode("single")] == ["sensitivity", "sensitivity_flip",
                                                               "sensitivity_single"]


@pytest.mark.parametrize("mode", M.MODES)
def test_every_mode_has_exactly_one_default_headline_that_it_computes(mode):
    defaults = [measure for measure in M.TABLE if measure.default and measure.ranks_in == mode]
    assert len(defaults) == 1
    assert M.default_headline(mode) == defaults[0].name
    assert defaults[0] in M.for_mode(mode) and M.may_rank(defaults[0].name, mode)
    assert M.headline_for(mode) == M.headline_for(mode, "") == defaults[0].name


def test_every_measure_ranks_only_in_a_mode_that_computes_it():
    for measure in M.TABLE:
        assert measure.ranks_in in measure.modes and set(measure.modes) <= set(M.MODES), measure.name


def test_the_headlines_each_mode_accepts_are_unchanged():
    accepted = {(name, mode) for name in [m.name for m in M.TABLE] + ["bogus", ""] for mode in M.MODES
                if M.may_rank(name, mode)}
    assert accepted == {("attribute_shift", "multi"), ("flip", "multi"), ("ablation", "multi"),
                        ("single", "single")}


def test_chosen_headline_is_the_choice_or_the_modes_default(tmp_path):
    assert config(tmp_path).chosen_headline() == "flip"
    assert config(tmp_path, mode="single").chosen_headline() == "single"
    assert config(tmp_path, headline="attribute_shift").chosen_headline() == "attribute_shift"
    assert config(tmp_path, mode="single", headline="").chosen_headline() == "single"


@pytest.mark.parametrize("mode, headline", [("multi", "single"), ("single", "attribute_shift"),
                                            ("single", "ablation"), ("single", "flip"),
                                            ("multi", "bogus")])
def test_diagnose_refuses_a_headline_that_does_not_fit_its_mode(tmp_path, mode, headline):
    with pytest.raises(SiaError, match=f"headline measure '{headline}' does not fit --mode {mode}"):
        diagnose(config(tmp_path, mode=mode, headline=headline))


def test_an_unknown_or_absent_headline_reads_as_eq2():
    assert M.report_key("bogus") == M.report_key(None) == "sensitivity"
    with pytest.raises(SiaError, match="unknown measure 'bogus'"):
        M.by_name("bogus")
    with pytest.raises(SiaError, match="no measure is the default headline"):
        M.default_headline("bogus")


def test_readers_show_eq2_for_an_unknown_headline():
    from rich.console import Console

    from sia_cli.cli.sdar import change_table
    from sia_cli.reports.html import headline_sentence

    report = {"settings": {"headline": "bogus"}, "sdar": 0.1, "stands_out": "b",
              "sensitivity_normalized": {"a": 0.25, "b": 0.75}, "sensitivity_ablation_normalized": {"a": 0.9, "b": 0.1}}
    assert headline_sentence(report).startswith("The model is most sensitive to b: 0.75 of total (bogus;")
    table = change_table(report, report)
    assert table.title.startswith("sensitivity share: baseline -> this report")
    console = Console(record=True, width=200)
    console.print(table)
    shown = console.export_text()
    assert "0.750" in shown and "0.900" not in shown  # Eq. 2's shares, not the ablation's
