"""Running an attack over a folder: inputs, batches, records, adversary files and the report.

`attack()` is the engine behind `sia attack`: an `ImagePlan` run by `sia_cli.lifecycle`.
`diagnose` builds on the same pieces.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli import __version__, trust
from sia_cli.attack import METHODS, AttackSettings, Method, attack_batch, get_method, quantize
from sia_cli.data import ImageError, list_images, load_image, read_attributes
from sia_cli.distributed import World, current
from sia_cli.errors import ModelRaised, SiaError
from sia_cli.files import write_json_atomic
from sia_cli.progress import ProgressFn, silent
from sia_cli.registry import load_backbone
from sia_cli.reports import image_quality, save_png_atomic, to_uint8
from sia_cli.lifecycle import Context, Plan, execute
from sia_cli.align import align_inputs
from sia_cli.target import load_target, read_labels

SCHEMA_VERSION = 1
REPORT = "report.json"
COMPARISON = "comparison.json"


@dataclass(frozen=True)
class RunConfig:
    model: Path
    images: Path
    out: Path
    gan: str | None = None
    attrs_file: Path | None = None
    methods: tuple[str, ...] = ("sia",)
    settings: AttackSettings = field(default_factory=AttackSettings)
    protect: tuple[str, ...] = ()
    batch_size: int | str = 16  # or "auto", which sia_cli.speed.tune settles
    compile: bool = False
    device: str = "cpu"
    seed: int = 0
    task: str | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels: Path | None = None
    output_key: str | None = None
    output: str | None = None  # logits or probability (binary, multiclass, multilabel heads)
    label: str | None = None  # multilabel: the label under attack, name or index
    channels: int | None = None  # 1 for grayscale models
    margin: float | None = None  # regression: success past this change
    eye_indices: tuple[int, int] | None = None  # keypoints/landmarks: NME over their distance
    force: bool = False
    keep_lost: bool = False  # count images lost in reconstruction in the success rate and measures
    command: str = ""
    trust_pickle: bool = False  # load .pt2 archives holding pickles (they can run code)
    align: bool = False  # find and align the faces of --images first (sia_cli.align.align_inputs)

    def describe(self) -> dict:
        data = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


@dataclass
class Inputs:
    """Everything loaded once before the first batch."""

    backbone: object
    target: object
    files: list[Path]
    attributes: object  # AttributeTable restricted to the backbone's names, or None
    labels: dict | None
    protected: torch.Tensor  # (K,) bool
    adversary_names: dict[str, str]  # source file name -> PNG name


def load_inputs(config: RunConfig, device: str, progress: ProgressFn = silent) -> Inputs:
    """Every input of a run, checked before the first batch (on `device`, this rank's)."""
    backbone = load_backbone(config.gan, device, progress)
    target = load_target(
        config.model, device=device, task=config.task, input_size=config.input_size,
        mean=config.mean, std=config.std, output_key=config.output_key, probe_size=backbone.img_size,
        output=config.output, label=config.label, channels=config.channels, margin=config.margin,
        eye_indices=config.eye_indices, trust_pickle=config.trust_pickle,
    )
    files = list_images(config.images)
    table = read_attributes(config.attrs_file).select(backbone.attributes) if config.attrs_file else None
    mismatch = table.mismatch(files) if table is not None else None
    if mismatch:
        raise SiaError(f"{mismatch}: --attrs-file and --images must name the same files")
    if table is None and backbone.discriminator is None:
        raise SiaError(
            "no starting attributes: pass --attrs-file (CelebA list_attr layout); "
            f"backbone {backbone.info.name} has no discriminator head to predict them"
        )
    unknown = [name for name in config.protect if name not in backbone.attributes]
    if unknown:
        raise SiaError(f"--protect {', '.join(unknown)}: not a backbone attribute ({', '.join(backbone.attributes)})")
    protected = torch.tensor([name in config.protect for name in backbone.attributes])
    labels = read_labels(config.labels, target.task, target.task.class_labels) if config.labels else None
    if labels is not None:  # all of them before the first batch, not when a batch reaches the gap
        missing = [file.name for file in files if file.name not in labels]
        if missing:
            raise SiaError(f"--labels {config.labels} has no row for {missing[0]} "
                           f"({len(missing)} of {len(files)} image(s) missing)")
    return Inputs(backbone, target, files, table, labels, protected, adversary_names(files))


@dataclass
class Batch:
    files: list[Path]
    x0: torch.Tensor  # (B, 3, S, S) in [0, 1]
    a0: torch.Tensor  # (B, K) in [0, 1]
    index: int = 0  # position among the run's fixed blocks of files: seeds and shards follow it
    a0_source: str = "attrs_file"  # or "discriminator": estimated, not known

    def part(self, start: int, stop: int) -> "Batch":
        """Images start..stop-1 of the batch, with its index and the source of its attributes."""
        return Batch(self.files[start:stop], self.x0[start:stop], self.a0[start:stop], self.index, self.a0_source)


def batches(inputs: Inputs, batch_size: int, device: str, skipped: list, done=frozenset(), world: World = World()):
    """Yield loaded batches of this rank's blocks of the inputs' files, less those in `done`.

    Blocks are fixed over all the files before anything is loaded or left out, so a batch holds
    the same images, with the same index, whatever the number of processes and whether the
    run was resumed. Unusable files go to `skipped` with the reason.
    """
    for index, start in enumerate(range(0, len(inputs.files), batch_size)):
        if not world.owns(index):
            continue
        batch = load_batch(inputs, [f for f in inputs.files[start:start + batch_size] if f.name not in done],
                           device, index, skipped)
        if batch is not None:
            yield batch


def load_batch(inputs: Inputs, files: list[Path], device: str, index: int, skipped: list) -> Batch | None:
    """`files` as one batch with their starting attributes (from the attributes file, else the
    backbone's estimate); unusable files go to `skipped` with the reason. None when none is usable."""
    size = inputs.backbone.img_size
    pending: list[tuple[Path, torch.Tensor, np.ndarray | None]] = []
    for file in files:
        try:
            image = load_image(file, size)
        except ImageError as exc:
            skipped.append({"file": file.name, "reason": str(exc)})
            continue
        vector = inputs.attributes.vector(file) if inputs.attributes is not None else None
        if inputs.attributes is not None and vector is None:
            skipped.append({"file": file.name, "reason": f"not listed in {inputs.attributes.path.name}"})
            continue
        pending.append((file, image, vector))
    if not pending:
        return None
    x0 = torch.stack([image for _, image, _ in pending]).to(device)
    if inputs.attributes is not None:
        a0, source = torch.from_numpy(np.stack([vector for _, _, vector in pending])).to(device), "attrs_file"
    else:
        a0, source = inputs.backbone.predict_attributes(x0 * 2 - 1), "discriminator"
    return Batch([file for file, _, _ in pending], x0, a0.float(), index, source)


@torch.no_grad()  # not inference_mode: the reference label takes part in the attack's graph
def reference_pass(inputs: Inputs, batch: Batch) -> dict:
    """Clean prediction and the reference label (the model's own prediction, or --labels)."""
    clean = inputs.target(batch.x0 * 2 - 1)
    reference = _labelled_reference(inputs, batch, clean) if inputs.labels is not None else \
        inputs.target.reference(clean)
    return {"clean": clean, "reference": reference}


@torch.no_grad()
def clean_pass(inputs: Inputs, batch: Batch) -> dict:
    """`reference_pass`, plus the backbone's reconstruction with the model's prediction on it and
    the critic margin: what an attack's records need to tell its effect from the backbone's."""
    target, backbone = inputs.target, inputs.backbone
    reconstruction = backbone(batch.x0 * 2 - 1, batch.a0)
    # Judged like an adversary (8-bit, full precision), so that "lost in reconstruction" and
    # "success" compare like with like.
    reconstruction_out = target(quantize(reconstruction))
    return {**reference_pass(inputs, batch), "reconstruction": reconstruction,
            "reconstruction_out": reconstruction_out,
            "critic_margin": backbone.critic_margin(batch.x0 * 2 - 1, reconstruction)}


def _labelled_reference(inputs: Inputs, batch: Batch, clean: torch.Tensor) -> torch.Tensor:
    # load_inputs has checked that every image has a row.
    values = torch.stack([torch.as_tensor(inputs.labels[f.name]) for f in batch.files]).to(clean.device)
    # Keypoint coordinates become heatmaps of the model's own heatmap size (clean.shape[-2:]).
    return inputs.target.reference_from_labels(values)


def _plain(value: torch.Tensor):
    """Rounded plain numbers; NaN and inf become None, which strict JSON can hold."""
    value = value.detach().float().cpu()
    if value.dim() == 0:
        return round(value.item(), 6) if torch.isfinite(value) else None
    return [round(v, 6) if np.isfinite(v) else None for v in value.flatten().tolist()] if value.dim() == 1 \
        else [_plain(row) for row in value]


def failures(clean: dict, state) -> list[str | None]:
    """Why each image's attack cannot be trusted (NaN or inf on the way), or None.

    Checked once after the loop: a check per step would be a host sync per step, and a
    non-finite value stays non-finite, so nothing is missed by waiting.
    """
    def finite(t: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(t.float()).reshape(len(t), -1).all(dim=1).cpu()

    clean_ok = finite(clean["clean"])
    attack_ok = finite(state.output) & finite(state.x) & finite(state.a)
    return [
        None if c and a else
        "the model returns NaN or inf on this image" if not c else
        "the loss became NaN or inf during the attack"
        for c, a in zip(clean_ok.tolist(), attack_ok.tolist())
    ]


def records_for(batch: Batch, inputs: Inputs, clean: dict, state, settings: AttackSettings, method: Method,
                keep_lost: bool = False) -> list[dict]:
    """One record per image: where it started, what f said on the clean image, on the
    reconstruction G(x0, a0) and on the adversary, and whether the attack, not the backbone,
    made it fail (see sia_cli.trust)."""
    target, threshold = inputs.target, settings.nme_threshold
    success_vs_label = target.success(state.output, clean["reference"], threshold)
    lost = target.success(clean["reconstruction_out"], clean["reference"], threshold)
    already_wrong = target.success(clean["clean"], clean["reference"], threshold)
    success_vs_reconstruction = target.success(state.output, target.reference(clean["reconstruction_out"]), threshold)
    # An image the reconstruction alone moved says nothing about the attack (pixel methods
    # never pass through the generator); one already wrong on the clean image neither.
    counted = ~already_wrong
    if method.through_generator and not keep_lost:
        counted &= ~lost
    label = target.record_label(clean["reference"])
    pred_clean, pred_adv = target.predict(clean["clean"]), target.predict(state.output)
    pred_reconstruction = target.predict(clean["reconstruction_out"])
    mae = ((clean["reconstruction"] - (batch.x0 * 2 - 1)).abs().flatten(1).mean(dim=1) / 2).cpu()
    margins = clean.get("critic_margin")
    card = inputs.backbone.info.card
    records = []
    for i, (file, problem) in enumerate(zip(batch.files, failures(clean, state))):
        record = {"file": file.name, "attrs_start": _plain(batch.a0[i]), "attrs_source": batch.a0_source}
        if batch.a0_source == "discriminator":
            record["attrs_confidence"] = round(float((batch.a0[i] - 0.5).abs().mean() * 2), 4)
        if problem is None:
            margin = float(margins[i]) if margins is not None else None
            record.update(
                attrs_end=_plain(state.a[i]), label=_plain(label[i]), pred_clean=_plain(pred_clean[i]),
                pred_reconstruction=_plain(pred_reconstruction[i]), pred_adv=_plain(pred_adv[i]),
                lost_in_reconstruction=bool(lost[i]), already_wrong=bool(already_wrong[i]),
                counted=bool(counted[i]), success=bool(success_vs_label[i] & counted[i]),
                success_vs_label=bool(success_vs_label[i]),
                success_vs_reconstruction=bool(success_vs_reconstruction[i]),
                reconstruction_mae=round(float(mae[i]), 6),
                critic_margin=round(margin, 4) if margin is not None else None,
                in_domain=trust.in_domain(margin, card),
            )
        else:
            record.update(success=False, error=problem)
        records.append(record)
    return records


def adversary_names(files: list[Path]) -> dict[str, str]:
    """Source file name -> PNG name: its stem, or its whole name where stems clash (a.jpg, a.png)
    so that no adversary silently overwrites another."""
    stems = Counter(file.stem for file in files)
    return {file.name: f"{file.stem}.png" if stems[file.stem] == 1 else f"{file.name}.png" for file in files}


def save_images(folder: Path, files: list[Path], images: torch.Tensor, names: dict[str, str] | None = None) -> None:
    """Write [-1, 1] images as PNG named after their sources (temp file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or adversary_names(files)
    for file, image in zip(files, ((images + 1) / 2).cpu()):
        save_png_atomic(folder / names[file.name], Image.fromarray(to_uint8(image)))


class MethodRun:
    """One method's output folder: turns an attacked batch into records and adversary files."""

    def __init__(self, method: Method, folder: Path):
        self.method, self.folder = method, folder
        self.records: list[dict] = []  # the whole run's, in file order, once gathered

    def add(self, batch: Batch, inputs: Inputs, clean: dict, state, settings: AttackSettings,
            keep_lost: bool = False) -> list[dict]:
        """Records of the batch with image quality; adversaries written for the images that did not fail."""
        records = records_for(batch, inputs, clean, state, settings, self.method, keep_lost)
        ok = [i for i, record in enumerate(records) if "error" not in record]
        if ok:
            adversary, x0 = (state.adversary[ok] + 1) / 2, batch.x0[ok]
            reconstruction = (clean["reconstruction"][ok] + 1) / 2
            # `psnr`/`ssim` compare with the image the method started from: the reconstruction
            # for generator methods (paper Table 1), the clean image for pixel baselines. The
            # clean-image figures say how far the user's image really moved.
            start = reconstruction if self.method.through_generator else x0
            figures = {"": image_quality(adversary, start), "_vs_clean": image_quality(adversary, x0)}
            _, recon_ssim = image_quality(reconstruction, x0)
            for j, i in enumerate(ok):
                for suffix, (psnr, ssim) in figures.items():
                    records[i].update({f"psnr{suffix}": float(psnr[j]), f"ssim{suffix}": float(ssim[j])})
                records[i]["reconstruction_ssim"] = round(float(recon_ssim[j]), 6)
            save_images(self.folder / "adversaries", [batch.files[i] for i in ok], state.adversary[ok],
                        inputs.adversary_names)
        return records

    def summary(self) -> dict:
        return attack_summary(self.records)


def _rate(records: list[dict], key: str) -> float | None:
    return float(np.mean([bool(r.get(key)) for r in records])) if records else None


def _average(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def attack_summary(records: list[dict]) -> dict:
    """Success rates and image quality over the usable records.

    `attack_success_rate` credits only what the attack did: it is taken over the `counted`
    records, which leave out images lost in reconstruction (generator methods) and images
    already wrong on the clean image; `attack_success_rate_vs_label` is the plain rate against
    the reference label over every usable image, `..._vs_reconstruction` against the
    reconstruction's own prediction.
    """
    usable = [r for r in records if "error" not in r]
    counted = [r for r in usable if r.get("counted", True)]
    return {
        "attack_success_rate": _rate(counted, "success") if counted else 0.0,
        "counted": len(counted),
        "attack_success_rate_vs_label": _rate(usable, "success_vs_label"),
        "attack_success_rate_vs_reconstruction": _rate(usable, "success_vs_reconstruction"),
        "lost_in_reconstruction": sum(bool(r.get("lost_in_reconstruction")) for r in usable),
        "already_wrong": sum(bool(r.get("already_wrong")) for r in usable),
        "psnr": _average(usable, "psnr"), "ssim": _average(usable, "ssim"),
        "psnr_vs_clean": _average(usable, "psnr_vs_clean"), "ssim_vs_clean": _average(usable, "ssim_vs_clean"),
        "failed": len(records) - len(usable),
    }


def describe_inputs(inputs: Inputs) -> dict:
    backbone, target = inputs.backbone, inputs.target
    return {
        "backbone": {
            "name": backbone.info.name, "path": backbone.info.path, "sha256": backbone.info.sha256,
            "img_size": backbone.img_size, "thres_int": backbone.info.thres_int,
            "edit_success": trust.edit_success(backbone.info.card, backbone.attributes),
            "domain": backbone.info.card.get("domain"),
        },
        # Everything the run resolved about the target (preprocessing, output type, task), whatever its source.
        "target": target.describe(),
        "attributes": list(backbone.attributes),
        "protected": protected_names(inputs),
    }


def protected_names(inputs: Inputs) -> list[str]:
    return [name for name, kept in zip(inputs.backbone.attributes, inputs.protected.tolist()) if kept]


def findings_trust(inputs: Inputs, records: list[dict], grouped: bool = False,
                   measures_include_lost: bool = False) -> dict:
    """backbone_fit, blind_spots and warnings of a run's records (see sia_cli.trust)."""
    card = inputs.backbone.info.card
    fit = trust.backbone_fit(records, card)
    blind = trust.blind_spots(card, inputs.backbone.attributes, protected_names(inputs))
    assumptions = list(getattr(inputs.target, "assumptions", []) or [])
    warnings = trust.warnings_for(fit, blind, records, assumptions, grouped, measures_include_lost)
    return {"backbone_fit": fit, "blind_spots": blind, "warnings": warnings}


def base_report(config: RunConfig, context: Context) -> dict:
    inputs = context.inputs
    return {
        "schema_version": SCHEMA_VERSION,
        "version": __version__,
        "command": config.command,
        # As the run resolved them: `--batch-size auto` and a torchrun rank's device settled.
        "settings": {**config.describe(), "device": context.device, "batch_size": context.batch_size},
        **describe_inputs(inputs),
        "device": _device_name(context.device),
        "attrs_source": "attrs_file" if inputs.attributes is not None else "discriminator",
        "world_size": current().size,
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def one_by_one(work, items: list, part) -> tuple[list, dict[int, str]]:
    """`work(part(0, n))` for the n items, a list with one result per item; when the model raises
    (it checks its input, say), each item alone, so one image it refuses does not stop the run.
    Returns the results (None where it raised) and the model's message by item index."""
    try:
        return work(part(0, len(items))), {}
    except ModelRaised as exc:
        if len(items) == 1:
            return [None], {0: str(exc)}
    results, failed = [], {}
    for i in range(len(items)):
        try:
            results += work(part(i, i + 1))
        except ModelRaised as exc:
            results.append(None)
            failed[i] = str(exc)
    return results, failed


def _work_or_fail(work, batch: Batch, methods: tuple[str, ...]) -> dict[str, list[dict]]:
    """`work(batch)` through `one_by_one`: an image the model still raises on alone becomes a
    failed record with the model's message, like an image it returns NaN for: the rest of the
    run goes on, and a rerun does not retry it."""
    def per_image(part: Batch) -> list[dict[str, dict]]:
        rows = work(part)
        return [{name: rows[name][i] for name in rows} for i in range(len(part.files))]

    images, failed = one_by_one(per_image, batch.files, batch.part)
    results: dict[str, list[dict]] = {name: [] for name in methods}
    for i, image in enumerate(images):
        if i in failed:
            image = {name: {"file": batch.files[i].name, "attrs_start": _plain(batch.a0[i]),
                            "attrs_source": batch.a0_source, "success": False, "error": failed[i]}
                     for name in methods}
        for name, record in image.items():
            results.setdefault(name, []).append(record)
    return results


def collect(entries: dict[str, dict], files: list[Path]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Journal entries -> records per method and skipped files, in the order of `files`."""
    records: dict[str, list[dict]] = {}
    skipped = []
    for file in files:
        entry = entries.get(file.name)
        if entry is None:
            continue
        if "skipped" in entry:
            skipped.append({"file": file.name, "reason": entry["skipped"]})
        for method, record in entry.get("records", {}).items():
            records.setdefault(method, []).append(record)
    return records, skipped


def require_usable(records: dict[str, list[dict]], skipped: list[dict], images: Path) -> None:
    """Fail when no image came through: failed records (NaN or inf) count as unusable too, or
    a report of failures only would claim a run."""
    rows = [record for method in records.values() for record in method]
    if all("error" in record for record in rows):
        reason = rows[0]["error"] if rows else skipped[0]["reason"] if skipped else "none found"
        raise SiaError(f"no usable image in {images}: {reason}")


class ImagePlan(Plan):
    """A run over a folder of images in fixed batches, one record per image and method.

    Subclasses give `attack_images(context, batch) -> {method: records}` and
    `write_reports(context, records, skipped, complete)`.
    """

    what = "sia run"

    def __init__(self, config: RunConfig):
        self.config = config
        self.began = time.perf_counter()
        self.methods: tuple[str, ...] = ()  # keys of attack_images' result

    def finished(self, out: Path) -> Path | None:
        """A report that marks `out` as a finished run: its own, or a comparison's. A report
        marked incomplete (an interrupted run) is not one: rerunning resumes it."""
        candidates = [out / REPORT, out / COMPARISON] + [out / name / REPORT for name in METHODS]
        return next((path for path in candidates if path.exists() and _complete(path)), None)

    def clear(self, out: Path) -> None:
        remove_run(out)

    def units(self, context: Context, done: dict[str, dict]):
        """Batches of this rank's blocks, each with the files skipped since the previous one."""
        skipped: list[dict] = []
        for batch in batches(context.inputs, context.batch_size, context.device, skipped, done, context.world):
            yield list(skipped), batch
            skipped.clear()
        if skipped:
            yield skipped, None

    def work(self, context: Context, unit) -> list[dict]:
        skipped, batch = unit
        entries = [{"file": item["file"], "skipped": item["reason"]} for item in skipped]
        if batch is not None:
            results = _work_or_fail(lambda b: self.attack_images(context, b), batch, self.methods)
            entries += [{"file": file.name, "records": {m: rows[i] for m, rows in results.items()}}
                        for i, file in enumerate(batch.files)]
        return entries

    def check_usable(self, context: Context, entries: dict[str, dict]) -> None:
        require_usable(*collect(entries, context.inputs.files), self.config.images)

    def write(self, context: Context, entries: dict[str, dict], complete: bool):
        records, skipped = collect(entries, context.inputs.files)
        return self.write_reports(context, records, skipped, complete)

    def seconds(self) -> float:
        return time.perf_counter() - self.began

    def attack_images(self, context: Context, batch: Batch) -> dict[str, list[dict]]:
        raise NotImplementedError

    def write_reports(self, context: Context, records: dict[str, list[dict]], skipped: list[dict], complete: bool):
        raise NotImplementedError


def _complete(report: Path) -> bool:
    try:
        return json.loads(report.read_text(encoding="utf-8")).get("complete", True) is not False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: never overwrite it without --force


class AttackPlan(ImagePlan):
    """`sia attack`: every requested method on every batch, one report per method."""

    what = "sia attack"
    task = "attack"

    def __init__(self, config: RunConfig):
        super().__init__(config)
        # Each method once: `sia,sia` would otherwise record every image twice.
        self.chosen = [get_method(name) for name in dict.fromkeys(config.methods)]
        if not self.chosen:
            raise SiaError("--method names no method: choose from " + ", ".join(METHODS))
        self.methods = tuple(m.name for m in self.chosen)
        single = len(self.chosen) == 1
        self.runs = {m.name: MethodRun(m, config.out if single else config.out / m.name) for m in self.chosen}

    def attack_images(self, context: Context, batch: Batch) -> dict[str, list[dict]]:
        config, inputs = self.config, context.inputs
        clean = clean_pass(inputs, batch)  # once for every method
        results = {}
        for method in self.chosen:
            state = attack_batch(inputs.backbone, inputs.target, method, batch.x0, batch.a0, clean["reference"],
                                 config.settings, inputs.protected, seed=config.seed + batch.index)
            results[method.name] = self.runs[method.name].add(batch, inputs, clean, state, config.settings,
                                                              config.keep_lost)
        return results

    def write_reports(self, context: Context, records: dict[str, list[dict]], skipped: list[dict], complete: bool):
        for name, run in self.runs.items():
            run.records = records.get(name, [])
        reports = {name: _method_report(self.config, context, run, skipped, self.seconds(), complete)
                   for name, run in self.runs.items() if run.records}
        for name, report in reports.items():
            write_json_atomic(self.runs[name].folder / REPORT, report)
        if len(self.runs) > 1 and complete:
            comparison = {name: {k: r[k] for k in ("attack_success_rate", "psnr", "ssim")}
                          for name, r in reports.items()}
            images = len(next(iter(self.runs.values())).records)
            write_json_atomic(self.config.out / COMPARISON, {"methods": comparison, "images": images})
        return {"reports": reports, "skipped": skipped, "seconds": self.seconds()} if reports else None


def attack(config: RunConfig, progress: ProgressFn = silent) -> dict:
    """Run every requested method over the folder; write adversaries and reports into `out`.
    Returns the reports on rank 0 (None on other torchrun ranks)."""
    config = align_inputs(config, progress)
    return execute(config, AttackPlan(config), progress)


def _method_report(config: RunConfig, context: Context, run: MethodRun, skipped: list, seconds: float,
                   complete: bool = True) -> dict:
    inputs = context.inputs
    return {
        **base_report(config, context),
        "method": run.method.name,
        "method_summary": run.method.summary,
        **run.summary(),
        **findings_trust(inputs, run.records),
        "images": run.records,
        "skipped": skipped,
        "timing": {"total_s": round(seconds, 3)},
        "complete": complete,
    }


def remove_run(out: Path) -> None:
    """`--force`: clear a previous run's outputs we own, nothing else.

    A stale adversary or report (an image since removed, a method not rerun) would otherwise
    sit next to the new report as if it belonged to it.
    """
    out = Path(out)
    for folder in [out] + [out / name for name in METHODS]:
        shutil.rmtree(folder / "adversaries", ignore_errors=True)
        (folder / REPORT).unlink(missing_ok=True)
    (out / COMPARISON).unlink(missing_ok=True)
