"""`sia diagnose --explanations`: how far the model's explanations move, and which edits move them.

Two measures, both of integrated-gradient maps made by captum (`engine.attribution`) and
compared by top-k intersection and Kendall's tau (`measures.explanations`), as the ART paper
evaluates attributional robustness:

- under attack: the map of each clean image against the map after the top-k feature-importance
  attack, which keeps the prediction (section 4 of the paper);
- under edits: per attribute, the map of the reconstruction against the map of its one-attribute
  edit, on the faces whose prediction the edit kept. An edit that moves the explanation and not
  the prediction is what an "explanation sensitivity" bar shows.

Per image the records carry the raw values; `explanation_report` turns them into the report's
section, with bootstrap intervals, withholding attributes measured on too few faces.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sia_cli.backbone.attgan import edited
from sia_cli.engine.attribution import (
    ExplanationSettings,
    attribution_maps,
    explanation_shifts,
    feature_importance_attack,
)
from sia_cli.errors import SiaError
from sia_cli.measures import sensitivity as sens
from sia_cli.measures.explanations import kendall_tau, pixel_importance, top_k_intersection
from sia_cli.reports.figures import attribution_overlay, grid_png, save_png_atomic, sensitivity_png, to_uint8

OVERLAYS = "explanations"  # folder of each image's overlays: clean | attacked | edit
OVERLAY_COLUMNS = ("clean, its map", "attacked, its map", "edit, its map")
SHIFT_TOP_K, SHIFT_TAU = "explanation_shift_top_k", "explanation_shift_tau"


def check_explainable(target, size: int, settings: ExplanationSettings, device) -> None:
    """One clear line, before any image is attacked, where the settings cannot run or the model
    has no class score to explain (keypoints, landmarks, regression)."""
    try:
        settings.check(size * size)
    except ValueError as error:
        raise SiaError(str(error)) from None
    target.check_class_scores(size, device)


def _value(v: float) -> float | None:
    return round(float(v), 6) if math.isfinite(float(v)) else None


def explain_batch(target, backbone, x0: torch.Tensor, a0: torch.Tensor, reference: torch.Tensor,
                  settings: ExplanationSettings, protected: torch.Tensor | None = None
                  ) -> tuple[list[dict], list[np.ndarray]]:
    """Per image of a batch (x0 in [0, 1]): its record fields and its overlays (one HxWx3 strip:
    clean | attacked | the unprotected edit that moved its map most, grey where none kept the
    prediction)."""
    x = x0 * 2 - 1
    k = settings.k_for(x.shape[-2] * x.shape[-1])
    attack = feature_importance_attack(target, x, reference, k, settings.explain_epsilon, settings.explain_steps,
                                       settings.explain_step_size, measure_steps=settings.explain_ig_steps)
    attack_top = top_k_intersection(attack["clean_maps"], attack["attacked_maps"], k)
    attack_tau = kendall_tau(attack["clean_maps"], attack["attacked_maps"])
    attrs = (a0 > 0.5).to(a0.dtype)
    names = backbone.attributes
    shifts = explanation_shifts(target, backbone, x, attrs, reference, k, steps=settings.explain_ig_steps)
    top = np.full((len(x), len(names)), np.nan)
    tau = np.full((len(x), len(names)), np.nan)
    for column, name in enumerate(names):
        entry = shifts[name]
        top[entry["kept"], column] = entry["top_k_intersection"]
        tau[entry["kept"], column] = entry["kendall_tau"]
    shown = top.copy()
    if protected is not None:
        shown[:, protected.cpu().numpy().astype(bool)] = np.nan  # the report leaves them out too
    moved = [int(np.nanargmin(row)) if np.isfinite(row).any() else None for row in shown]
    edit_maps = _edit_maps(target, backbone, x, attrs, reference, moved, settings)
    fields, strips = [], []
    for i in range(len(x)):
        # Where every step changed the prediction the clean map stands unattacked: not measured
        # (the authors' evaluation leaves such images out too).
        attacked = int(attack["steps_kept"][i]) > 0
        fields.append({
            "explanation_attack_top_k": _value(attack_top[i]) if attacked else None,
            "explanation_attack_tau": _value(attack_tau[i]) if attacked else None,
            "explanation_attack_steps_kept": int(attack["steps_kept"][i]),
            SHIFT_TOP_K: [_value(v) for v in top[i]],
            SHIFT_TAU: [_value(v) for v in tau[i]],
            "explanation_edit": names[moved[i]] if moved[i] is not None else None,
            "explanation_edit_top_k": _value(top[i, moved[i]]) if moved[i] is not None else None,
        })
        panels = [_overlay(x0[i], attack["clean_maps"][i]),
                  _overlay((attack["adversaries"][i] + 1) / 2, attack["attacked_maps"][i])]
        if i in edit_maps:
            image, attribution = edit_maps[i]
            panels.append(_overlay((image + 1) / 2, attribution))
        else:
            panels.append(np.full_like(panels[0], 225))
        strips.append(np.concatenate(panels, axis=1))
    return fields, strips


@torch.no_grad()
def _edits(backbone, x: torch.Tensor, attrs: torch.Tensor, chosen: list[tuple[int, int]]) -> torch.Tensor:
    rows = []
    for i, column in chosen:
        flipped, _ = edited(attrs[i:i + 1], column, backbone.attributes)
        rows.append(backbone(x[i:i + 1], flipped))
    return torch.cat(rows)


def _edit_maps(target, backbone, x, attrs, reference, moved, settings) -> dict[int, tuple]:
    chosen = [(i, column) for i, column in enumerate(moved) if column is not None]
    if not chosen:
        return {}
    images = _edits(backbone, x, attrs, chosen)
    rows = [i for i, _ in chosen]
    maps = attribution_maps(target, images, reference[rows], steps=settings.explain_ig_steps)
    return {i: (images[n], maps[n]) for n, i in enumerate(rows)}


def _overlay(image: torch.Tensor, attribution: torch.Tensor) -> np.ndarray:
    importance = pixel_importance(attribution.unsqueeze(0)).view(*attribution.shape[-2:]).cpu().numpy()
    return attribution_overlay(to_uint8(image.detach().clamp(0, 1).cpu()), importance)


def save_overlays(out: Path, names: list[str], strips: list[np.ndarray]) -> None:
    from PIL import Image

    folder = out / OVERLAYS
    folder.mkdir(parents=True, exist_ok=True)
    for name, strip in zip(names, strips):
        save_png_atomic(folder / name, Image.fromarray(strip))


def overlay_panels(strip: np.ndarray) -> dict[str, np.ndarray]:
    """A saved strip back into its three panels, by OVERLAY_COLUMNS."""
    return dict(zip(OVERLAY_COLUMNS, np.array_split(strip, len(OVERLAY_COLUMNS), axis=1)))


def overlay_caption(record: dict) -> str:
    top, tau = record.get("explanation_attack_top_k"), record.get("explanation_attack_tau")
    if top is None:
        return ""
    edit, value = record.get("explanation_edit"), record.get("explanation_edit_top_k")
    moved = f"; edit {edit}: top-k {value:.2f}" if edit is not None and value is not None else ""
    return f"attacked: top-k {top:.2f}, tau {'n/a' if tau is None else f'{tau:.2f}'}{moved}"


def write_figures(out: Path, report: dict, telling: list[dict]) -> dict[str, Path]:
    """explanation_sensitivity.png (the histogram, attributes measured on enough faces) and
    explanations.png (overlays of the grid's images); the paths drawn, by name."""
    section = report["explanations"]
    drawn = {}
    shown = {name: section["sensitivity"][name] for name in section.get("ranking", [])}
    if shown:
        intervals = (section.get("intervals") or {}).get("sensitivity")
        sensitivity_png(out / "explanation_sensitivity.png", shown, intervals,
                        title="explanation sensitivity (1 - top-k intersection)",
                        edit_success=report["backbone"].get("edit_success"), blind_spots=report.get("blind_spots") or (),
                        leader=section.get("stands_out"))
        drawn["histogram"] = out / "explanation_sensitivity.png"
    rows = [{**{k: row[k] for k in OVERLAY_COLUMNS}, "file": row["file"], "caption": row["explanation_caption"]}
            for row in telling if all(k in row for k in OVERLAY_COLUMNS)]
    if rows:
        grid_png(out / "explanations.png", rows, columns=OVERLAY_COLUMNS)
        drawn["overlays"] = out / "explanations.png"
    return drawn


# ----------------------------------------------------------------------------- the report's section

def _attack_means(records) -> dict[str, float]:
    top = [r["explanation_attack_top_k"] for r in records if r.get("explanation_attack_top_k") is not None]
    tau = [r["explanation_attack_tau"] for r in records if r.get("explanation_attack_tau") is not None]
    return {"top_k_intersection": float(np.mean(top)) if top else float("nan"),
            "kendall_tau": float(np.mean(tau)) if tau else float("nan")}


def _moved(records, attributes, protected) -> dict[str, float]:
    """Explanation sensitivity: 1 - the mean top-k intersection of an attribute's kept edits."""
    return {name: 1.0 - v for name, v in sens.mean_of_measured(records, SHIFT_TOP_K, attributes, protected).items()}


def explanation_report(records: list[dict], attributes: list[str], protected: list[str],
                       settings: ExplanationSettings, pixels: int, bootstrap: int, seed: int) -> dict:
    """The report's `explanations` section from the image records (see the module's docstring)."""
    measured = [r for r in records if "error" not in r and SHIFT_TOP_K in r]
    section = {
        "settings": {**asdict(settings), "k": settings.k_for(pixels), "pixels": pixels,
                     "maps": f"integrated gradients from a mid-grey image, {settings.explain_ig_steps} steps (captum), "
                             "of the reference class's logit; a pixel's importance is the sum of |attribution| over channels",
                     "k_rule": "100/1024 of the image's pixels (the ART paper's 100 of 32x32) unless --explain-k"},
        "images": len(measured),
    }
    if not measured:
        return section
    attack = _attack_means(measured)
    shift = _moved(measured, attributes, protected)
    kept = sens.count_measured(measured, SHIFT_TOP_K, attributes, protected)
    tau = sens.mean_of_measured(measured, SHIFT_TAU, attributes, protected)
    enough = {name for name, n in kept.items() if sens.enough_images(n)}
    intervals = {}
    if bootstrap > 0 and len(measured) > 1:
        intervals = {
            "attack": sens.bootstrap(measured, _attack_means, n=bootstrap, seed=seed),
            "sensitivity": sens.bootstrap(measured, lambda r: _moved(r, attributes, protected), n=bootstrap, seed=seed),
        }
    ranked = {name: shift[name] for name in shift if name in enough}
    section.update({
        "attack": {**attack, "images": sum(r.get("explanation_attack_top_k") is not None for r in measured),
                   "unattacked": sum(r.get("explanation_attack_steps_kept") == 0 for r in measured)},
        "sensitivity": shift,
        "kendall_tau": tau,
        "kept": kept,
        "flipped": {name: len(measured) - n for name, n in kept.items()},
        "intervals": intervals,
        "minimum_faces": sens.MIN_COUNTED_IMAGES,
        "too_few": sorted(set(shift) - enough),
        "ranking": sens.ranking(ranked),
        "stands_out": sens.stands_out(ranked, intervals.get("sensitivity"), len(measured)) if ranked else None,
    })
    return section
