"""Helpers for the review desk tests (no tests here): a synthetic output folder and a live server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ["benign", "malignant", "normal"]
BACKGROUND = "normal"
MEMBERS = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]

# key -> (label, probability, reasons, uncertainty_mean)
SPECS: dict[str, tuple[str, float, list[str], float]] = {
    "case 01": ("malignant", 0.52, ["disagreement", "low_confidence"], 0.31),
    "case 02": ("benign", 0.61, ["high_mutual_information"], 0.22),
    "case 03": ("benign", 0.58, ["high_variance", "low_confidence"], 0.27),
    "case 04": ("benign", 0.93, [], 0.08),
    "case 05": ("malignant", 0.88, [], 0.12),
    "a/scan 01": ("benign", 0.71, ["empty_mask"], 0.18),
    "b/scan 01": ("normal", 0.97, [], 0.03),
    "case 06": ("normal", 0.90, [], 0.05),
}


def _blob(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - cy) ** 2 / r**2 + (xx - cx) ** 2 / (1.3 * r) ** 2 <= 1.0


def make_review_out(tmp_path: Path, size: tuple[int, int] = (96, 128), specs: dict[str, Any] | None = None,
                    torn: bool = False) -> Path:
    """An output folder per docs/formats.md under ``tmp_path/out`` (images under ``tmp_path/images``)."""
    specs = SPECS if specs is None else specs
    rng = np.random.default_rng(0)
    out, images = tmp_path / "out", tmp_path / "images"
    h, w = size
    lines = []
    for i, (key, (label, prob, reasons, unc)) in enumerate(specs.items()):
        cy, cx, r = h * (0.35 + 0.05 * (i % 4)), w * (0.3 + 0.08 * (i % 5)), h * 0.16
        lesion = _blob(h, w, cy, cx, r)
        grey = (rng.random((h, w)) * 60 + 40).astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        grey += 70 * np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (0.3 * h * w))  # a soft "organ"
        if label != BACKGROUND:
            grey[lesion] += 60
        rgb = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        rel = key if "/" in key else f"{label}/{key}"
        img_path = images / f"{rel}.png"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(img_path)
        mask = lesion if (label != BACKGROUND and "empty_mask" not in reasons) else np.zeros((h, w), bool)
        heat = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.5 * r) ** 2))
        overlay = rgb.astype(np.float32) * 0.6
        overlay[..., 0] += 255 * heat * 0.4
        overlay[..., 1] += 120 * heat * 0.4
        uncertainty = np.clip(heat * unc * 2.5 + rng.random((h, w)) * 0.05, 0, 1)
        for sub, arr in (("masks", mask.astype(np.uint8) * 255), ("overlays", overlay.astype(np.uint8)),
                         ("uncertainty", (uncertainty * 255).astype(np.uint8))):
            p = out / sub / f"{key}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(p)
        others = [c for c in CLASSES if c != label]
        members = {}
        for j, m in enumerate(MEMBERS):
            disagree = "disagreement" in reasons and j == 2
            members[m] = {"label": others[0] if disagree else label,
                          "probability": round(min(0.99, prob + 0.03 * (j - 1)), 3),
                          "entropy": round(0.2 + unc, 3), "mutual_information": round(unc / 5, 4),
                          "variance": round(unc / 50, 5), "agrees": not disagree}
        area = int(mask.sum())
        lines.append(json.dumps({
            "image": str(img_path.resolve()), "key": key,
            "mask": f"masks/{key}.png", "overlay": f"overlays/{key}.png",
            "uncertainty": f"uncertainty/{key}.png",
            "width": w, "height": h, "label": label, "label_index": CLASSES.index(label), "probability": prob,
            "probabilities": {label: prob, others[0]: round((1 - prob) * 0.7, 4),
                              others[1]: round((1 - prob) * 0.3, 4)},
            "target_class": label if label != BACKGROUND else "benign", "members": members,
            "agreement": 2 / 3 if "disagreement" in reasons else 1.0, "flagged": bool(reasons),
            "reasons": reasons, "mask_area": area, "mask_fraction": round(area / (w * h), 6),
            "threshold": 0.5, "uncertainty_mean": unc,
        }))
    (out / "annotate.json").write_text(json.dumps({
        "format_version": 1, "classes": CLASSES, "background": BACKGROUND, "run": str(tmp_path / "run"),
        "consensus": {}, "created": "2025-01-01T00:00:00+00:00"}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"key": "half", "mask": "ma'
    (out / "annotations.jsonl").write_text(text)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_server(settings: Any) -> Iterator[str]:
    """Run the review app with uvicorn in a thread on 127.0.0.1 (a free port); yield its base URL."""
    import uvicorn

    from pixelvote.review.app import create_app
    from pixelvote.review.server import bind

    app = create_app(settings)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the review server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
