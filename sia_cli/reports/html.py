"""The self-contained HTML pages: `report.html` of a diagnosis or attack, `hardening.html`, and the
headline sentence the terminal prints too."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sia_cli.measures.sensitivity import ranking, shown_intervals
from sia_cli.measures.table import FALLBACK, TABLE, report_key
from sia_cli.reports.figures import edit_rate_text
from sia_cli.runs.files import json_ready, write_bytes_atomic
from sia_cli.text import first_few

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.25em .7em;border-bottom:1px solid #e5e5e5;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f5f5f5} .headline{background:#fdf2e9}
.warning{background:#fff3cd;border:1px solid #e0b000;padding:.8em 1em;border-radius:4px;font-weight:bold}
.lead{font-size:1.15em} .muted{color:#666;font-size:.9em} code{font-size:.9em}
img{max-width:100%;height:auto;border:1px solid #eee} .wide{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def significant(value: Any, digits: int = 3) -> str:
    """A raw effect with `digits` significant digits: 0.00042, never 0.000."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}g}"
    return "—"


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "—"


def _interval_text(interval: dict | None, digits: int = 3, number=significant) -> str:
    if not interval or not all(isinstance(interval.get(end), (int, float)) and math.isfinite(interval[end])
                               for end in ("low", "high")):
        return ""
    return f"[{number(interval.get('low'), digits)}, {number(interval.get('high'), digits)}]"


def _mean(value: Any) -> float | None:
    """Report figures may be a number, a list of per-image values or a {"mean": ...} summary."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, (list, tuple)):
        finite = [v for v in value if isinstance(v, (int, float)) and math.isfinite(v)]
        return float(np.mean(finite)) if finite else None
    return value if isinstance(value, (int, float)) else None


def _with_unit(text: str, unit: str) -> str:
    return text if text == "—" else f"{text} {unit}"


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (list, tuple)) else int(value or 0)


def _image_count(images: Any) -> str:
    """Count, and how many of the per-image records failed (they are left out of the measures)."""
    if not isinstance(images, (list, tuple)):
        return str(_count(images))
    failed = sum(1 for r in images if isinstance(r, dict) and r.get("error"))
    return f"{len(images)} ({failed} failed, left out)" if failed else str(len(images))


def _image_tag(png_path: Path, alt: str) -> str:
    encoded = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{_e(alt)}">'


def _headline(report: dict) -> tuple[str, str]:
    """(measure name, report key of its raw values), falling back to Eq. 2 when absent."""
    name = (report.get("settings") or {}).get("headline", FALLBACK.name)
    key = report_key(name)
    if not report.get(key + "_normalized"):
        return FALLBACK.name, FALLBACK.key
    return name, key


def _descriptor(label: str, item: dict | None) -> str:
    item = item or {}
    name = item.get("name") or Path(str(item.get("path", "?"))).name
    sha = str(item.get("sha256") or "")[:12]
    kind = f" ({_e(item['kind'])})" if item.get("kind") else ""
    return f"<div><b>{_e(label)}:</b> <code>{_e(name)}</code>{kind} <span class='muted'>sha256 {_e(sha)}</span></div>"


def headline_sentence(report: dict, top_k: int = 3) -> str:
    """The one-sentence finding, in plain text: it names an attribute only when that attribute's
    interval clears the runner-up's (`stands_out`), and says when the backbone does not fit."""
    name, key = _headline(report)
    shares = report.get(key + "_normalized") or {}
    order = ranking(shares)
    if not order:
        return "No attribute sensitivities were measured."
    winner = report.get("stands_out")
    evidence = report.get("evidence") or {}
    effect = report.get("effect") or {}
    if evidence.get("enough") is False:
        counted, minimum = evidence.get("counted_images"), evidence.get("minimum_images")
        text = (f"Too few images to name an attribute: {counted} counted image{'s' if counted != 1 else ''} "
                f"measured, and a finding needs at least {minimum}. Diagnose more images.")
        winner = None
    elif effect.get("moves") is False:
        largest, floor = significant(effect["largest"]), significant(effect["floor"])
        if effect["largest"] > effect["floor"]:  # above the floor, but within chance on these images
            text = (f"No edit moves the model clearly more than the reconstruction alone does: the edit that "
                    f"moves it most changes its output by {largest} ({effect['unit']}), against {floor} for the "
                    "reconstruction alone, within chance on these images; no attribute is ranked. Diagnose more images.")
        else:
            text = (f"The model hardly moves under any edit: the edit that moves it most changes its output by "
                    f"{largest} ({effect['unit']}), less than the reconstruction alone does ({floor}); "
                    "no attribute is ranked.")
        winner = None
    elif winner in shares:
        size = ""
        if effect.get("moves") is not None and winner in (report.get(key) or {}):
            size = f", {significant(report[key][winner])} {effect['unit']}"
        text = (f"The model is most sensitive to {winner}: {shares[winner]:.2f} of total{size} ({name}; its interval "
                "clears the runner-up's).")
    else:
        leaders = ", ".join(f"{a} {shares[a]:.2f}" for a in order[:top_k])
        text = f"No single attribute stands out (the leaders' intervals overlap); leaders by {name}: {leaders}."
    blind = [name for name in report.get("blind_spots") or [] if name != winner]
    if blind:
        shown = first_few(blind, 5)
        text += (f" The backbone cannot edit {shown} in most faces (blind spot{'s' if len(blind) > 1 else ''}): "
                 f"the model may depend on {'them' if len(blind) > 1 else 'it'} more than shown.")
    fit = (report.get("backbone_fit") or {}).get("ok")
    if fit is False:
        text += " The backbone does not fit these images well enough to trust this (see the warnings)."
    elif fit is None:
        text += " Whether the backbone fits these images is unknown (see the warnings)."
    return text


def _top_attributes(report: dict, top_k: int) -> str:
    name, key = _headline(report)
    shares = report.get(key + "_normalized") or {}
    order = ranking(shares)[:top_k]
    if not order:
        return "<p>No attribute sensitivities were measured.</p>"
    edit = (report.get("backbone") or {}).get("edit_success") or {}
    blind = set(report.get("blind_spots") or [])

    lead = f"<p class='lead'>{_e(headline_sentence(report))}</p>"
    if (report.get("evidence") or {}).get("enough") is False or (report.get("effect") or {}).get("moves") is False:
        return lead  # the sentence says why nothing is ranked
    effect = report.get("effect") or {}
    raw = report.get(key) or {}

    def item(attribute: str) -> str:
        note = f" <span class='muted'>(blind spot: backbone edit success {edit_rate_text(edit[attribute])})</span>" \
            if attribute in blind and attribute in edit else ""
        size = f" ({significant(raw[attribute])} {_e(effect['unit'])})" if effect.get("unit") and attribute in raw \
            and effect.get("moves") is not None else ""
        return f"<li>{_e(attribute)}: {shares[attribute]:.2f} of total{size}{note}</li>"

    return f"{lead}<p class='muted'>headline measure: {_e(name)}</p><ol>{''.join(item(a) for a in order)}</ol>"


def _warnings_banner(report: dict) -> str:
    warnings = report.get("warnings") or []
    if not warnings:
        return ""
    fit = report.get("backbone_fit") or {}
    title = "Do not trust this diagnosis as it stands" if fit.get("ok") is not True else "Read these findings with care"
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f"<div class='warning'><p>{_e(title)}:</p><ul>{items}</ul></div>"


def _measure_columns(report: dict) -> list[tuple[str, str]]:
    """(title, raw-values key) for each measure present in the report."""
    return [(measure.title, measure.key) for measure in TABLE if report.get(measure.key)]


def _table_order(report: dict, headline_key: str, columns: list[tuple[str, str]]) -> list[str]:
    """Headline ranking first, then attributes only another measure has (none may be hidden)."""
    order = ranking(report.get(headline_key) or {})
    for _, key in columns:
        order += [name for name in ranking(report.get(key) or {}) if name not in order]
    return order


def _measures_table(report: dict) -> str:
    headline_key = _headline(report)[1]
    columns = _measure_columns(report)
    intervals = shown_intervals(report)
    flips = report.get("flip_rate") or {}
    header = "<tr><th>attribute</th>"
    for title, key in columns:
        mark = " class='headline'" if key == headline_key else ""
        header += f"<th{mark}>{_e(title)} raw</th><th{mark}>95% interval</th><th{mark}>share</th>"
    header += "<th>flip rate</th>" if flips else ""
    edit = (report.get("backbone") or {}).get("edit_success") or {}
    blind = set(report.get("blind_spots") or [])
    header += "<th>backbone edit success</th></tr>"
    body = []
    for attribute in _table_order(report, headline_key, columns):
        cells = [f"<td>{_e(attribute)}</td>"]
        for _, key in columns:
            raw, shares = report.get(key) or {}, report.get(key + "_normalized") or {}
            interval = _interval_text((intervals.get(key) or {}).get(attribute))
            cells.append(f"<td>{significant(raw.get(attribute))}</td><td>{_e(interval)}</td>"
                         f"<td>{_number(shares.get(attribute), 2)}</td>")
        if flips:
            cells.append(f"<td>{_number(flips.get(attribute), 2)}</td>")
        rate = edit_rate_text(edit[attribute]) if attribute in edit else "—"
        cells.append(f"<td>{rate}{' (blind spot)' if attribute in blind else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{header}{''.join(body)}</table>"


def _summary_table(report: dict) -> str:
    intervals = shown_intervals(report)
    asr = report.get("attack_success_rate")
    fit = report.get("backbone_fit") or {}
    percent = lambda v: f"{v * 100:.1f} %" if isinstance(v, (int, float)) else "—"  # noqa: E731
    rows = [
        ("attack success rate (lost and already-wrong images left out)", percent(asr)),
        ("success against the reference label, all images", percent(report.get("attack_success_rate_vs_label"))),
        ("success against the reconstruction's prediction",
         percent(report.get("attack_success_rate_vs_reconstruction"))),
        ("lost in reconstruction", percent(fit.get("lost_in_reconstruction"))),
        ("images like the backbone's training data", percent(fit.get("in_domain"))),
        ("backbone fit", {True: "ok", False: "NOT ok", None: "unknown"}.get(fit.get("ok"), "—")),
        ("SDAR", f"{_number(report.get('sdar'), 4)} {_interval_text(intervals.get('sdar'), 4, _number)}".strip()),
        ("mean PSNR (adversary vs reconstruction)", _with_unit(_number(_mean(report.get("psnr")), 2), "dB")),
        ("mean PSNR (adversary vs clean image)", _with_unit(_number(_mean(report.get("psnr_vs_clean")), 2), "dB")),
        ("mean SSIM (vs reconstruction / vs clean)",
         f"{_number(_mean(report.get('ssim')), 3)} / {_number(_mean(report.get('ssim_vs_clean')), 3)}"),
        ("images", _image_count(report.get("images"))),
        ("skipped files", str(len(report.get("skipped") or []))),
    ]
    return "<table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _skipped_list(report: dict) -> str:
    skipped = report.get("skipped") or []
    if not skipped:
        return ""
    items = "".join(f"<li><code>{_e(s.get('file', '?'))}</code>: {_e(s.get('reason', ''))}</li>" for s in skipped)
    return f"<h2>Skipped files</h2><ul>{items}</ul>"


def _groups_section(report: dict) -> str:
    groups = report.get("groups")
    if not groups:
        return ""
    rows = []
    for name, group in groups.items():
        group = group if isinstance(group, dict) else {}
        shares = group.get("sensitivity_normalized") or group.get("sensitivity") or {}
        top = ", ".join(f"{a} {shares[a]:.2f}" for a in ranking(shares)[:3])
        rows.append(f"<tr><td>{_e(name)}</td><td>{_e(_count(group.get('images')))}</td>"
                    f"<td>{_number(group.get('sdar'), 4)}</td><td>{_e(top)}</td></tr>")
    return ("<h2>Sub-populations</h2><table><tr><th>group</th><th>images</th><th>SDAR</th>"
            f"<th>top attributes (share)</th></tr>{''.join(rows)}</table>")


def _details(report: dict) -> str:
    timing = report.get("timing") or {}
    timing_rows = "".join(f"<tr><td>{_e(k)}</td><td>{_number(v, 1)} s</td></tr>" for k, v in timing.items())
    settings = json.dumps(json_ready(report.get("settings") or {}), indent=2, sort_keys=True)
    return (f"<h2>Run</h2><div><b>command:</b> <code>{_e(report.get('command', ''))}</code></div>"
            f"<div class='muted'>sia {_e(report.get('version', '?'))}</div>"
            f"<table>{timing_rows}</table><details><summary>settings</summary><pre>{_e(settings)}</pre></details>")


def explanation_sentence(report: dict) -> str | None:
    """What `--explanations` found, in the words the terminal and the HTML page share."""
    section = report.get("explanations")
    if not section:
        return None
    if not section.get("images"):
        return "Explanations: no image could be measured."
    settings, attack = section["settings"], section.get("attack") or {}
    interval = _interval_text(((section.get("intervals") or {}).get("attack") or {}).get("top_k_intersection"), 2,
                              _number)
    text = (f"Explanations: under the feature-importance attack (eps {settings['explain_epsilon'] * 255:.3g}/255, "
            f"{settings['explain_steps']} steps) the map keeps {_number(attack.get('top_k_intersection'), 2)} "
            f"{interval + ' ' if interval else ''}of its top-{settings['k']} pixels, Kendall's tau "
            f"{_number(attack.get('kendall_tau'), 2)}, on {attack.get('images', 0)} images whose prediction it kept"
            + (f" ({attack['unattacked']} more changed their prediction at every step: not measured)"
               if attack.get("unattacked") else "") + ".")
    order, shift = section.get("ranking") or [], section.get("sensitivity") or {}
    winner = section.get("stands_out")
    if winner:
        text += (f" The edit that moves it most without changing the prediction: {winner} "
                 f"({shift[winner]:.2f} of the top-k pixels lost; its interval clears the runner-up's).")
    elif order:
        leaders = ", ".join(f"{name} {shift[name]:.2f}" for name in order[:3])
        text += f" No single edit stands out in moving it (leaders' intervals overlap): {leaders}."
    too_few = section.get("too_few") or []
    if too_few:
        text += (f" Not ranked: {first_few(too_few, 5)} (their edits kept the prediction on fewer than "
                 f"{section.get('minimum_faces')} faces).")
    blind = [name for name in report.get("blind_spots") or [] if name in shift]
    if blind:
        text += f" Blind spots (the backbone cannot edit them in most faces): {first_few(blind, 5)}."
    return text


def _explanations_section(report: dict, figures: dict) -> str:
    section = report.get("explanations")
    if not section:
        return ""
    settings = section["settings"]
    intro = (f"<p class='muted'>Maps: {_e(settings['maps'])}. k = {settings['k']} of {settings['pixels']} pixels "
             f"({_e(settings['k_rule'])}). The attack: top-k feature-importance attack of Ghorbani et al., L-inf "
             f"{settings['explain_epsilon'] * 255:.3g}/255, {settings['explain_steps']} steps of "
             f"{settings['explain_step_size'] * 255:.3g}/255, keeping the prediction. Explanation sensitivity of an "
             "attribute: 1 - the top-k intersection between the map of the reconstruction and of the one-attribute "
             "edit, on the faces where the edit kept the prediction.</p>")
    parts = [f"<h2>Explanations</h2><p class='lead'>{_e(explanation_sentence(report))}</p>", intro]
    if "histogram" in figures:
        parts.append(_image_tag(figures["histogram"], "explanation sensitivity histogram"))
    shift = section.get("sensitivity") or {}
    if shift:
        parts.append(_explanations_table(report, section))
    if "overlays" in figures:
        parts.append("<p class='muted'>Each row: the clean image, the attacked image and the edit that moved its map "
                     "most, each under its map (red to yellow: more important). Images saved as 8-bit PNG.</p>")
        parts.append(_image_tag(figures["overlays"], "attribution maps of clean images, attacked images and edits"))
    return "".join(parts)


def _explanations_table(report: dict, section: dict) -> str:
    shift, ranked = section["sensitivity"], section.get("ranking") or []
    intervals = (section.get("intervals") or {}).get("sensitivity") or {}
    edit = (report.get("backbone") or {}).get("edit_success") or {}
    too_few, blind = set(section.get("too_few") or []), set(report.get("blind_spots") or [])
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{_number(shift[name], 3)}</td>"
        f"<td>{_e(_interval_text(intervals.get(name), 2, _number))}</td>"
        f"<td>{_number((section.get('kendall_tau') or {}).get(name), 2)}</td>"
        f"<td>{section['kept'][name]} / {section['flipped'][name]}{' (too few)' if name in too_few else ''}</td>"
        f"<td>{edit_rate_text(edit[name]) if name in edit else '—'}{' (blind spot)' if name in blind else ''}</td></tr>"
        for name in ranked + sorted(set(shift) - set(ranked)))
    return ("<table><tr><th>attribute</th><th>explanation sensitivity</th><th>95% interval</th>"
            "<th>Kendall's tau</th><th>faces kept / flipped</th><th>backbone edit success</th></tr>"
            f"{rows}</table>")


def report_html(path: str | os.PathLike, report: dict, sensitivity_png: Path, grid_png: Path | None,
                top_k: int = 5, explanation_figures: dict | None = None) -> None:
    """One self-contained page (inline CSS, base64 images) summarising a diagnosis report."""
    banner = ("<p class='warning'>Incomplete run: this report covers only the images processed so far.</p>"
              if report.get("complete") is False else "")
    grid = f"<h2>Examples</h2>{_image_tag(grid_png, 'original, reconstruction and adversary')}" if grid_png else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SIA report</title><style>{_CSS}</style></head>
<body>
<h1>Semantic Image Attack report</h1>
{banner}
{_warnings_banner(report)}
{_descriptor("target", report.get("target"))}
{_descriptor("backbone", report.get("backbone"))}
<h2>Which attributes the model is sensitive to</h2>
{_top_attributes(report, top_k)}
{_image_tag(sensitivity_png, "sensitivity histogram")}
<h2>Summary</h2>
{_summary_table(report)}
<h2>Sensitivity measures</h2>
<p class="muted">Attribute shift is paper Eq. 2 measured from the starting attributes a0 (the paper writes a1).
Shares are each measure divided by its total; the highlighted columns are the headline measure.
Protected attributes are left out.</p>
<div class="wide">{_measures_table(report)}</div>
{_groups_section(report)}
{grid}
{_explanations_section(report, explanation_figures or {})}
{_skipped_list(report)}
{_details(report)}
</body></html>
"""
    write_bytes_atomic(path, page.encode("utf-8"))


def _evaluation_rows(summary: dict) -> str:
    """Table 4 and 5 shape: one row per figure, before and after side by side."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows = [("clean accuracy", before.get("clean_accuracy"), after.get("clean_accuracy"))]
    for method in ("fgsm", "pgd", "sia"):
        for eps in summary.get("eval_eps") or []:
            rows.append((f"accuracy under {method.upper()}, eps {eps}",
                         (before.get("accuracy_under_attack") or {}).get(method, {}).get(eps),
                         (after.get("accuracy_under_attack") or {}).get(method, {}).get(eps)))
    rows.append(("SDAR", before.get("sdar"), after.get("sdar")))
    rows.append(("attribute that stands out", before.get("stands_out"), after.get("stands_out")))
    if before.get("attributional") or after.get("attributional"):
        for key, name in (("top_k_intersection", "top-k intersection under the feature-importance attack"),
                          ("kendall_tau", "Kendall's tau under the feature-importance attack"),
                          ("explanation_stands_out", "edit that moves the explanation most (stands out)")):
            rows.append((name, (before.get("attributional") or {}).get(key), (after.get("attributional") or {}).get(key)))
    cells = "".join(f"<tr><td>{_e(name)}</td><td>{_number(a, 4) if not isinstance(a, str) else _e(a)}</td>"
                    f"<td>{_number(b, 4) if not isinstance(b, str) else _e(b)}</td></tr>" for name, a, b in rows)
    return f"<table><tr><th></th><th>before</th><th>after</th></tr>{cells}</table>"


def hardening_html(path: str | os.PathLike, summary: dict, out: Path) -> None:
    """`sia harden`'s page: the before/after figures and the two sensitivity histograms side by side."""
    pictures = []
    for side in ("before", "after"):
        png = Path(out) / side / "diagnosis" / "sensitivity.png"
        pictures.append(f"<figure><figcaption>{side}</figcaption>{_image_tag(png, f'sensitivity {side}')}</figure>"
                        if png.is_file() else f"<figure><figcaption>{side}</figcaption><p class='muted'>no report "
                                                "(pass --eval-images)</p></figure>")
    unfit = [side for side in ("before", "after") if (summary.get(side) or {}).get("backbone_fit_ok") is False]
    warning = (f"<p class='warning'>The backbone does not fit the held-out images ({', '.join(unfit)}): SDAR and the "
               "sensitivities there describe the backbone as much as the model; see each side's report.html.</p>"
               if unfit else "")
    reference = (summary.get("after") or summary.get("before") or {}).get("reference", "")
    training = summary.get("training") or {}
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>SIA hardening</title><style>{_CSS}
.side {{ display: flex; gap: 1em; flex-wrap: wrap; }} .side figure {{ margin: 0; }}</style></head>
<body>
<h1>Hardening: before and after</h1>
{warning}
<div><b>model:</b> <code>{_e(summary.get('model'))}</code> &rarr; <code>{_e(summary.get('hardened_model'))}</code></div>
<div class="muted">{_e(summary.get('mode'))}; labels: {_e(summary.get('labels'))}; {_e(training.get('steps'))} steps,
mix {_e(summary.get('mix'))}, lr {_e(summary.get('lr'))}</div>
<h2>On the held-out images</h2>
<p class="muted">Accuracy against {_e(reference)}. Each figure comes from a full report under before/ and after/.</p>
{_evaluation_rows(summary)}
<h2>Sensitivity (headline measure, share of total)</h2>
<div class="side">{''.join(pictures)}</div>
<h2>Run</h2><div><b>command:</b> <code>{_e(summary.get('command', ''))}</code></div>
</body></html>
"""
    write_bytes_atomic(path, page.encode("utf-8"))


