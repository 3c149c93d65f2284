"""The commands' options, declared once so their help reads alike, and `build`: the one way a
command's option values become its engine config.

An option's default is the engine dataclass's (`default`), so it lives in one place; an option
whose default is None means "not given" and leaves its field at the engine's default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import operator
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import typer

from sia_cli.engine.attack import AttackSettings
from sia_cli.engine.attribution import ExplanationSettings
from sia_cli.errors import SiaError
from sia_cli.runs.devices import pick_device
from sia_cli.runs.inputs import RunConfig
from sia_cli.targets.options import ModelOptions


def load_config(ctx: typer.Context, param, path: Path | None) -> Path | None:
    """`--config FILE.yaml`: its values become the command's defaults; the command line wins.

    Eager, so it runs before the other options read their defaults from `ctx.default_map`.
    """
    if path is None or ctx.resilient_parsing:
        return path
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise typer.BadParameter(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name != "config_file"}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise typer.BadParameter(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


CONFIG = typer.Option(
    None, "--config", callback=load_config, is_eager=True,
    help="YAML file of option values (names as on the command line); the command line overrides it.",
)


def fraction(text: str) -> float:
    """Accept `0.0059` or `1.5/255`."""
    try:
        if "/" in text:
            top, bottom = text.split("/", 1)
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise SiaError(f"{text!r} is not a number or a fraction like 1.5/255") from None


def triple(text: str | None, name: str) -> tuple[float, float, float] | None:
    if not text:
        return None
    values = [fraction(v) for v in text.split(",")]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise SiaError(f"{name} takes 1 or 3 comma-separated numbers, got {text!r}")
    return tuple(values)


def indices(text: str | None, name: str) -> tuple[int, int] | None:
    """`0,1` -> (0, 1); the target checks that they name two of the model's points."""
    if not text:
        return None
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise SiaError(f"{name} takes two comma-separated point indices such as 0,1, got {text!r}")
    return int(parts[0]), int(parts[1])


def names(values: list[str] | None) -> tuple[str, ...]:
    """Repeatable or comma-separated names."""
    return tuple(n.strip() for v in values or [] for n in v.split(",") if n.strip())


def default(config_class: type, name: str) -> Any:
    """The default of field `name` of an engine dataclass, for an option to show and use."""
    for field in dataclasses.fields(config_class):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise ValueError(f"{config_class.__name__} has no field {name!r}")


def fraction_text(value: float) -> str:
    """A bound as its option is written: `1.5/255` for a bound set in 8-bit pixel levels, whose
    decimal form (0.00588235294117647) nobody reads, else the number."""
    plain = repr(float(value))
    levels = round(value * 255, 4)
    if len(plain) > 8 and levels / 255 == value:
        return f"{levels:g}/255"
    return plain


MODEL = typer.Argument(..., help="Target model: TorchScript file or torch.export archive (.pt2).")
IMAGES = typer.Option(..., "--images", help="Folder of images to attack.")
OUT = typer.Option(Path("sia-out"), "--out", help="Output folder.")
GAN = typer.Option(None, "--gan", help="Backbone: registry name, checkpoint file or folder with setting.txt (default: synth-faces-64).")
ATTRS_FILE = typer.Option(None, "--attrs-file", help="Starting attributes (CelebA list_attr layout); else the backbone's discriminator predicts them.")
PROTECT = typer.Option(None, "--protect", help="Attribute held within --protect-eps of its start (repeatable).")
PROTECT_EPS = typer.Option(default(AttackSettings, "protect_eps"), "--protect-eps", help="How far a protected attribute may move.")
STEPS = typer.Option(default(AttackSettings, "steps"), "--steps", help="Attack iterations T.")
EPS = typer.Option(fraction_text(default(AttackSettings, "eps")), "--eps", help="Pixel L-inf bound (number or fraction).")
STEP_SIZE = typer.Option(fraction_text(default(AttackSettings, "step_size")), "--step-size", help="Step size eta for pixels and attributes.")
EPS_ATTR = typer.Option(fraction_text(default(AttackSettings, "eps_attr")), "--eps-attr", help="Attribute L-inf bound (attributes also stay in [0, 1]).")
SEED = typer.Option(default(RunConfig, "seed"), "--seed", help="Random seed.")


def batch_size(value) -> int | str:
    """`--batch-size`: a whole number (the run checks that it is positive) or `auto`."""
    text = str(value).strip().lower()
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a whole number nor auto") from None


BATCH_SIZE = typer.Option(
    default(RunConfig, "batch_size"), "--batch-size", parser=batch_size, metavar="N|auto",
    help="Images per batch; auto: the largest batch that fits in GPU memory, less 10% headroom (64 on CPU).",
)
COMPILE = typer.Option(
    default(RunConfig, "compile"), "--compile",
    help="torch.compile the generator (and a torch.export target) before the attack; pays off on long GPU runs.",
)
# Not the engine's default (cpu): on the command line the machine decides.
DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda when available).")
AMP = typer.Option(
    None, "--amp", help="Mixed precision: bf16 (autocast; faster on GPUs with bf16 tensor cores, slower on most CPUs).",
)
TASK = typer.Option(
    None, "--task",
    help="binary, multiclass, multilabel, keypoints, landmarks or regression. Inferred from the output shape "
         "when unambiguous: (B,) or (B, 1) binary, (B, C) multiclass, (B, K, H, W) keypoint heatmaps, (B, K, 2) "
         "landmarks; multilabel (B, C), landmarks (B, 2K) and regression need --task.",
)
OUTPUT_TYPE = typer.Option(
    None, "--output", metavar="logits|probability",
    help="What a binary, multiclass or multilabel head emits (default: sia.yaml's output; a sigmoid head whose "
         "outputs all lie in [0, 1] is refused until told).",
)
LABEL = typer.Option(
    None, "--label", metavar="NAME_OR_INDEX",
    help="Multilabel models: the label under attack (a name from sia.yaml's class_names, or an index).",
)
CHANNELS = typer.Option(
    None, "--channels", metavar="1|3",
    help="Image channels the model takes: 3 (RGB, default) or 1 (grayscale, the ITU-R 601 luma of the image; "
         "--mean/--std then take one value).",
)
MARGIN = typer.Option(
    None, "--margin",
    help="Regression: success when the prediction moves more than this from the reference (default 1.0, in the "
         "output's units).",
)
EYE_INDICES = typer.Option(
    None, "--eye-indices", metavar="I,J",
    help="Keypoints/landmarks: two point indices whose distance normalises the NME (default: sia.yaml's "
         "eye_indices, else the diagonal of the heatmap or of the model's input).",
)
INPUT_SIZE = typer.Option(None, "--input-size", help="Target input size (default: sia.yaml in the model, else the backbone's size).")
MEAN = typer.Option(None, "--mean", help="Target normalisation mean, 1 or 3 comma-separated numbers.")
STD = typer.Option(None, "--std", help="Target normalisation std, 1 or 3 comma-separated numbers.")
LABELS = typer.Option(None, "--labels", help="CSV of reference labels (file,label or file,x1,y1,...); default: the model's clean prediction.")
OUTPUT_KEY = typer.Option(None, "--output-key", help="Which output to use when the model returns a tuple or dict.")
NME = typer.Option(default(AttackSettings, "nme_threshold"), "--nme-threshold", help="Keypoint attack success: normalised mean error above this.")
FORCE = typer.Option(default(RunConfig, "force"), "--force", help="Overwrite a finished run in --out.")
KEEP_LOST = typer.Option(
    default(RunConfig, "keep_lost"), "--keep-lost",
    help="Count images lost in reconstruction (the backbone's reconstruction alone changes the prediction) "
         "in the success rate and the measures; by default they are listed and left out.",
)
ALIGN = typer.Option(
    default(RunConfig, "align"), "--align",
    help="Find, align and crop the faces of --images first, as `sia align` does, into OUT/aligned/ (needs the align "
         "extra); --attrs-file and --labels rows follow each face's photo.")
TRUST_PICKLE = typer.Option(
    default(ModelOptions, "trust_pickle"), "--trust-pickle",
    help="Load a .pt2 archive whose weights or sample inputs are stored as pickles (refused by default: "
         "unpickling can run any code). Only for files you trust.",
)
# How explanations are attacked and compared (`sia diagnose --explanations`; ART paper, section 4).
EXPLANATIONS = typer.Option(
    False, "--explanations",
    help="Also measure how far the model's explanations (integrated-gradient maps) move: under the top-k "
         "feature-importance attack, and under each attribute's edit where it keeps the prediction. Binary, "
         "multi-label and multiclass models (a class logit to explain).")
EXPLAIN_K = typer.Option(None, "--explain-k", help="Top-k pixels compared (default: 100/1024 of the image's pixels, the ART paper's share).")
EXPLAIN_EPSILON = typer.Option(fraction_text(default(ExplanationSettings, "explain_epsilon")), "--explain-epsilon",
                               help="L-inf radius of the feature-importance attack (number or fraction).")
EXPLAIN_STEPS = typer.Option(default(ExplanationSettings, "explain_steps"), "--explain-steps",
                             help="Steps of the feature-importance attack.")
EXPLAIN_STEP_SIZE = typer.Option(fraction_text(default(ExplanationSettings, "explain_step_size")), "--explain-step-size",
                                 help="Step of the feature-importance attack (number or fraction).")
EXPLAIN_IG_STEPS = typer.Option(default(ExplanationSettings, "explain_ig_steps"), "--explain-ig-steps",
                                help="Integrated-gradient points of each measured map.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="Hide progress bars (also hidden when stderr is not a terminal).")
LANDMARK_LAYOUT = typer.Option(
    None, "--landmark-layout", metavar="xyxy|xxyy",
    help="Landmarks given as (B, 2K): xyxy is x1, y1, x2, y2, ... (the default); xxyy is x1, ..., xK, y1, ..., yK, "
         "as MTCNN-style heads emit. (B, K, 2) outputs need none.",
)

# The options that load and read a model (sia_cli.targets.options.ModelOptions), declared once:
# `with_model_options` gives them to every command that loads a model, alike.
MODEL_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("task", str, TASK), ("input_size", int, INPUT_SIZE), ("mean", str, MEAN), ("std", str, STD),
    ("channels", int, CHANNELS), ("output", str, OUTPUT_TYPE), ("output_key", str, OUTPUT_KEY),
    ("label", str, LABEL), ("margin", float, MARGIN), ("eye_indices", str, EYE_INDICES),
    ("landmark_layout", str, LANDMARK_LAYOUT), ("trust_pickle", bool, TRUST_PICKLE),
)


def with_model_options(command: Callable) -> Callable:
    """Add the model options to `command`'s parameters (before --no-progress and --config, so
    `--help` lists them together) and hand them to it as one dict, `model_options`, which the
    command merges into what `build` reads."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "model_options"]
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option, annotation=kind)
             for name, kind, option in MODEL_OPTIONS]
    tail = [p for p in own if p.name in ("no_progress", "config_file")]
    head = [p for p in own if p not in tail]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name, None) for name, _, _ in MODEL_OPTIONS}
        return command(*args, model_options=given, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=head + added + tail)
    wrapper.__annotations__ = {**getattr(command, "__annotations__", {}),
                               **{name: kind for name, kind, _ in MODEL_OPTIONS}}
    return wrapper



# ----------------------------------------------------------------------------- options -> config


@dataclasses.dataclass(frozen=True)
class Rule:
    """Config field `field` from the command parameters `options`, through `convert`."""

    field: str
    options: tuple[str, ...]
    convert: Callable[..., Any]


def _same(value):
    return value


def at_least_one(flag: str) -> Callable[[int], int]:
    def check(value: int) -> int:
        if value < 1:
            raise SiaError(f"{flag} must be at least 1 (got {value})")
        return value

    return check


def bound(flag: str, parse: Callable[[Any], float] = float) -> Callable[[Any], float]:
    """A finite non-negative number: a negative or NaN bound would run and report an attack with
    nonsensical limits."""

    def check(text) -> float:
        value = parse(text)
        if not math.isfinite(value) or value < 0:
            raise SiaError(f"{flag} must be a finite non-negative number (got {value})")
        return value

    return check


def command_line() -> str:
    """The command as typed, recorded in reports so a run can be repeated."""
    return " ".join(["sia"] + sys.argv[1:])


def attribute_names(text: str, attrs_file: Path) -> list[str]:
    """train-gan's `--attributes`, or when it names none every attribute of the `--attrs` file."""
    chosen = list(names([text]))
    if chosen:
        return chosen
    from sia_cli.inputs.images import read_attributes

    return list(read_attributes(attrs_file).names)


def seconds(minutes: float) -> float | None:
    return minutes * 60 or None  # 0 minutes: no limit


# How option values become config fields. A field takes the first rule for it whose options the
# command has, else the option of its own name unchanged, else its default; a nested config
# (RunConfig.settings, an AttackSettings) is filled from the same options.
RULES: tuple[Rule, ...] = (
    Rule("model", ("source",), _same),  # sdar: SOURCE, when it is a model and not a report
    Rule("attrs_file", ("attrs",), _same),  # train-gan
    Rule("attributes", ("attributes", "attrs"), attribute_names),
    Rule("methods", ("method",), lambda text: names([text])),
    Rule("protect", ("protect",), names),
    Rule("group_by", ("group_by",), names),
    Rule("auto_protect", ("no_protect",), operator.not_),
    Rule("steps", ("steps",), at_least_one("--steps")),
    Rule("eps", ("eps",), bound("--eps", fraction)),
    Rule("step_size", ("step_size",), bound("--step-size", fraction)),
    Rule("eps_attr", ("eps_attr",), bound("--eps-attr", fraction)),
    Rule("protect_eps", ("protect_eps",), bound("--protect-eps")),
    Rule("nme_threshold", ("nme_threshold",), bound("--nme-threshold")),
    Rule("device", ("device",), pick_device),
    Rule("mean", ("mean",), lambda text: triple(text, "--mean")),
    Rule("std", ("std",), lambda text: triple(text, "--std")),
    Rule("eye_indices", ("eye_indices",), lambda text: indices(text, "--eye-indices")),
    Rule("command", (), command_line),
    *(Rule(f"{part}_layers", ("layers",), _same) for part in ("enc", "dec", "dis")),  # train-gan
    Rule("time_limit", ("time_limit",), seconds),
    Rule("art_epsilon", ("art_epsilon",), bound("--art-epsilon", fraction)),
    Rule("art_step_size", ("art_step_size",), bound("--art-step-size", fraction)),
    Rule("art_weight", ("art_weight",), bound("--art-weight")),
    Rule("explain_k", ("explain_k",), at_least_one("--explain-k")),
    Rule("explain_epsilon", ("explain_epsilon",), bound("--explain-epsilon", fraction)),
    Rule("explain_steps", ("explain_steps",), at_least_one("--explain-steps")),
    Rule("explain_step_size", ("explain_step_size",), bound("--explain-step-size", fraction)),
    Rule("explain_ig_steps", ("explain_ig_steps",), at_least_one("--explain-ig-steps")),
)


def _nested(field: dataclasses.Field) -> type | None:
    factory = field.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _plan(config_class: type, available) -> Iterator[tuple[dataclasses.Field, Rule | type]]:
    """Each field of `config_class` that options named in `available` fill: with its rule, or
    with its own config class when it is a nested config."""
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        rule = next((r for r in RULES if r.field == field.name and set(r.options) <= set(available)), None)
        if rule is None and field.name in available:
            rule = Rule(field.name, (field.name,), _same)
        if rule is not None:
            yield field, rule
        elif _nested(field) is not None:
            yield field, _nested(field)


def build(config_class: type, values: Mapping[str, Any]):
    """The engine config `config_class` built from a command's parsed option values, its
    parameters by name (`locals()` first thing in the command). Parameters that fill no field
    (--no-progress, --config) are left out; an option left unset (None) leaves its field at
    the default. One constructor call: the configs are frozen. The model options a command got
    from `with_model_options` (one dict, `model_options`) count as its own."""
    if isinstance(values.get("model_options"), dict):
        values = {**values, **values["model_options"]}
        values.pop("model_options")
    given = {}
    for field, how in _plan(config_class, values):
        if isinstance(how, type):
            given[field.name] = build(how, values)
            continue
        raw = [values[name] for name in how.options]
        if how.options and all(value is None for value in raw):
            continue
        given[field.name] = how.convert(*raw)
    return config_class(**given)


def sources(config_class: type, available) -> dict[str, tuple[str, ...]]:
    """Which options fill which field (`settings.steps` for a nested one): what `build` reads."""
    if "model_options" in available:
        available = [name for name in available if name != "model_options"] + [n for n, _, _ in MODEL_OPTIONS]
    found = {}
    for field, how in _plan(config_class, available):
        if isinstance(how, type):
            found.update({f"{field.name}.{k}": v for k, v in sources(how, available).items()})
        else:
            found[field.name] = how.options
    return found
