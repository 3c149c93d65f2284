"""How far a run's findings can be trusted: backbone fit, blind spots and the warnings a user reads.

Every adversary is a generator output, so a finding is only about the model where the
backbone (a) reconstructs the image without already changing the model's prediction, (b)
knows images like these, and (c) can edit the attribute in question. The per-image facts are
recorded by the run (`runs.records_for`); the functions here turn them into `backbone_fit`,
`blind_spots` and one-line `warnings`. All but `calibrate_domain` are pure functions of records
and the backbone's card. The thresholds are documented, with the measurements behind them, in
the README section "When not to trust a diagnosis".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# An image is in the backbone's domain when its critic margin (AttGAN.critic_scores: the critic's
# score of the image minus that of its reconstruction) reaches this fraction of the median margin
# on the backbone's own training distribution. Measured on the default backbone: synth faces 0.63
# or more of the median, LFW faces, LFW non-faces and scikit-image photos 0.36 or less.
DOMAIN_MARGIN_FRACTION = 0.5
# Where the card calibrates it (cards written since), the margin must instead reach the 1st
# percentile of the margins on the training distribution: one fraction of the median does not
# fit every backbone's spread (for the counterfactual-trained default half the median is its 5th
# percentile, and 1 synth face in 8 fell out; for the AttGAN-recipe backbone before it, 0.66 of
# the median).
DOMAIN_MARGIN_PERCENTILE = 1
# ... and, where the card calibrates it, when the critic's score of the image itself reaches the
# 1st percentile of its scores on the training distribution. A backbone that reconstructs
# sharply (the default, trained on counterfactuals) has a narrow margin on everything, photos
# included (56% of them passed the margin rule alone); its critic still scores every LFW face and aligned photo far
# below its own faces (docs/backbone.md, "Backbone fit").
DOMAIN_SCORE_PERCENTILE = 1
# backbone_fit.ok needs at least this share of images in the domain ...
IN_DOMAIN_SHARE = 0.9
# ... though one image may fall out of a run of at least this many. The floors are 1st
# percentiles, so about 2 in 100 of the backbone's own faces fall below one of them: below 10
# images a share of 90% would tolerate none, and 1 run of 8 fresh synth faces in 7 would be
# called unfit by chance alone (docs/backbone.md, "Becoming the default"). Below 5 images one
# out is a fifth or more of the run: not allowed.
OUT_OF_DOMAIN_ALLOWED_FROM = 5
# ... and at most this share lost in reconstruction (the findings must rest on most images).
LOST_SHARE_LIMIT = 0.5
# A warning (not a failure) from this share of lost images on.
LOST_SHARE_WARNING = 0.2
# An image whose shorter side is under 1/UPSCALE_LIMIT of the backbone's size is drawn up that
# many times over: most of what the backbone and the model see of it is interpolation.
UPSCALE_LIMIT = 2
# Attributes the backbone edits in fewer faces than this are blind spots.
EDIT_SUCCESS_FLOOR = 0.5


@torch.no_grad()
def calibrate_domain(backbone, images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 64) -> dict:
    """The critic's margins and scores on images of the backbone's training distribution (in
    [0, 1]), for its card."""
    margins, scores = [], []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size] * 2 - 1
        found = backbone.critic_scores(x, backbone(x, attrs[start:start + batch_size]))
        if found is None:
            return {}
        scores.append(found[0].cpu())
        margins.append(found[1].cpu())
    margin, score = torch.cat(margins).numpy(), torch.cat(scores).numpy()
    return {"critic_margin_median": round(float(np.median(margin)), 4),
            "critic_margin_p05": round(float(np.percentile(margin, 5)), 4),
            "critic_margin_floor": round(float(np.percentile(margin, DOMAIN_MARGIN_PERCENTILE)), 4),
            "critic_score_floor": round(float(np.percentile(score, DOMAIN_SCORE_PERCENTILE)), 4),
            "critic_score_median": round(float(np.median(score)), 4), "images": int(len(margin))}


def in_domain(margin: float | None, card: dict, score: float | None = None) -> bool | None:
    """Whether one image's critic margin (and, where the card calibrates it, its critic score)
    says the backbone knows images like it (None: cannot tell)."""
    domain = card.get("domain") or {}
    median = domain.get("critic_margin_median")
    if margin is None or median is None or not median > 0:
        return None
    floor = domain.get("critic_score_floor")
    if floor is not None:
        if score is None:
            return None
        if score < floor:
            return False
    margin_floor = domain.get("critic_margin_floor")
    return bool(margin >= (margin_floor if margin_floor is not None else DOMAIN_MARGIN_FRACTION * median))


def _share(flags: Sequence[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def fit_rule(domain: dict) -> str:
    """The backbone-fit rule in words, as `in_domain` and `backbone_fit` apply it for this calibration."""
    margin = ("its calibrated margin floor" if domain.get("critic_margin_floor") is not None
              else f"{DOMAIN_MARGIN_FRACTION} x its calibrated median margin")
    score = " and a critic score of at least its calibrated floor" if domain.get("critic_score_floor") is not None else ""
    return (f"ok when at least {IN_DOMAIN_SHARE:.0%} of images (or all but one of {OUT_OF_DOMAIN_ALLOWED_FROM} or more) have a "
            f"critic margin of at least {margin}{score}, and at most {LOST_SHARE_LIMIT:.0%} are lost in reconstruction")


def backbone_fit(records: Sequence[dict], card: dict) -> dict:
    """How well the backbone fits this run's images, from the usable image records.

    `ok` is True when the domain can be judged, at least IN_DOMAIN_SHARE of the images are in
    it (or all but one of at least OUT_OF_DOMAIN_ALLOWED_FROM) and at most LOST_SHARE_LIMIT
    are lost in reconstruction; False when either fails; None
    when the backbone carries no domain calibration (its card lacks `domain`), which a gate
    treats as not ok.
    """
    usable = [r for r in records if not r.get("error")]
    lost = [bool(r.get("lost_in_reconstruction")) for r in usable if "lost_in_reconstruction" in r]
    domain = [r["in_domain"] for r in usable if r.get("in_domain") is not None]
    mae = [r["reconstruction_mae"] for r in usable if r.get("reconstruction_mae") is not None]
    ssim = [r["reconstruction_ssim"] for r in usable if r.get("reconstruction_ssim") is not None]
    margins = [r["critic_margin"] for r in usable if r.get("critic_margin") is not None]
    lost_share, domain_share = _share(lost), _share(domain) if len(domain) == len(usable) else None
    reasons = []
    if domain_share is None:
        reasons.append("the backbone carries no domain calibration (card.json 'domain'): fit to these images unknown")
    elif domain_share < IN_DOMAIN_SHARE and not (len(domain) >= OUT_OF_DOMAIN_ALLOWED_FROM and sum(domain) == len(domain) - 1):
        reasons.append(f"{domain_share:.0%} of the images look like the backbone's training data "
                       f"(needs {IN_DOMAIN_SHARE:.0%})")
    if lost_share is not None and lost_share > LOST_SHARE_LIMIT:
        reasons.append(f"{lost_share:.0%} of the images are lost in reconstruction (at most {LOST_SHARE_LIMIT:.0%})")
    ok = None if domain_share is None and len(reasons) == 1 else not reasons
    return {
        "ok": ok,
        "reasons": reasons,
        "images": len(usable),
        "lost_in_reconstruction": lost_share,
        "lost_files": [r["file"] for r in usable if r.get("lost_in_reconstruction")],
        "in_domain": domain_share,
        "critic_margin_median": float(np.median(margins)) if margins else None,
        "critic_margin_reference": (card.get("domain") or {}).get("critic_margin_median"),
        "reconstruction_mae": float(np.mean(mae)) if mae else None,
        "reconstruction_ssim": float(np.mean(ssim)) if ssim else None,
        "rule": fit_rule(card.get("domain") or {}),
    }


def edit_success(card: dict, attributes: Sequence[str]) -> dict[str, float] | None:
    """The backbone's measured per-attribute edit success, None when it was never measured."""
    measured = card.get("edit_success")
    if not isinstance(measured, dict):
        return None
    return {name: float(measured[name]) for name in attributes if isinstance(measured.get(name), (int, float))}


def blind_spots(card: dict, attributes: Sequence[str], protected: Sequence[str] = ()) -> list[str] | None:
    """Unprotected attributes the backbone edits in fewer than EDIT_SUCCESS_FLOOR of faces.

    None when edit success was never measured: then no attribute can be cleared either.
    """
    rates = edit_success(card, attributes)
    if rates is None:
        return None
    return [name for name in attributes
            if name not in protected and (name not in rates or rates[name] < EDIT_SUCCESS_FLOOR)]


def attribute_source_note(records: Sequence[dict]) -> str | None:
    """A warning when the discriminator, not a file, supplied the starting attributes."""
    estimated = [r for r in records if r.get("attrs_source") == "discriminator"]
    if not estimated:
        return None
    confidence = [r["attrs_confidence"] for r in estimated if r.get("attrs_confidence") is not None]
    shown = f" (mean confidence {np.mean(confidence):.2f} on a 0-1 scale)" if confidence else ""
    return (f"starting attributes of {len(estimated)} image(s) were estimated by the backbone's discriminator"
            f"{shown}, not read from --attrs-file: outside its training data they are guesses, and so are "
            "the --group-by groups built on them")


def warnings_for(fit: dict, blind: list[str] | None, records: Sequence[dict], assumptions: Sequence[str] = (),
                 grouped: bool = False, measures_include_lost: bool = False, aligned: bool = False) -> list[str]:
    """One-line warnings for the terminal, report.json and the HTML banner, most serious first.
    `aligned`: the images are --align's crops (else a fit that fails suggests it)."""
    out = []
    if fit.get("ok") is False:
        out.append("backbone does not fit these images: " + "; ".join(fit["reasons"])
                   + ". The findings may describe the backbone, not the model"
                   + ("" if aligned else " (photos? --align finds their faces and frames them as the backbone's "
                      "training faces were)"))
    elif fit.get("ok") is None:
        out.append("; ".join(fit["reasons"]))
    lost = fit.get("lost_in_reconstruction")
    # Said here unless the fit's reasons already say it (above the limit): a fit refused for its
    # domain must not hide that many images were lost too.
    if lost is not None and LOST_SHARE_WARNING <= lost and not (lost > LOST_SHARE_LIMIT and fit.get("ok") is False):
        out.append(f"{lost:.0%} of the images are lost in reconstruction (the backbone's reconstruction alone "
                   "changes the prediction); they are left out of the success rate and the measures")
    if measures_include_lost:
        out.append("every usable image was lost in reconstruction: the measures include them and describe the "
                   "backbone as much as the model")
    if blind is None:
        out.append("the backbone's per-attribute edit success was never measured: an attribute it cannot edit "
                   "would look like one the model ignores")
    elif blind:
        named = ", ".join(blind) if len(blind) <= 5 else f"{len(blind)} attributes ({', '.join(blind[:3])}, ...)"
        out.append(f"blind spots: the backbone edits {named} in fewer than {EDIT_SUCCESS_FLOOR:.0%} of faces; "
                   "a low sensitivity to them means 'cannot tell', not 'not sensitive'")
    small = [r for r in records if r.get("upscaled_from")]
    if small:
        least = min(small, key=lambda r: r["upscaled_from"])
        out.append(f"{len(small)} image(s) were upscaled more than {UPSCALE_LIMIT}x to the backbone's size (the "
                   f"smallest, {least['file']}, from {least['upscaled_from']} px): findings on them rest on "
                   "interpolated pixels (see upscaled_from in report.json)")
    note = attribute_source_note(records)
    if note:
        out.append(note + (" (--group-by used)" if grouped else ""))
    out.extend(assumptions)
    return out

