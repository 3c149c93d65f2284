"""Options shared by the attack commands, declared once so their help reads alike."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from sia_cli.errors import SiaError


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


MODEL = typer.Argument(..., help="Target model: TorchScript file or torch.export archive (.pt2).")
IMAGES = typer.Option(..., "--images", help="Folder of images to attack.")
OUT = typer.Option(Path("sia-out"), "--out", help="Output folder.")
GAN = typer.Option(None, "--gan", help="Backbone: registry name, checkpoint file or folder with setting.txt (default: synth-faces-64).")
ATTRS_FILE = typer.Option(None, "--attrs-file", help="Starting attributes (CelebA list_attr layout); else the backbone's discriminator predicts them.")
PROTECT = typer.Option(None, "--protect", help="Attribute held within --protect-eps of its start (repeatable).")
PROTECT_EPS = typer.Option(0.0, "--protect-eps", help="How far a protected attribute may move.")
STEPS = typer.Option(200, "--steps", help="Attack iterations T.")
EPS = typer.Option("1.5/255", "--eps", help="Pixel L-inf bound (number or fraction).")
STEP_SIZE = typer.Option("0.25/255", "--step-size", help="Step size eta for pixels and attributes.")
EPS_ATTR = typer.Option("1.0", "--eps-attr", help="Attribute L-inf bound (attributes also stay in [0, 1]).")
SEED = typer.Option(0, "--seed", help="Random seed.")


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
    16, "--batch-size", parser=batch_size, metavar="N|auto",
    help="Images per batch; auto: the largest batch that fits in GPU memory, less 10% headroom (64 on CPU).",
)
COMPILE = typer.Option(
    False, "--compile",
    help="torch.compile the generator (and a torch.export target) before the attack; pays off on long GPU runs.",
)
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
NME = typer.Option(0.1, "--nme-threshold", help="Keypoint attack success: normalised mean error above this.")
FORCE = typer.Option(False, "--force", help="Overwrite a finished run in --out.")
KEEP_LOST = typer.Option(
    False, "--keep-lost",
    help="Count images lost in reconstruction (the backbone's reconstruction alone changes the prediction) "
         "in the success rate and the measures; by default they are listed and left out.",
)
TRUST_PICKLE = typer.Option(
    False, "--trust-pickle",
    help="Load a .pt2 archive whose weights or sample inputs are stored as pickles (refused by default: "
         "unpickling can run any code). Only for files you trust.",
)
NO_PROGRESS = typer.Option(False, "--no-progress", help="Hide progress bars (also hidden when stderr is not a terminal).")


def target_settings(output, label, channels, margin, eye_indices) -> dict:
    """RunConfig fields of the target options (--output, --label, --channels, --margin, --eye-indices)."""
    return {"output": output, "label": label, "channels": channels, "margin": margin,
            "eye_indices": indices(eye_indices, "--eye-indices")}


def attack_settings(steps, eps, step_size, eps_attr, protect_eps, amp, nme_threshold):
    from sia_cli.attack import AttackSettings

    if steps < 1:
        raise SiaError(f"--steps must be at least 1 (got {steps})")
    values = {"--eps": fraction(eps), "--step-size": fraction(step_size), "--eps-attr": fraction(eps_attr),
              "--protect-eps": protect_eps, "--nme-threshold": nme_threshold}
    for flag, value in values.items():
        # A negative or NaN bound would run and report an attack with nonsensical limits.
        if not math.isfinite(value) or value < 0:
            raise SiaError(f"{flag} must be a finite non-negative number (got {value})")
    return AttackSettings(
        steps=steps, eps=values["--eps"], step_size=values["--step-size"], eps_attr=values["--eps-attr"],
        protect_eps=protect_eps, amp=amp, nme_threshold=nme_threshold,
    )
