import math

import numpy as np
import pytest

from sia_cli.errors import SiaError
from sia_cli.measures import sensitivity as S

ATTRS = ["Bangs", "Eyeglasses", "Smiling", "Pale_Skin"]


def make_records(count, seed=0, k=len(ATTRS)):
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        start = rng.uniform(0, 1, k)
        end = np.clip(start + rng.normal(0, 0.2, k), 0, 1)
        records.append({
            "file": f"{i}.png", "attrs_start": start.tolist(), "attrs_end": end.tolist(),
            "label": 1, "pred_clean": 0.9, "pred_adv": 0.1, "success": True,
            "ablation": rng.uniform(0, 1, k).tolist(),
            "single_effect": rng.uniform(0, 1, k).tolist(),
            "flip": rng.uniform(0, 1, k).tolist(),
            "single_flip": (rng.uniform(0, 1, k) > 0.5).tolist(),
        })
    return records


def test_attribute_shift_equals_direct_numpy():
    records = make_records(7)
    start = np.array([r["attrs_start"] for r in records])
    end = np.array([r["attrs_end"] for r in records])
    expected = np.abs(end - start).mean(axis=0)
    shift = S.attribute_shift(records, ATTRS)
    assert list(shift) == ATTRS
    np.testing.assert_allclose([shift[a] for a in ATTRS], expected)


def test_hand_built_values():
    records = [
        {"attrs_start": [0.0, 0.5], "attrs_end": [1.0, 0.5], "ablation": [0.2, 0.0], "single_flip": [True, False]},
        {"attrs_start": [0.5, 0.5], "attrs_end": [0.0, 0.75], "ablation": [0.4, 0.1], "single_flip": [False, False]},
    ]
    assert S.attribute_shift(records, ["a", "b"]) == pytest.approx({"a": 0.75, "b": 0.125})
    assert S.ablation_effect(records, ["a", "b"]) == pytest.approx({"a": 0.3, "b": 0.05})
    assert S.flip_rate(records, ["a", "b"]) == pytest.approx({"a": 0.5, "b": 0.0})


def test_other_measures_are_means_of_their_fields():
    records = make_records(5, seed=3)
    for measure, key in [(S.ablation_effect, "ablation"), (S.single_effect, "single_effect"),
                         (S.flip_rate, "single_flip"), (S.flip_effect, "flip")]:
        expected = np.array([r[key] for r in records], dtype=float).mean(axis=0)
        np.testing.assert_allclose(list(measure(records, ATTRS).values()), expected)


def test_protected_attribute_left_out_of_everything():
    records = make_records(10)
    shift = S.attribute_shift(records, ATTRS, protected=["Eyeglasses"])
    assert "Eyeglasses" not in shift
    assert "Eyeglasses" not in S.normalize(shift)
    assert "Eyeglasses" not in S.ablation_effect(records, ATTRS, protected=["Eyeglasses"])
    full = S.attribute_shift(records, ATTRS)
    without = [v for a, v in full.items() if a != "Eyeglasses"]
    assert S.sdar(shift) == pytest.approx(np.std(without))
    assert S.sdar(shift) != pytest.approx(S.sdar(full))


def test_unknown_protected_attribute_is_an_error():
    with pytest.raises(SiaError, match="Eyglasses"):
        S.attribute_shift(make_records(2), ATTRS, protected=["Eyglasses"])


def test_sdar_is_population_std_of_raw_values():
    values = {"a": 0.1, "b": 0.4, "c": 0.25}
    assert S.sdar(values) == pytest.approx(np.std([0.1, 0.4, 0.25]))
    assert S.sdar(values) != pytest.approx(np.std([0.1, 0.4, 0.25], ddof=1))
    with pytest.raises(SiaError):
        S.sdar({})


def test_normalize():
    shares = S.normalize({"a": 1.0, "b": 3.0})
    assert shares == pytest.approx({"a": 0.25, "b": 0.75})
    assert sum(S.normalize(S.attribute_shift(make_records(6), ATTRS)).values()) == pytest.approx(1.0)
    assert S.normalize({"a": 0.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}


def test_error_records_excluded():
    records = make_records(4)
    broken = {"file": "bad.png", "error": "NaN loss", "attrs_start": [0.0] * 4, "attrs_end": [1.0] * 4,
              "ablation": [9.0] * 4}
    assert S.attribute_shift(records + [broken], ATTRS) == S.attribute_shift(records, ATTRS)
    assert S.ablation_effect(records + [broken], ATTRS) == S.ablation_effect(records, ATTRS)
    # A failed record without any of the measure fields must not break the computation either.
    assert S.attribute_shift(records + [{"file": "x.png", "error": "corrupt"}], ATTRS) == S.attribute_shift(records, ATTRS)


def test_empty_or_all_failed_input_is_an_error():
    for records in ([], [{"file": "a.png", "error": "NaN loss"}]):
        for measure in (S.attribute_shift, S.ablation_effect, S.single_effect, S.flip_rate):
            with pytest.raises(SiaError):
                measure(records, ATTRS)


def test_missing_measure_field_is_a_clear_error():
    records = [{"attrs_start": [0.0] * 4, "attrs_end": [0.5] * 4}]
    with pytest.raises(SiaError, match="ablation"):
        S.ablation_effect(records, ATTRS)


def test_wrong_vector_length_is_an_error():
    with pytest.raises(SiaError, match="4 values"):
        S.attribute_shift([{"attrs_start": [0.0] * 3, "attrs_end": [0.0] * 3}], ATTRS)
    ragged = [{"attrs_start": [0.0] * 4, "attrs_end": [0.0] * 4}, {"attrs_start": [0.0] * 3, "attrs_end": [0.0] * 3}]
    with pytest.raises(SiaError, match="4 numbers"):
        S.attribute_shift(ragged, ATTRS)


def test_ranking_order_and_ties():
    assert S.ranking({"b": 0.2, "a": 0.2, "c": 0.5, "d": 0.1}) == ["c", "a", "b", "d"]
    assert S.ranking({}) == []


def shift_of_bangs(records):
    return S.attribute_shift(records, ATTRS)["Bangs"]


def test_bootstrap_deterministic_for_a_seed():
    records = make_records(30)
    statistic = lambda r: S.attribute_shift(r, ATTRS)  # noqa: E731
    assert S.bootstrap(records, statistic, n=50, seed=4) == S.bootstrap(records, statistic, n=50, seed=4)
    assert S.bootstrap(records, statistic, n=50, seed=4) != S.bootstrap(records, statistic, n=50, seed=5)


def test_bootstrap_interval_contains_point_estimate_for_dict_and_float():
    records = make_records(100)
    per_attribute = S.bootstrap(records, lambda r: S.attribute_shift(r, ATTRS), n=200)
    point = S.attribute_shift(records, ATTRS)
    assert set(per_attribute) == set(ATTRS)
    for name, interval in per_attribute.items():
        assert interval["low"] < point[name] < interval["high"]
    sdar_interval = S.bootstrap(records, lambda r: S.sdar(S.attribute_shift(r, ATTRS)), n=200)
    assert set(sdar_interval) == {"low", "high"}
    assert sdar_interval["low"] <= S.sdar(point) <= sdar_interval["high"]


def test_bootstrap_narrows_with_more_images():
    small = S.bootstrap(make_records(20, seed=1), shift_of_bangs, n=200)
    large = S.bootstrap(make_records(2000, seed=1), shift_of_bangs, n=200)
    width = lambda i: i["high"] - i["low"]  # noqa: E731
    assert width(large) < width(small) / 4  # sqrt(100) = 10 in theory


def test_bootstrap_fast_path_matches_a_plain_python_statistic():
    records = make_records(40, seed=2)

    def plain_mean_shift(sample):  # touches only the dicts, never the cached arrays
        sample = list(sample)
        return sum(abs(r["attrs_end"][0] - r["attrs_start"][0]) for r in sample) / len(sample)

    plain = S.bootstrap(records, plain_mean_shift, n=100, seed=7)
    fast = S.bootstrap(records, shift_of_bangs, n=100, seed=7)
    assert fast == pytest.approx(plain)


def test_bootstrap_level_controls_width():
    records = make_records(50)
    narrow = S.bootstrap(records, shift_of_bangs, n=300, level=0.5)
    wide = S.bootstrap(records, shift_of_bangs, n=300, level=0.99)
    assert wide["low"] < narrow["low"] < narrow["high"] < wide["high"]


def test_bootstrap_resamples_only_usable_records():
    records = make_records(10) + [{"file": "bad.png", "error": "NaN loss"}]
    sizes = []
    S.bootstrap(records, lambda r: sizes.append(len(r)) or 0.0, n=5)
    # the estimate and 5 resamples on the 10 usable records, then 10 leave-one-out (BCa's jackknife)
    assert sizes == [10] * 6 + [9] * 10
    with pytest.raises(SiaError):
        S.bootstrap([{"error": "x"}], shift_of_bangs)


def test_group_split():
    records = [{"file": str(i), "attrs_start": [v, 0.2]} for i, v in enumerate([0.9, 0.1, 0.5, 0.49])]
    groups = S.group_split(records, ["Male", "Young"], "Male")
    assert [r["file"] for r in groups["Male=1"]] == ["0", "2"]
    assert [r["file"] for r in groups["Male=0"]] == ["1", "3"]
    assert S.group_split(records, ["Male", "Young"], "Young")["Young=1"] == []
    assert len(S.group_split(records, ["Male", "Young"], "Male", threshold=0.95)["Male=0"]) == 4
    with pytest.raises(SiaError, match="Bald"):
        S.group_split(records, ["Male", "Young"], "Bald")


def test_group_split_gives_sub_population_sensitivity():
    records = make_records(40)
    groups = S.group_split(records, ATTRS, "Smiling")
    assert len(groups["Smiling=1"]) + len(groups["Smiling=0"]) == 40
    for members in groups.values():
        assert S.attribute_shift(members, ATTRS).keys() == set(ATTRS)


def test_compare():
    rows = S.compare({"a": 0.5, "b": 0.5}, {"b": 0.2, "a": 0.6, "c": 0.2})
    assert [r[0] for r in rows] == ["a", "b", "c"]
    assert rows[0] == pytest.approx(("a", 0.5, 0.6, 0.1))
    assert rows[1] == pytest.approx(("b", 0.5, 0.2, -0.3))
    assert math.isnan(rows[2][1]) and rows[2][2] == 0.2 and math.isnan(rows[2][3])


def test_bca_interval_contains_the_estimate_where_percentiles_do_not():
    """SDAR is a spread of means: resampling inflates it, so the percentile interval of a
    small population can miss the estimate (the README's old 0.0055 [0.0065, 0.0146])."""
    rng = np.random.default_rng(3)
    names = [f"a{k}" for k in range(40)]  # no real differences: the spread is all sampling noise
    records = [{"file": str(i), "attrs_start": [0.0] * 40, "attrs_end": list(rng.random(40) * 0.05)}
               for i in range(12)]

    def statistic(r):
        return S.sdar(S.attribute_shift(r, names))

    estimate = statistic(records)
    samples = np.array([statistic([records[j] for j in row]) for row in S._resample_indices(12, 400, 0)])
    percentile_low, percentile_high = np.percentile(samples, [2.5, 97.5])
    assert percentile_low > estimate  # the plain percentile interval misses it here ...
    interval = S.bootstrap(records, statistic, n=400)
    assert interval["low"] <= estimate <= interval["high"]  # ... the bias-corrected one does not
    assert interval["low"] < percentile_low
    # and it keeps the resamples' spread rather than shrinking to a sliver at their edge
    assert interval["high"] - interval["low"] >= 0.9 * (percentile_high - percentile_low)


def test_bca_interval_matches_the_normal_theory_interval_of_a_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 400)
    records = [{"file": str(i), "attrs_start": [0.0], "attrs_end": [v]} for i, v in enumerate(values)]
    interval = S.bootstrap(records, lambda r: S.attribute_shift(r, ["x"])["x"], n=2000)
    shifts = np.abs(values)
    half_width = 1.96 * shifts.std() / np.sqrt(len(shifts))
    assert interval["low"] == pytest.approx(shifts.mean() - half_width, abs=0.3 * half_width)
    assert interval["high"] == pytest.approx(shifts.mean() + half_width, abs=0.3 * half_width)


def test_stands_out_needs_the_top_interval_to_clear_the_runner_up():
    values = {"a": 0.5, "b": 0.3, "c": 0.1}
    assert S.stands_out(values, {"a": {"low": 0.4, "high": 0.6}, "b": {"low": 0.2, "high": 0.39}}) == "a"
    assert S.stands_out(values, {"a": {"low": 0.25, "high": 0.6}, "b": {"low": 0.2, "high": 0.39}}) is None
    assert S.stands_out(values, None) is None  # no intervals: nothing can be said to stand out
    assert S.stands_out(values, {"a": {"low": float("nan"), "high": 0.6}, "b": {"low": 0.2, "high": 0.3}}) is None


def test_paired_difference_finds_a_real_change_and_not_noise():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]

    def records(scale):
        return [{"file": f"{i}.png", "attrs_start": [0.0] * 3, "attrs_end": list(rng.random(3) * scale)}
                for i in range(40)]

    def statistic(r):
        return S.sdar(S.attribute_shift(r, names))

    base = records([0.1, 0.1, 0.1])
    biased = [{**r, "attrs_end": [r["attrs_end"][0] * 8, *r["attrs_end"][1:]]} for r in base]
    change = S.paired_difference(base, biased, statistic, n=500)
    assert change["significant"] and change["low"] > 0 and change["images"] == 40
    same = S.paired_difference(base, [dict(r) for r in base], statistic, n=500)
    assert same["difference"] == 0 and not same["significant"]
    with pytest.raises(SiaError, match="same images"):
        S.paired_difference(base, [{**r, "file": "other" + r["file"]} for r in base], statistic)


def test_nothing_stands_out_from_too_few_images_or_a_zero_width_interval():
    values = {"a": 0.9, "b": 0.1}
    apart = {"a": {"low": 0.8, "high": 1.0}, "b": {"low": 0.0, "high": 0.2}}
    assert S.stands_out(values, apart, counted=S.MIN_COUNTED_IMAGES) == "a"
    assert S.stands_out(values, apart, counted=S.MIN_COUNTED_IMAGES - 1) is None
    assert S.stands_out(values, {"a": {"low": 0.9, "high": 0.9}, "b": {"low": 0.1, "high": 0.1}}, counted=50) is None


def _floored(count, largest, others, reconstruction, seed):
    """Records whose per-image flip effects (the first attribute around `largest`, the rest
    around `others`) and reconstruction effects are drawn around the given means (noise 0.2 of each)."""
    rng = np.random.default_rng(seed)
    records = make_records(count, seed=seed)
    for r in records:
        means = np.array([largest] + [others] * (len(ATTRS) - 1))
        r["flip"] = (means * rng.uniform(0.8, 1.2, len(ATTRS))).tolist()
        r["reconstruction_effect"] = float(reconstruction * rng.uniform(0.8, 1.2))
    return records


def test_excess_over_floor_is_the_largest_less_the_reconstructions_effect():
    records = _floored(20, 0.4, 0.05, 0.1, seed=3)
    excess = S.excess_over_floor(lambda r: S.flip_effect(r, ATTRS))(records)
    largest = max(S.flip_effect(records, ATTRS).values())
    assert excess == pytest.approx(largest - S.reconstruction_floor(records))
    # No floor recorded: nothing to compare with.
    bare = [{k: v for k, v in r.items() if k != "reconstruction_effect"} for r in records]
    assert math.isnan(S.excess_over_floor(lambda r: S.flip_effect(r, ATTRS))(bare))


@pytest.mark.parametrize("largest, others, reconstruction, moves", [
    (0.4, 0.01, 0.1, True), (0.1001, 0.01, 0.1, False), (0.05, 0.01, 0.1, False),
    # Every edit redraws a little: together they pass the floor, but none moves the model more
    # than redrawing the face does (the background model of tests/test_diagnosis.py).
    (0.08, 0.06, 0.1, False)])
def test_a_model_moves_only_when_its_largest_edit_clears_the_floor_beyond_chance(largest, others, reconstruction, moves):
    records = _floored(30, largest, others, reconstruction, seed=4)
    values = S.flip_effect(records, ATTRS)
    floor = S.reconstruction_floor(records)
    assert sum(values.values()) > floor or others < 0.05
    excess = S.bootstrap(records, S.excess_over_floor(lambda r: S.flip_effect(r, ATTRS)), n=200)
    found = S.effect_size(values, floor, excess)
    assert found["moves"] is moves, (found, excess)
    assert found["excess_interval"] == excess
    # Without an interval the point values decide.
    assert S.effect_size(values, floor)["moves"] is (max(values.values()) > floor)
    assert S.effect_size(values, None, excess)["moves"] is None
