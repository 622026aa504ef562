"""Evaluation report: ``metrics.json`` plus one self-contained ``report.html``.

The HTML has no external references: styles are inline and every figure is a base64 PNG drawn with
matplotlib's Agg canvas, imported only when a report is written (importing pixelvote stays cheap).
The keys of ``metrics`` are documented in docs/evaluation.md; every section is optional.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT_VERSION", "PAPER_FIGURES", "to_jsonable", "write_report"]

FORMAT_VERSION = 1

#: The seed paper's figures (arXiv 2502.17824), with its own, unstated IoU protocol.
PAPER_FIGURES: dict[str, dict[str, float]] = {
    "tbx11k": {"accuracy": 0.9304, "iou": 0.3607},
    "fire": {"accuracy": 0.964, "iou": 0.647},
}
PAPER_LABEL = "paper (arXiv 2502.17824)"

_GROUP_ORDER = ("best", "worst", "flagged")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}
tr.ensemble td,tr.consensus td{font-weight:bold}tr.prior td{background:#fff7e0}
tr.paper td{color:#666;font-style:italic}
.note{color:#555;font-size:.92em}.figs{display:flex;flex-wrap:wrap;gap:1em}.figs img{max-width:100%}
figure{margin:1em 0}figcaption{color:#444;font-size:.92em}
"""


# --------------------------------------------------------------------------- public


def write_report(
    metrics: Mapping[str, Any], gallery: Sequence[Mapping[str, Any]], out_dir: str | Path
) -> Path:
    """Write ``out_dir/metrics.json`` and ``out_dir/report.html``; return the HTML's path.

    Args:
        metrics: the evaluation's figures (keys in docs/evaluation.md; any section may be absent).
        gallery: cases to show, each ``{"image": HxWx3 uint8, "truth": HxW mask | None,
            "consensus": HxW mask, "members": {name: HxW CAM}, "uncertainty": HxW map,
            "caption": str, "group": "best" | "worst" | "flagged" | other, "title": str}``; only
            ``image`` is required.
        out_dir: created if needed; both files are written atomically (temp file + rename).
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"expected `metrics` to be a mapping but got {type(metrics).__name__}")
    if isinstance(gallery, str | bytes) or not isinstance(gallery, Sequence):
        raise TypeError(f"expected `gallery` to be a list of dicts but got {type(gallery).__name__}")
    items = [_check_item(i, item) for i, item in enumerate(gallery)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable({"format_version": FORMAT_VERSION, **metrics})
    _write_atomic(out / "metrics.json", json.dumps(data, indent=2, allow_nan=False) + "\n")
    page = _render(data, items)
    path = out / "report.html"
    _write_atomic(path, page)
    return path


def to_jsonable(obj: Any) -> Any:
    """Tensors and arrays to lists, numpy scalars to Python, NaN/inf to None, paths to strings."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"expected JSON-compatible metrics but got {type(obj).__name__}: {obj!r:.80}")


# --------------------------------------------------------------------------- helpers


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_item(i: int, item: Any) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise TypeError(f"expected gallery[{i}] to be a dict but got {type(item).__name__}")
    image = _np(item.get("image"))
    if image is None or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        shape = None if image is None else image.shape
        raise ValueError(f"expected gallery[{i}]['image'] of shape (H, W, 3) but got {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected gallery[{i}]['image'] of dtype uint8 but got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    out = dict(item)
    out["image"] = image[:, :, :3]
    for key in ("truth", "consensus", "uncertainty"):
        arr = _np(item.get(key))
        if arr is not None and arr.ndim != 2:
            raise ValueError(f"expected gallery[{i}]['{key}'] of shape (H, W) but got {arr.shape}")
        out[key] = arr
    members = item.get("members") or {}
    if not isinstance(members, Mapping):
        raise TypeError(
            f"expected gallery[{i}]['members'] to be a dict of CAMs but got {type(members).__name__}"
        )
    out["members"] = {str(k): _np(v) for k, v in members.items()}
    for name, cam in out["members"].items():
        if cam is None or cam.ndim != 2:
            raise ValueError(
                f"expected gallery[{i}]['members'][{name!r}] of shape (H, W)"
                f" but got {getattr(cam, 'shape', None)}"
            )
    return out


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _pct(x: Any) -> str:
    v = _num(x)
    return "—" if v is None else f"{100 * v:.2f}"


def _dec(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.{digits}f}"


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return _dec(x, 4)
    return "—" if x is None else _e(x)


def _table(header: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{_e(cls)}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _paper_rows(dataset: str | None) -> list[tuple[str, dict[str, float]]]:
    key = (dataset or "").lower()
    match = [(k, v) for k, v in PAPER_FIGURES.items() if key.startswith(k)]
    return match or list(PAPER_FIGURES.items())


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Any, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{_png(fig)}" alt="{_e(alt)}">{cap}</figure>'


def _confusion_figure(cm: list[list[int]], names: list[str]) -> str:
    arr = np.asarray(cm, dtype=float)
    fig = _figure(1.6 + 0.6 * len(names), 1.3 + 0.6 * len(names))
    ax = fig.subplots()
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = arr.max() if arr.size else 0
    for (r, c), v in np.ndenumerate(arr):
        ax.text(c, r, f"{int(v)}", ha="center", va="center", color="white" if v > top / 2 else "black")
    return _img(fig, "confusion matrix")


def _sweep_figure(sweep: Mapping[str, Any], prior: float | None) -> str:
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    th = sweep.get("thresholds") or []
    for key, style in (("mean_iou", "-"), ("pooled_iou", "--")):
        ys = [np.nan if v is None else v for v in sweep.get(key) or []]
        if ys:
            ax.plot(th, ys, style, label=f"consensus {key.replace('_', ' ')}")
    for name, member in (sweep.get("members") or {}).items():
        ys = [np.nan if v is None else v for v in member.get("mean_iou") or []]
        if ys:
            ax.plot(member.get("thresholds") or th, ys, ":", label=f"{name} mean iou")
    if prior is not None:
        ax.axhline(prior, color="orange", lw=1, label="centred-box prior (mean)")
    best = sweep.get("best_threshold")
    if _num(best) is not None:
        ax.axvline(best, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("threshold (map ≥ t)")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _img(
        fig,
        "IoU against threshold",
        f"best threshold {_dec(best, 2)}: mean IoU {_pct(sweep.get('best_mean_iou'))}%",
    )


def _reliability_figure(cal: Mapping[str, Any]) -> str:
    fig = _figure(4.2, 4.0)
    ax = fig.subplots()
    lo, hi = np.asarray(cal.get("lower") or []), np.asarray(cal.get("upper") or [])
    acc = np.asarray([np.nan if v is None else v for v in cal.get("accuracy") or []], dtype=float)
    conf = np.asarray([np.nan if v is None else v for v in cal.get("confidence") or []], dtype=float)
    if len(lo):
        ax.bar(
            lo, np.nan_to_num(acc), width=hi - lo, align="edge", edgecolor="k", alpha=0.7, label="accuracy"
        )
        ax.plot((lo + hi) / 2, conf, "r.", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"ECE {_dec(cal.get('ece'))} ({cal.get('n_bins', len(lo))} bins)", fontsize=9)
    return _img(fig, "reliability diagram")


def _risk_figure(name: str, rc: Mapping[str, Any]) -> str:
    fig = _figure(4.6, 3.6)
    ax = fig.subplots()
    ax.plot(rc.get("coverage") or [], rc.get("risk") or [], label=f"AURC {_dec(rc.get('aurc'))}")
    for c in (0.8, 0.9):
        ax.axvline(c, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("coverage (most certain first)")
    ax.set_ylabel("selective risk")
    ax.set_xlim(0, 1)
    ax.set_title(f"{name} (ranked by {rc.get('uncertainty', 'uncertainty')})", fontsize=9)
    ax.legend(fontsize=7)
    return _img(fig, f"risk-coverage {name}")


def _gallery_figure(item: Mapping[str, Any]) -> str:
    import matplotlib

    image = item["image"]
    h, w = image.shape[:2]
    extent = (0, w, h, 0)
    panels: list[tuple[str, Any]] = [("image", None)]
    if item.get("truth") is not None:
        panels.append(("truth", item["truth"]))
    if item.get("consensus") is not None:
        panels.append(("consensus", item["consensus"]))
    panels += [(name, cam) for name, cam in item["members"].items()]
    if item.get("uncertainty") is not None:
        panels.append(("uncertainty", item["uncertainty"]))
    fig = _figure(2.1 * len(panels), 2.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    jet = matplotlib.colormaps["jet"]
    for ax, (name, arr) in zip(axes, panels, strict=True):
        ax.imshow(image, extent=extent)
        if name in ("truth", "consensus"):
            m = np.asarray(arr).astype(bool)
            colour = (0.1, 0.9, 0.1, 0.45) if name == "truth" else (1.0, 0.1, 0.1, 0.45)
            rgba = np.zeros((*m.shape, 4))
            rgba[m] = colour
            ax.imshow(rgba, extent=extent)
        elif name == "uncertainty":
            ax.imshow(np.asarray(arr, dtype=float), cmap="magma", alpha=0.7, extent=extent)
        elif arr is not None:
            cam = np.asarray(arr, dtype=float)
            span = np.nanmax(cam) - np.nanmin(cam) if cam.size else 0
            norm = (cam - np.nanmin(cam)) / span if span > 0 else np.zeros_like(cam)
            ax.imshow(jet(norm), alpha=0.5, extent=extent)
        ax.set_title(name, fontsize=8)
        ax.set_axis_off()
    return _img(fig, str(item.get("title") or "case"), str(item.get("caption") or ""))


# --------------------------------------------------------------------------- sections


def _render(m: Mapping[str, Any], items: list[dict[str, Any]]) -> str:
    dataset = m.get("dataset")
    title = m.get("title") or f"pixelvote evaluation{' — ' + str(dataset) if dataset else ''}"
    parts = [
        f"<h1>{_e(title)}</h1>",
        _intro(m),
        _classification_section(m),
        _pixel_section(m),
        _fusion_section(m.get("fusion")),
        _sweep_section(m),
        _calibration_section(m),
        _flags_section(m.get("flags")),
        _gallery_section(items),
    ]
    body = "\n".join(p for p in parts if p)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _intro(m: Mapping[str, Any]) -> str:
    facts = []
    for key in ("dataset", "n_images", "classes", "run", "created"):
        if m.get(key) is not None:
            value = ", ".join(map(str, m[key])) if isinstance(m[key], list) else m[key]
            facts.append(f"<li><b>{_e(key)}</b>: {_e(value)}</li>")
    return f"<ul>{''.join(facts)}</ul>" if facts else ""


def _classification_section(m: Mapping[str, Any]) -> str:
    cls = m.get("classification") or {}
    if not cls:
        return ""
    cal_ece = (m.get("calibration") or {}).get("ece")
    header = ["model", "n", "accuracy %", "balanced acc. %", "F1 macro %", "AUROC", "ECE"]
    rows: list[tuple[str, Sequence[str]]] = []

    def row(name: str, r: Mapping[str, Any], css: str, ece: Any = None) -> None:
        cells = [_e(name), _e(r.get("n", "—")), _pct(r.get("accuracy")), _pct(r.get("balanced_accuracy"))]
        cells += [_pct(r.get("f1_macro")), _dec(r.get("auroc")), _dec(r.get("ece", ece))]
        rows.append((css, cells))

    for name, r in (cls.get("members") or {}).items():
        row(name, r, "member")
    if cls.get("ensemble"):
        row("ensemble", cls["ensemble"], "ensemble", cal_ece)
    for key, fig in _paper_rows(m.get("dataset")):
        rows.append(("paper", [_e(f"{PAPER_LABEL}, {key}"), "—", _pct(fig["accuracy"]), "—", "—", "—", "—"]))
    out = ["<h2>Classification</h2>", _table(header, rows)]
    ev = cls.get("decision_evidence")
    if ev:
        a, b, c = (_e(round(ev[k], 3)) for k in ("logit_coef", "evidence_coef", "intercept"))
        out.append(f"<p>Diagnosis rule: a finding where {a} × logit P(any finding) + {b} × colour evidence "
                   f"+ {c} &gt; 0 (the colour evidence: the strongest small window that both the models look "
                   f"at and has the finding's colour, colour weight {_e(ev['colour_weight'])}; fitted on the "
                   f"run's validation images, kept because it beat the threshold on held-out halves; every "
                   f"model above decides so). With the most probable class instead the ensemble's accuracy "
                   f"is {_pct(cls.get('accuracy_most_probable'))} %.</p>")
    elif cls.get("decision_threshold") is not None:
        rule = _e(cls["decision_threshold"])
        out.append(f"<p>Diagnosis rule: a finding where P(any finding) &gt; {rule} (chosen by accuracy on "
                   f"the run's validation images; every model above decides so). With the most probable "
                   f"class instead the ensemble's accuracy is "
                   f"{_pct(cls.get('accuracy_most_probable'))} %.</p>")
    ens = cls.get("ensemble") or {}
    if ens.get("confusion_matrix"):
        cm = ens["confusion_matrix"]
        names = ens.get("class_names") or [str(i) for i in range(len(cm))]
        cm_rows = [("", [_e(n)] + [_e(v) for v in r]) for n, r in zip(names, cm, strict=False)]
        out += [
            "<h3>Ensemble confusion matrix (rows: true, columns: predicted)</h3>",
            '<div class="figs">',
            _table(["true \\ predicted", *names], cm_rows),
            _confusion_figure(cm, names),
            "</div>",
        ]
    return "\n".join(out)


def _pixel_section(m: Mapping[str, Any]) -> str:
    px = m.get("pixel") or {}
    if not px:
        return ""
    header = [
        "masks",
        "images",
        "mean IoU %",
        "pooled IoU %",
        "mean Dice %",
        "pooled Dice %",
        "pointing game %",
    ]
    pg = px.get("pointing_game") or {}
    rows: list[tuple[str, Sequence[str]]] = []

    def row(name: str, r: Mapping[str, Any], css: str, key: str) -> None:
        cells = [
            _e(name),
            _e(r.get("scored", r.get("images", "—"))),
            _pct(r.get("mean_iou")),
            _pct(r.get("pooled_iou")),
        ]
        cells += [_pct(r.get("mean_dice")), _pct(r.get("pooled_dice")), _pct(pg.get(key))]
        rows.append((css, cells))

    if px.get("consensus"):
        row("consensus", px["consensus"], "consensus", "consensus")
    for name, r in (px.get("members") or {}).items():
        row(name, r, "member", name)
    if px.get("prior"):
        row("centred-box prior (½ width × ½ height)", px["prior"], "prior", "prior")
    for key, fig in _paper_rows(m.get("dataset")):
        rows.append(("paper", [_e(f"{PAPER_LABEL}, {key}"), "—", _pct(fig["iou"]), "—", "—", "—", "—"]))
    protocol = px.get("protocol", "mask")
    images = px.get("images", "positives")
    empty = px.get("empty_score", 1.0)
    note = (
        "Foreground-only IoU and Dice. "
        + (
            "Truth = the filled union of the annotated boxes (box protocol). "
            if protocol == "box"
            else "Truth = the annotated masks. "
        )
        + f"Images scored: {_e(images)}. "
        + "Mean = average of per-image scores; pooled = Σ intersection / Σ union. "
        + f"Both masks empty scores {_e(empty if empty is not None else 'nothing (left out)')}. "
        + "The paper's protocol is not stated: compare with care. An IoU means something only next to the "
        "centred-box prior."
    )
    parts = ["<h2>Localisation</h2>", _table(header, rows), f'<p class="note">{note}</p>']
    by_group = px.get("by_group") or {}
    if by_group.get("groups"):
        grows = [("member", [_e(g), _e(r.get("images")), _pct(r.get("mean_iou")), _pct(r.get("mean_dice"))])
                 for g, r in by_group["groups"].items()]
        parts += ["<h3>Consensus masks by group</h3>",
                  _table(["group", "images", "mean IoU %", "mean Dice %"], grows),
                  f'<p class="note">Groups by the run\'s --group-pattern {_e(by_group.get("pattern"))}: '
                  "a mean over several sources (videos, patients, scanners) can hide the one where the masks "
                  "fail.</p>"]
    return "\n".join(parts)


def _fusion_section(fusion: Any) -> str:
    if not fusion:
        return ""
    if isinstance(fusion, Mapping):
        columns, rows = list(fusion.get("columns") or []), list(fusion.get("rows") or [])
    else:  # a list of dicts
        columns = list(dict.fromkeys(k for r in fusion for k in r))
        rows = [[r.get(c) for c in columns] for r in fusion]
    body = [("", [_cell(v) for v in (r.values() if isinstance(r, Mapping) else r)]) for r in rows]
    return "\n".join(["<h2>Fusion rules</h2>", _table([str(c) for c in columns], body)])


def _sweep_section(m: Mapping[str, Any]) -> str:
    sweep = m.get("threshold_sweep")
    if not sweep or not sweep.get("thresholds"):
        return ""
    prior = _num(((m.get("pixel") or {}).get("prior") or {}).get("mean_iou"))
    return "\n".join(["<h2>Threshold sweep</h2>", _sweep_figure(sweep, prior)])


def _calibration_section(m: Mapping[str, Any]) -> str:
    figs = []
    if (m.get("calibration") or {}).get("lower"):
        figs.append(_reliability_figure(m["calibration"]))
    table_rows: list[tuple[str, Sequence[str]]] = []
    for name, rc in (m.get("risk_coverage") or {}).items():
        if rc and rc.get("coverage"):
            figs.append(_risk_figure(name, rc))
            cells = [_e(name), _e(rc.get("uncertainty", "—")), _dec(rc.get("aurc")), _dec(rc.get("e_aurc"))]
            table_rows.append(("", cells + [_dec(rc.get("risk_at_80")), _dec(rc.get("risk_at_90"))]))
    if not figs:
        return ""
    out = ["<h2>Calibration and selective prediction</h2>", f'<div class="figs">{"".join(figs)}</div>']
    if table_rows:
        header = ["risk", "ranked by", "AURC", "excess AURC", "risk @ 80% coverage", "risk @ 90% coverage"]
        out.append(_table(header, table_rows))
        out.append(
            '<p class="note">Risk = misclassification (classification) or 1 − IoU (localisation); '
            "lower is better. Mean IoU at a coverage = 1 − its localisation risk.</p>"
        )
    return "\n".join(out)


def _flags_section(flags: Any) -> str:
    if not flags:
        return ""
    labels = {
        "n": "images",
        "flagged": "flagged",
        "flag_rate": "flag rate %",
        "errors": "misclassified",
        "errors_caught": "errors caught % (misclassified that are flagged)",
        "flag_precision": "flag precision % (flagged that are misclassified)",
        "accuracy_flagged": "accuracy of flagged %",
        "accuracy_unflagged": "accuracy of unflagged %",
        "mean_iou_flagged": "mean IoU of flagged %",
        "mean_iou_unflagged": "mean IoU of unflagged %",
    }
    rows = []
    for key, value in flags.items():
        label = labels.get(key, key)
        text = _pct(value) if label.endswith("%") or " % " in label else _cell(value)
        rows.append(("", [_e(label), text]))
    return "\n".join(["<h2>Review flags</h2>", _table(["", "value"], rows)])


def _gallery_section(items: list[dict[str, Any]]) -> str:
    if not items:
        return ""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        groups.setdefault(str(item.get("group") or "cases"), []).append(item)
    order = [g for g in _GROUP_ORDER if g in groups] + [g for g in groups if g not in _GROUP_ORDER]
    out = ["<h2>Gallery</h2>"]
    for group in order:
        out.append(f"<h3>{_e(group)}</h3>")
        out += [_gallery_figure(item) for item in groups[group]]
    return "\n".join(out)
