"""Per-attribute sensitivity measures computed from per-image attack records.

Every function here is pure: it reads record dicts (see the README's report
schema) and returns plain Python values, so the same code serves a live run,
a report read back from disk and a gather across distributed ranks.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

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


def _percentile_pair(samples: np.ndarray, level: float) -> dict[str, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return {"low": float(low), "high": float(high)}


def bootstrap(records: Sequence[Record], statistic: Statistic, n: int = 200, seed: int = 0,
              level: float = 0.95) -> dict:
    """Percentile bootstrap interval of `statistic` over images resampled with replacement.

    Returns {key: {"low", "high"}} when the statistic returns a dict, else one
    {"low", "high"} pair. Failed records are dropped before resampling so every
    resample has the size of the usable population. Same seed, same interval.
    The statistic receives a sequence of record dicts (not necessarily a list).
    """
    if n < 1 or not 0.0 < level < 1.0:
        raise SiaError(f"bootstrap needs n >= 1 and 0 < level < 1, got n={n}, level={level}")
    table = _UsableTable.of(list(usable_records(records)))
    statistic(table)  # fills the table's column cache once, for every resample to gather from
    samples = [statistic(table.take(row)) for row in _resample_indices(len(table), n, seed)]
    if isinstance(samples[0], dict):
        return {key: _percentile_pair(np.array([s[key] for s in samples], dtype=float), level) for key in samples[0]}
    return _percentile_pair(np.array(samples, dtype=float), level)


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
