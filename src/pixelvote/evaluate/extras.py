"""Report sections that ``write_report`` does not draw yet: warnings and notes, the box protocol, the
uncertainty scores, the shortcut check and the skipped inputs. Added to report.html after it is written
(once: a page that already has them is left alone)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pixelvote.data.imageio import write_bytes_atomic

__all__ = ["append_extras", "extras_html", "notes_html"]

_MARK = '<section id="pixelvote-evaluate-extras">'
_MAX_LISTED = 50


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _f(x: Any, pct: bool = False) -> str:
    if not isinstance(x, int | float) or isinstance(x, bool):
        return "—"
    return f"{100 * x:.2f}" if pct else f"{x:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _listed(title: str, entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return ""
    items = "".join(f"<li>{_e(e.get('image'))}: {_e(e.get('reason'))}</li>" for e in entries[:_MAX_LISTED])
    more = f"<p class='note'>… and {len(entries) - _MAX_LISTED} more (see metrics.json)</p>" \
        if len(entries) > _MAX_LISTED else ""
    return f"<h3>{_e(title)} ({len(entries)})</h3><ul>{items}</ul>{more}"


def notes_html(m: Mapping[str, Any]) -> str:
    """Warnings and notes, for the top of the page."""
    warnings, notes = m.get("warnings") or [], m.get("notes") or []
    if not (warnings or notes):
        return ""
    lis = [f"<li><b>Warning:</b> {_e(w)}</li>" for w in warnings] + [f"<li>{_e(n)}</li>" for n in notes]
    return f"{_MARK}<h2>Warnings and notes</h2><ul>{''.join(lis)}</ul></section>"


def extras_html(m: Mapping[str, Any]) -> str:
    """Box IoU, uncertainty scores, shortcut check and unused inputs, for before the gallery."""
    parts: list[str] = []
    box = (m.get("pixel") or {}).get("box_iou")
    if box:
        rows = [[_e(k), _f(v, pct=True)] for k, v in box.items() if k != "definition"]
        parts.append("<h2>Box protocol: box IoU of the CAM-derived box</h2>"
                     + _table(["masks", "box IoU %"], rows)
                     + f"<p class='note'>{_e(box.get('definition', ''))}</p>")
    scores = m.get("uncertainty_scores") or {}
    if scores:
        rows = [[_e(k), _f((v.get("classification") or {}).get("aurc")), _f((v.get("classification") or {})
                .get("e_aurc")), _f((v.get("localisation") or {}).get("aurc")),
                 _f((v.get("localisation") or {}).get("e_aurc"))] for k, v in scores.items()]
        parts.append("<h2>Uncertainty scores</h2>" + _table(
            ["score", "AURC (misclassification)", "excess", "AURC (1 − IoU)", "excess"], rows)
            + "<p class='note'>Lower is better; each score ranks the images most certain first.</p>")
    sc = m.get("shortcut_check") or {}
    if sc.get("checked"):
        rows = [[_e(k), _f(v, pct=True)] for k, v in (sc.get("by_features") or {}).items()]
        rows.append(["majority class", _f(sc.get("majority_rate"), pct=True)])
        parts.append("<h2>Shortcut check</h2>" + _table(["label predicted from", "CV accuracy %"], rows)
                     + f"<p class='note'>{_e(sc.get('method', ''))}; over {_e(sc.get('n'))} images.</p>")
    listed = _listed("Skipped inputs", m.get("skipped") or [])
    listed += _listed("Masks not used", m.get("mask_problems") or [])
    if listed:
        parts.append("<h2>Inputs not used</h2>" + listed)
    return f"{_MARK}{''.join(parts)}</section>" if parts else ""


def _insert(page: str, before: str, text: str) -> str:
    at = page.find(before)
    at = at if at >= 0 else page.rfind("</body>")
    return page[:at] + text + "\n" + page[at:]


def append_extras(report: str | Path, metrics: Mapping[str, Any]) -> None:
    """Insert :func:`notes_html` before the first section of ``report`` and :func:`extras_html` before its
    gallery, atomically; a page that already has them is left alone."""
    path = Path(report)
    page = path.read_text(encoding="utf-8")
    if _MARK in page:
        return
    page = _insert(page, "<h2>Gallery</h2>", extras_html(metrics))
    page = _insert(page, "<h2>", notes_html(metrics))
    write_bytes_atomic(path, page.encode("utf-8"))
