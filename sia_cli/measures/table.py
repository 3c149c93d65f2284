"""The one table of sensitivity measures: what each is called, where the report keeps it, how
the pages title it, which function of `sia_cli.measures.sensitivity` computes it and in which modes.

Diagnosis, the reports, `sia sdar`, the examples and the tests all read this table, so a
measure added or renamed here changes every one of them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sia_cli.errors import SiaError
from sia_cli.measures import sensitivity as sens

MODES = ("multi", "single")


@dataclass(frozen=True)
class Measure:
    name: str  # as `settings.headline` and DiagnoseConfig.headline spell it
    key: str  # report key of the raw values; the shares are under `key + "_normalized"`
    title: str  # column title of the HTML measures table
    label: str  # short name: the terminal table's column, the examples' (and README's) table rows
    function: Callable[[sens.Records, sens.Names, sens.Names], dict[str, float]]
    modes: tuple[str, ...]  # the diagnosis modes whose reports carry it
    ranks_in: str  # the one mode where it may be the headline
    default: bool = False  # the headline of `ranks_in` when none is chosen
    in_output_units: bool = True  # a change of the model's output (Task.effect_unit); Eq. 2 moves attributes

    @property
    def normalized_key(self) -> str:
        return f"{self.key}_normalized"


ATTRIBUTE_SHIFT = Measure(
    "attribute_shift", "sensitivity", "attribute shift (Eq. 2)", "Eq. 2", sens.attribute_shift,
    # Single mode reports it too because SDAR is defined on it; it may not rank there, as
    # each image keeps only its best one-attribute attack, so it shows which attribute won
    # rather than how far an attack that could move all of them moved each.
    modes=("multi", "single"), ranks_in="multi", in_output_units=False,
)
# Ranked the true top attribute of planted confounders best until the backbone could edit
# what it names (README, "Validity against the truth"); the headline of multi mode before `flip`.
ABLATION = Measure(
    "ablation", "sensitivity_ablation", "ablation", "ablation", sens.ablation_effect,
    modes=("multi",), ranks_in="multi",
)
# The headline of multi mode: with a backbone that edits what it names, each attribute flipped
# through it names the true top of planted confounders most often, with the closest profile
# to the true effects (docs/validity.md). It needs no attack, so single mode reports it too.
FLIP = Measure(
    "flip", "sensitivity_flip", "counterfactual flip", "flip", sens.flip_effect,
    modes=("multi", "single"), ranks_in="multi", default=True,
)
SINGLE = Measure(
    "single", "sensitivity_single", "single attribute", "single", sens.single_effect,
    modes=("single",), ranks_in="single", default=True,
)

TABLE: tuple[Measure, ...] = (ATTRIBUTE_SHIFT, FLIP, ABLATION, SINGLE)  # the order of report keys and columns
# What a reader of a report shows when its headline is absent or unknown (an older or
# hand-edited report): Eq. 2, which every report carries.
FALLBACK = ATTRIBUTE_SHIFT
_BY_NAME = {measure.name: measure for measure in TABLE}


def by_name(name: str) -> Measure:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise SiaError(f"unknown measure {name!r}; known: {', '.join(_BY_NAME)}") from None


def for_mode(mode: str) -> tuple[Measure, ...]:
    """The measures a diagnosis in this mode computes, in report order."""
    return tuple(measure for measure in TABLE if mode in measure.modes)


def default_headline(mode: str) -> str:
    for measure in TABLE:
        if measure.default and measure.ranks_in == mode:
            return measure.name
    raise SiaError(f"no measure is the default headline of mode {mode!r}")


def headline_for(mode: str, chosen: str | None = None) -> str:
    """The headline name a diagnosis in this mode uses: the chosen one, else the mode's default."""
    return chosen or default_headline(mode)


def may_rank(name: str, mode: str) -> bool:
    """Whether `name` is a measure that may be the headline of a diagnosis in `mode`."""
    measure = _BY_NAME.get(name)
    return measure is not None and measure.ranks_in == mode


def report_key(name: str | None) -> str:
    """Report key of a headline name, reading reports as they come: an absent or unknown name
    gives the fallback's key rather than an error, so an odd report still shows its Eq. 2."""
    return _BY_NAME.get(name, FALLBACK).key
