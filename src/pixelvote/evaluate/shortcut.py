"""Shortcut check: can the label be told from the file alone (image size, file type)?

When fire frames are 400x256 JPEGs and fire-free photos 256x256 PNGs, a classifier can learn the source
instead of the fire. A depth-2 decision tree on (width, height, aspect, extension), scored by stratified
cross-validation, says whether such a shortcut exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["shortcut_check"]

_FEATURES = {"size": (0, 1, 2), "extension": (3,), "size+extension": (0, 1, 2, 3)}


def shortcut_check(widths: Sequence[int], heights: Sequence[int], extensions: Sequence[str],
                   labels: Sequence[int], *, threshold: float = 0.9, margin: float = 0.1,
                   seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy of predicting ``labels`` from image size and file type.

    Returns ``{"checked", "accuracy", "majority_rate", "by_features", "folds", "warning", "message"}``;
    ``warning`` is true when the accuracy is above ``threshold`` and at least ``margin`` above the
    majority rate (always guessing the commonest class). ``checked`` is false (with a ``reason``) when
    there are fewer than two classes or a class has a single image.
    """
    n = len(labels)
    if not (len(widths) == len(heights) == len(extensions) == n):
        raise ValueError(f"expected widths, heights, extensions and labels of one length ({n}) but got "
                         f"{len(widths)}, {len(heights)}, {len(extensions)}")
    counts = Counter(int(v) for v in labels)
    if len(counts) < 2 or min(counts.values()) < 2:
        return {"checked": False, "warning": False, "n": n,
                "reason": "needs at least two classes with two images each"}
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    exts = sorted({e.lower() for e in extensions})
    w = np.asarray(widths, dtype=float)
    h = np.asarray(heights, dtype=float)
    x = np.stack([w, h, w / np.maximum(h, 1.0), [exts.index(e.lower()) for e in extensions]], axis=1)
    y = np.asarray(labels, dtype=int)
    folds = min(5, min(counts.values()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    by: dict[str, float] = {}
    for name, cols in _FEATURES.items():
        tree = DecisionTreeClassifier(max_depth=2, random_state=seed)
        by[name] = float(cross_val_score(tree, x[:, list(cols)], y, cv=cv, scoring="accuracy").mean())
    acc = max(by.values())
    majority = max(counts.values()) / n
    warn = acc > threshold and acc >= majority + margin
    best = max(by, key=lambda k: (by[k], -len(_FEATURES[k])))
    message = (f"Shortcut: the label can be predicted from the image file alone ({best}) with "
               f"{100 * acc:.1f}% cross-validated accuracy (majority rate {100 * majority:.1f}%). The "
               "classifier may have learnt the source of the images rather than the finding; check with "
               "images of both classes from one source." if warn else "")
    return {"checked": True, "n": n, "accuracy": acc, "majority_rate": majority, "by_features": by,
            "folds": folds, "extensions": exts, "threshold": threshold, "warning": warn, "message": message,
            "method": "depth-2 decision tree on (width, height, aspect, extension), stratified k-fold CV"}
