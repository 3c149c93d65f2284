"""Per-attribute sensitivity measures computed from per-image attack records.

Every function here is pure: it reads record dicts (see the README's report
schema) and returns plain Python values, so the same code serves a live run,
a report read back from disk and a gather across distributed ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm

from sia_cli.errors import SiaError

Record = dict
Records = Sequence[Record]
Names = Sequence[str]
Statistic = Callable[[Sequence[Record]], "dict[str, float] | float"]


class _UsableTable(Sequence):
    """Usable records plus their numeric fields cached as (images, K) arrays.

    Bootstrap resamples are index gathers on this table, so a statistic built
    from the functions here costs numpy work per resample instead of
    rebuilding arrays from thousands of dicts. It is still a sequence of the
    original record dicts, so any other statistic works unchanged.
    """

    def __init__(self, records: np.ndarray, columns: dict[str, np.ndarray] | None = None):
        self._records = records  # object array of dicts, none with an error
        self._columns = columns if columns is not None else {}

    @classmethod
    def of(cls, records: list[Record]) -> "_UsableTable":
        array = np.empty(len(records), dtype=object)
        array[:] = records
        return cls(array)

    def column(self, key: str) -> np.ndarray:
        if key not in self._columns:
            self._columns[key] = np.array([r[key] for r in self._records], dtype=float)
        return self._columns[key]

    def take(self, indices: np.ndarray) -> "_UsableTable":
        return _UsableTable(self._records[indices], {k: v[indices] for k, v in self._columns.items()})

    def __getitem__(self, index):
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)


def usable_records(records: Sequence[Record]) -> Sequence[Record]:
    """Records that can enter a sensitivity: those without an `error`."""
    usable = records if isinstance(records, _UsableTable) else [r for r in records if not r.get("error")]
    if not usable:
        raise SiaError("no usable image records: every image was skipped or failed")
    return usable


def _kept_columns(attributes: Sequence[str], protected: Sequence[str]) -> list[int]:
    unknown = sorted(set(protected) - set(attributes))
    if unknown:
        raise SiaError(f"protected attribute(s) not among the backbone's attributes: {', '.join(unknown)}")
    return [k for k, name in enumerate(attributes) if name not in protected]


def _per_image_matrix(records: Sequence[Record], key: str, width: int) -> np.ndarray:
    """(images, K) array of record[key]; a clear error when the engine did not fill it."""
    try:
        if isinstance(records, _UsableTable):
            matrix = records.column(key)
        else:
            matrix = np.array([r[key] for r in records], dtype=float)
    except KeyError:
        raise SiaError(f"image records have no '{key}' values (was this measure computed?)") from None
    except (TypeError, ValueError):
        raise SiaError(f"'{key}' should hold {width} numbers per image in every record") from None
    if matrix.ndim != 2 or matrix.shape[1] != width:
        raise SiaError(f"'{key}' should hold {width} values per image, got shape {matrix.shape}")
    return matrix


def _mean_by_attribute(matrix: np.ndarray, attributes: Sequence[str], protected: Sequence[str]) -> dict[str, float]:
    means = matrix.mean(axis=0)
    return {attributes[k]: float(means[k]) for k in _kept_columns(attributes, protected)}


def mean_of_measured(records: Records, key: str, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Per attribute, the mean of record[key] over the images where it was measured (a record
    holds None, read as NaN, where it was not); NaN for an attribute measured on no image."""
    usable = usable_records(records)
    matrix = _per_image_matrix(usable, key, len(attributes))
    measured = np.isfinite(matrix)
    sums, counts = np.where(measured, matrix, 0.0).sum(axis=0), measured.sum(axis=0)
    means = np.divide(sums, counts, out=np.full(len(attributes), np.nan), where=counts > 0)
    return {attributes[k]: float(means[k]) for k in _kept_columns(attributes, protected)}


def count_measured(records: Records, key: str, attributes: Names, protected: Names = ()) -> dict[str, int]:
    """Per attribute, on how many images record[key] was measured (not None/NaN)."""
    matrix = _per_image_matrix(usable_records(records), key, len(attributes))
    counts = np.isfinite(matrix).sum(axis=0)
    return {attributes[k]: int(counts[k]) for k in _kept_columns(attributes, protected)}


def attribute_shift(records: Records, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Paper Eq. 2 measured from the start: s_k = mean_p |a_T[k] - a0[k]|."""
    usable = usable_records(records)
    start = _per_image_matrix(usable, "attrs_start", len(attributes))
    end = _per_image_matrix(usable, "attrs_end", len(attributes))
    return _mean_by_attribute(np.abs(end - start), attributes, protected)


def ablation_effect(records: Records, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Counterfactual ablation: d_k = mean_p |p(G(x_T, a_T)) - p(G(x_T, a_T with a_k reset))|."""
    usable = usable_records(records)
    return _mean_by_attribute(_per_image_matrix(usable, "ablation", len(attributes)), attributes, protected)


def flip_effect(records: Records, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Counterfactual flip through the backbone, no attack: c_k = mean_p distance(f(G(x0, a0)),
    f(G(x0, a0 with a_k flipped))). The renderer's true effect, with the backbone drawing the flip."""
    usable = usable_records(records)
    return _mean_by_attribute(_per_image_matrix(usable, "flip", len(attributes)), attributes, protected)


def single_effect(records: Records, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Single-attribute mode (thesis Eq. 3.11): h_k = mean_p |f(x) - f(x_hat_k)|."""
    usable = usable_records(records)
    return _mean_by_attribute(_per_image_matrix(usable, "single_effect", len(attributes)), attributes, protected)


def flip_rate(records: Records, attributes: Names, protected: Names = ()) -> dict[str, float]:
    """Share of images whose prediction flipped when only attribute k was optimised."""
    usable = usable_records(records)
    return _mean_by_attribute(_per_image_matrix(usable, "single_flip", len(attributes)), attributes, protected)


def normalize(values: dict[str, float]) -> dict[str, float]:
    """Share of the total per attribute (the histogram users see); all zeros stays zeros."""
    total = float(sum(values.values()))
    if total == 0.0:
        return {name: 0.0 for name in values}
    return {name: float(v) / total for name, v in values.items()}


def sdar(values: dict[str, float]) -> float:
    """Standard deviation of attribute robustness: population std (1/L) of the raw values."""
    if not values:
        raise SiaError("SDAR needs at least one attribute (are all of them protected?)")
    return float(np.std(np.fromiter(values.values(), dtype=float)))


def ranking(values: dict[str, float]) -> list[str]:
    """Attribute names, most sensitive first; equal values in name order so runs are repeatable."""
    return sorted(values, key=lambda name: (-values[name], name))


def _resample_indices(count: int, n: int, seed: int) -> np.ndarray:
    """(n, count) indices: each row is one resample of the images with replacement."""
    return np.random.default_rng(seed).integers(0, count, size=(n, count))


def bca_interval(estimate: float, samples: np.ndarray, jackknife: np.ndarray, level: float) -> dict[str, float]:
    """Bias-corrected and accelerated (BCa) bootstrap interval of one statistic.

    The bias correction z0 comes from the share of resamples below the estimate, the
    acceleration from the jackknife (leave-one-image-out) values. A plain percentile interval
    can exclude its own estimate when resampling biases the statistic (SDAR, a spread of
    means, grows under resampling); BCa shifts the interval back. Where the bias is so large
    that the estimate lies outside the percentile interval, the percentile interval shifted by
    the bootstrap bias (mean of resamples - estimate) is used instead. Either way the interval
    is widened to reach the estimate if need be, so it always contains it.

    The normal quantiles and CDF are SciPy's. The resampling stays ours rather than
    `scipy.stats.bootstrap(method="BCa")`: one pass of resamples serves every attribute of a
    dict-valued statistic over cached record columns, the jackknife leaves out blocks beyond
    500 images (SciPy's leaves out each image: images^2 work), and SciPy has no answer where
    the resampling bias exceeds the spread (its BCa interval then collapses, as above).
    """
    samples = samples[np.isfinite(samples)]
    if samples.size == 0 or not math.isfinite(estimate):
        return {"low": float("nan"), "high": float("nan")}
    tail = (1.0 - level) / 2.0
    share_below = (np.sum(samples < estimate) + 0.5 * np.sum(samples == estimate)) / samples.size
    if not tail <= share_below <= 1 - tail:
        # Resampling moves the statistic by more than its own spread (SDAR of attributes that
        # barely differ: every resample adds noise to the spread). BCa then degenerates to a
        # sliver at the edge of the resamples; shift the percentile interval back by the
        # bootstrap's estimate of that bias instead, keeping its width.
        bias = float(samples.mean()) - estimate
        low, high = np.percentile(samples, [tail * 100.0, 100.0 - tail * 100.0]) - bias
        return {"low": float(min(low, estimate)), "high": float(max(high, estimate))}
    z0 = float(norm.ppf(share_below))
    spread = jackknife.mean() - jackknife
    denominator = 6.0 * float(np.sum(spread**2)) ** 1.5
    acceleration = float(np.sum(spread**3)) / denominator if denominator > 0 else 0.0
    ends = []
    for z in norm.ppf([tail, 1 - tail]):
        adjusted = z0 + (z0 + z) / (1 - acceleration * (z0 + z))
        ends.append(float(norm.cdf(adjusted)) * 100.0)
    low, high = np.percentile(samples, ends)
    return {"low": float(min(low, estimate)), "high": float(max(high, estimate))}


# Leave-one-out over thousands of images costs images^2 work; beyond this many, leave out blocks.
_JACKKNIFE_BLOCKS = 500


def _jackknife(table: "_UsableTable", statistic: Statistic) -> list:
    """The statistic with each image (or, for large sets, each block of images) left out."""
    everyone = np.arange(len(table))
    blocks = np.array_split(everyone, min(len(table), _JACKKNIFE_BLOCKS))
    return [statistic(table.take(np.setdiff1d(everyone, block, assume_unique=True))) for block in blocks]


def _values(result, key):
    return result if key is None else result[key]


def bootstrap(records: Sequence[Record], statistic: Statistic, n: int = 200, seed: int = 0,
              level: float = 0.95) -> dict:
    """BCa bootstrap interval (`bca_interval`) of `statistic` over images resampled with replacement.

    Returns {key: {"low", "high"}} when the statistic returns a dict, else one
    {"low", "high"} pair. Failed records are dropped before resampling so every
    resample has the size of the usable population. Same seed, same interval.
    The statistic receives a sequence of record dicts (not necessarily a list).
    """
    if n < 1 or not 0.0 < level < 1.0:
        raise SiaError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    table = _UsableTable.of(list(usable_records(records)))
    estimate = statistic(table)  # also fills the table's column cache for every resample to gather from
    samples = [statistic(table.take(row)) for row in _resample_indices(len(table), n, seed)]
    jackknife = _jackknife(table, statistic) if len(table) > 1 else [estimate]
    keys = list(estimate) if isinstance(estimate, dict) else [None]
    intervals = {
        key: bca_interval(float(_values(estimate, key)), np.array([_values(s, key) for s in samples], dtype=float),
                          np.array([_values(j, key) for j in jackknife], dtype=float), level)
        for key in keys
    }
    return intervals if isinstance(estimate, dict) else intervals[None]


# No attribute is named from fewer counted images than this. A bootstrap over n images has
# at most n distinct values of a mean; below about ten its intervals are as narrow as the few
# values it can draw (one image: an interval of width 0 that "clears" everything), not as
# narrow as the evidence. Reports carry it (`evidence`), and `sia sdar` refuses to gate below it.
MIN_COUNTED_IMAGES = 10


def shown_intervals(report: dict) -> dict:
    """The intervals a report may show: none when it counted fewer than MIN_COUNTED_IMAGES (a
    width-0 interval from one image reads as certainty). report.json keeps them all, beside
    `evidence`; a report without `evidence` shows what it has."""
    if (report.get("evidence") or {}).get("enough") is False:
        return {}
    return report.get("intervals") or {}


def reconstruction_floor(records: Records) -> float | None:
    """The mean change of the model's output that the reconstruction G(x0, a0) alone causes,
    over the usable images: an attribute edit is a generator output too, so an edit that moves
    the model less than this cannot be told from what redrawing any image through the backbone
    does. None when the records do not carry it."""
    values = [r["reconstruction_effect"] for r in usable_records(records)
              if isinstance(r.get("reconstruction_effect"), (int, float)) and math.isfinite(r["reconstruction_effect"])]
    return float(np.mean(values)) if values else None


def excess_over_floor(measure: Statistic) -> Statistic:
    """The statistic `records -> largest value of measure(records) - reconstruction_floor(records)`:
    how far the edit that moves the model most moves it beyond what the reconstruction alone
    does, image by image the same records, for `bootstrap` to put an interval on."""
    def statistic(records: Records) -> float:
        floor = reconstruction_floor(records)
        values = [v for v in measure(records).values() if math.isfinite(v)]
        return float("nan") if floor is None or not values else max(values) - floor
    return statistic


def effect_size(values: dict[str, float], floor: float | None, excess: dict | None = None) -> dict:
    """The absolute size of a measure in the model's output units: its total over attributes,
    the largest, and whether the largest clears `floor` (None: no floor to compare with).

    The largest, not the total: every edit is a redraw through the backbone, and each one that
    repaints a little background moves a model of background pixels (which no attribute truly
    moves) by a little, so fifteen full flips add up to more than one reconstruction while no
    single one moves the model more than redrawing the face does. With `excess`, the interval of
    `excess_over_floor` on the same images, the largest must clear the floor beyond chance (the
    interval's low end above 0)."""
    finite = [v for v in values.values() if math.isfinite(v)]
    largest = max(finite) if finite else 0.0
    moves = None if floor is None else bool(largest > floor)
    out = {"total": float(sum(finite)) if finite else 0.0, "largest": largest, "floor": floor, "moves": moves}
    if moves is not None and excess is not None and math.isfinite(excess.get("low", float("nan"))):
        out["excess_interval"] = {"low": excess["low"], "high": excess["high"]}
        out["moves"] = bool(excess["low"] > 0)
    return out


def enough_images(counted: int, minimum: int = MIN_COUNTED_IMAGES) -> bool:
    return counted >= minimum


def stands_out(values: dict[str, float], intervals: dict[str, dict] | None, counted: int | None = None,
               minimum: int = MIN_COUNTED_IMAGES) -> str | None:
    """The top attribute when its interval lies wholly above the runner-up's, else None.

    Without intervals nothing can be said to stand out: a ranking of point values alone
    names a winner even when the images cannot tell the leaders apart. Nor from fewer than
    `minimum` counted images, nor from an interval of width 0 (every resample drew the same).
    """
    order = ranking(values)
    if not order or not intervals:
        return None
    if counted is not None and not enough_images(counted, minimum):
        return None
    top = intervals.get(order[0]) or {}
    if top.get("low") is not None and top.get("low") == top.get("high"):
        return None
    if len(order) == 1:
        return order[0]
    first, second = (intervals.get(name) or {} for name in order[:2])
    low, high = first.get("low"), second.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return order[0] if low > high else None


def paired_difference(before: Sequence[Record], after: Sequence[Record], statistic: Callable[[Sequence[Record]], float],
                      n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """statistic(after) - statistic(before) on the same images, with a paired percentile interval.

    Both record lists are matched by file name; each resample draws the same images from
    both, so what the images share cancels. `significant` says whether the interval excludes 0.
    """
    old = {r["file"]: r for r in usable_records(before)}
    new = {r["file"]: r for r in usable_records(after)}
    common = [name for name in new if name in old]
    if len(common) < 2:
        raise SiaError("the two reports share fewer than two usable images: a paired comparison needs the same images")
    old_table = _UsableTable.of([old[name] for name in common])
    new_table = _UsableTable.of([new[name] for name in common])
    estimate = statistic(new_table) - statistic(old_table)
    samples = np.array([statistic(new_table.take(row)) - statistic(old_table.take(row))
                        for row in _resample_indices(len(common), n, seed)], dtype=float)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    low, high = float(min(low, estimate)), float(max(high, estimate))
    return {"difference": float(estimate), "low": low, "high": high, "images": len(common),
            "significant": bool(low > 0 or high < 0), "level": level}


def group_split(records: Sequence[Record], attributes: Sequence[str], group_attribute: str,
                threshold: float = 0.5) -> dict[str, list[Record]]:
    """Sub-populations by the starting value of one attribute (paper: sub-population sensitivity)."""
    if group_attribute not in attributes:
        raise SiaError(f"unknown group attribute '{group_attribute}'; known: {', '.join(attributes)}")
    column = list(attributes).index(group_attribute)
    groups: dict[str, list[Record]] = {f"{group_attribute}=1": [], f"{group_attribute}=0": []}
    for record in records:
        side = 1 if record["attrs_start"][column] >= threshold else 0
        groups[f"{group_attribute}={side}"].append(record)
    return groups


def compare(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """(attribute, before, after, after - before) per attribute, in `before`'s order then new ones.

    An attribute present in only one report gets NaN on the other side (not measured, not zero).
    """
    names = list(before) + [name for name in after if name not in before]
    rows = []
    for name in names:
        old, new = float(before.get(name, math.nan)), float(after.get(name, math.nan))
        rows.append((name, old, new, new - old))
    return rows
