"""What an image run writes down: one record per image and method, adversary PNGs, the attack
summary, the descriptors of the inputs and the fields every report starts with."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sia_cli import __version__
from sia_cli.engine.attack import AttackSettings, Method
from sia_cli.inputs.align import ALIGNED, alignment_summary, alignment_warnings
from sia_cli.inputs.images import not_images
from sia_cli.measures import trust
from sia_cli.reports.figures import image_quality, save_png_atomic, to_uint8
from sia_cli.runs.distributed import current
from sia_cli.runs.inputs import Batch, Inputs, RunConfig, adversary_names
from sia_cli.runs.lifecycle import Context
from sia_cli.text import first_few

SCHEMA_VERSION = 1


REPORT = "report.json"


COMPARISON = "comparison.json"


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
    made it fail (see sia_cli.measures.trust)."""
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
    # How far the reconstruction alone moves the model: the floor under which an edit's effect
    # cannot be told from the backbone's (sensitivity.reconstruction_floor).
    moved = target.distance(clean["reconstruction_out"], clean["clean"]).float().cpu()
    scores, margins = clean.get("critic") or (None, None)
    card = inputs.backbone.info.card
    records = []
    for i, (file, problem) in enumerate(zip(batch.files, failures(clean, state))):
        record = {"file": file.name, "attrs_start": plain(batch.a0[i]), "attrs_source": batch.a0_source}
        if batch.sides and batch.sides[i] * trust.UPSCALE_LIMIT < inputs.backbone.img_size:
            record["upscaled_from"] = batch.sides[i]
        if batch.a0_source == "discriminator":
            record["attrs_confidence"] = round(float((batch.a0[i] - 0.5).abs().mean() * 2), 4)
        if problem is None:
            margin = float(margins[i]) if margins is not None else None
            score = float(scores[i]) if scores is not None else None
            record.update(
                attrs_end=plain(state.a[i]), label=plain(label[i]), pred_clean=plain(pred_clean[i]),
                pred_reconstruction=plain(pred_reconstruction[i]), pred_adv=plain(pred_adv[i]),
                lost_in_reconstruction=bool(lost[i]), already_wrong=bool(already_wrong[i]),
                counted=bool(counted[i]), success=bool(success_vs_label[i] & counted[i]),
                success_vs_label=bool(success_vs_label[i]),
                success_vs_reconstruction=bool(success_vs_reconstruction[i]),
                reconstruction_mae=round(float(mae[i]), 6),
                reconstruction_effect=float(moved[i]),
                critic_margin=round(margin, 4) if margin is not None else None,
                critic_score=round(score, 4) if score is not None else None,
                in_domain=trust.in_domain(margin, card, score),
            )
        else:
            record.update(success=False, error=problem)
        records.append(record)
    return records


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
                   measures_include_lost: bool = False, aligned: bool = False) -> dict:
    """backbone_fit, blind_spots and warnings of a run's records (see sia_cli.measures.trust)."""
    card = inputs.backbone.info.card
    fit = trust.backbone_fit(records, card)
    blind = trust.blind_spots(card, inputs.backbone.attributes, protected_names(inputs))
    assumptions = list(getattr(inputs.target, "assumptions", []) or [])
    warnings = trust.warnings_for(fit, blind, records, assumptions, grouped, measures_include_lost, aligned)
    return {"backbone_fit": fit, "blind_spots": blind, "warnings": warnings}


def aligned_inputs(config: RunConfig) -> dict | None:
    """With --align: what the alignment made of the photos (sia_cli.inputs.align), else None."""
    if not getattr(config, "align", False):
        return None
    return alignment_summary(Path(config.out) / ALIGNED)


def account_for_inputs(report: dict, config: RunConfig) -> None:
    """Every file of --images that the run did not read is in `skipped` with its reason: photos
    --align dropped (its warnings join the others) and files that are not images."""
    unread = list(report.get("skipped") or [])  # unreadable images, rows missing from --attrs-file
    if unread:
        names = first_few((f"{item['file']} ({item['reason']})" for item in unread), 3, "; ")
        report["warnings"] = list(report.get("warnings") or []) + [
            f"{len(unread)} image(s) skipped: {names}; see skipped in report.json"]
    others = not_images(Path(config.images), [config.attrs_file, config.labels])
    if others:
        report["skipped"] = list(report.get("skipped") or []) + others
        names = first_few((item["file"] for item in others), 5)
        report["warnings"] = list(report.get("warnings") or []) + [
            f"{len(others)} file(s) in {config.images} are not images by their extension and were not read: {names}"]
    summary = aligned_inputs(config)
    if summary is None:
        return
    report["alignment"] = summary
    report["skipped"] = list(summary["skipped"]) + list(report.get("skipped") or [])
    report["warnings"] = list(report.get("warnings") or []) + alignment_warnings(summary)


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


def plain(value: torch.Tensor):
    """Rounded plain numbers; NaN and inf become None, which strict JSON can hold."""
    value = value.detach().float().cpu()
    if value.dim() == 0:
        return round(value.item(), 6) if torch.isfinite(value) else None
    return [round(v, 6) if np.isfinite(v) else None for v in value.flatten().tolist()] if value.dim() == 1 \
        else [plain(row) for row in value]
