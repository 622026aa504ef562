"""Dense CRF refinement of a fused soft map (Kraehenbuehl & Koltun 2011), via ``pydensecrf2``.

The fused map ``p`` in [0, 1] is the unary (``-log p`` for the object, ``-log(1-p)`` for the rest); a
Gaussian smoothness kernel and a bilateral (position + colour) kernel pull the labels of similar,
nearby pixels together, so a blob that covers an object's centre spreads to the object's edges and stops
there. The output is the object's marginal probability after mean-field inference, again in [0, 1], which
the consensus thresholds like any other fused map. Runs on the CPU at ``CRFConfig.size``, the images of a
batch in parallel worker processes (:func:`workers`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from pixelvote.errors import ConfigError
from pixelvote.refine import crf_pass

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'pixelvote[crf]'  (or: pip install pydensecrf2; it compiles, so it needs a C++ "
                "compiler)")


class CRFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bilateral_sxy: float = Field(0.18, gt=0,
                                 description="bilateral kernel width, as a fraction of the map size")
    bilateral_srgb: float = Field(13.0, gt=0, description="bilateral kernel colour width (0-255 scale)")
    bilateral_compat: float = Field(10.0, ge=0)
    gaussian_sxy: float = Field(3.0, gt=0,
                                description="smoothness kernel width in pixels (at the CRF's size)")
    gaussian_compat: float = Field(3.0, ge=0)
    iterations: int = Field(5, ge=1, le=50)
    confidence: float = Field(0.8, gt=0.0, le=1.0, description="how far the unary trusts the map (1: fully)")
    cutoff: float = Field(0.5, gt=0.0, lt=1.0,
                          description="the consensus mask is where the CRF's object probability exceeds this "
                                      "(`train` chooses it with the threshold; the CRF's result does not "
                                      "depend on it)")
    size: int = Field(128, ge=16,
                      description="the CRF runs at this size (longer side); its output is resized back")


class _Reuse:
    """What :func:`reuse` keeps: CRF results by (unary, colours, settings), and CRFs whose pairwise terms
    are built, by (colours, settings), so that another unary (another threshold or map) on the same image
    skips building the permutohedral lattice (about a third of a pass)."""

    def __init__(self, capacity: int, crfs: int, steps: tuple[int, ...] = ()) -> None:
        self.results: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.crfs: OrderedDict[bytes, Any] = OrderedDict()
        self.capacity = {"results": capacity, "crfs": crfs}
        self.steps = steps

    def get(self, store: str, key: bytes) -> Any:
        held: OrderedDict[bytes, Any] = getattr(self, store)
        if key in held:
            held.move_to_end(key)
            return held[key]
        return None

    def keep(self, store: str, key: bytes, value: Any) -> None:
        keep_newest(getattr(self, store), key, value, self.capacity[store])


def keep_newest(held: OrderedDict, key: Any, value: Any, capacity: int) -> None:
    """Keep ``value`` under ``key`` in ``held`` as its newest entry, dropping the oldest beyond
    ``capacity``."""
    held[key] = value
    held.move_to_end(key)
    if len(held) > capacity:
        held.popitem(last=False)


_reused: ContextVar[_Reuse | None] = ContextVar("crf_reused", default=None)


@contextmanager
def reuse(capacity: int = 1024, crfs: int = 64, steps: Iterable[int] = ()) -> Iterator[None]:
    """Within the block, :func:`dense_crf` gives an image the result it already computed for the same
    unary, colours and settings (the last ``capacity`` results are kept, 64 KB each at 128 px), and runs a
    new unary on a CRF already built for the image's colours and settings (the last ``crfs``): calibration
    refines many identical fused maps (e.g. of all members and of the agreeing ones where all agree), and
    every image once per threshold, fusion and recipe. A pass for one of the iteration counts ``steps``
    runs to the largest and keeps the result after each of them, so that the others are found held (ask
    for them one after the other: each is kept like any result). The results are those of a fresh pass."""
    token = _reused.set(_Reuse(capacity, crfs, tuple(sorted(set(steps)))))
    try:
        yield
    finally:
        _reused.reset(token)


def available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def unary_probability(soft: torch.Tensor, threshold: torch.Tensor | float, confidence: float) -> torch.Tensor:
    """Map values to the object's probability for the CRF: 0 -> 0, the threshold -> 0.5, 1 -> 1 (piecewise
    linear), pulled towards 0.5 by ``confidence``; so without pairwise terms the CRF's ``Q > 0.5`` is exactly
    the thresholded map."""
    t = torch.as_tensor(threshold, dtype=soft.dtype, device=soft.device).clamp(1e-3, 1 - 1e-3)
    t = t.view(-1, *([1] * (soft.dim() - 1))) if t.dim() else t
    p = torch.where(soft < t, 0.5 * soft / t, 0.5 + 0.5 * (soft - t) / (1 - t))
    return 0.5 + confidence * (p.clamp(0, 1) - 0.5)


@dataclass(frozen=True)
class Colours:
    """Images as the CRF sees them: ``rgb (B, h, w, 3)`` uint8 at the CRF's size, and a digest of each (what
    :func:`reuse` keys them by)."""

    rgb: np.ndarray
    digests: tuple[bytes, ...]


def crf_size(hw: tuple[int, int] | torch.Size, cfg: CRFConfig) -> tuple[int, int]:
    """The size the CRF runs at for maps of size ``hw``: the longer side ``cfg.size`` (never enlarged)."""
    H0, W0 = int(hw[0]), int(hw[1])
    scale = min(1.0, cfg.size / max(H0, W0))
    return max(1, round(H0 * scale)), max(1, round(W0 * scale))


def crf_colours(images: torch.Tensor, hw: tuple[int, int] | torch.Size, cfg: CRFConfig) -> Colours:
    """``images (B, 3, H, W)`` (uint8, or float in [0, 1]) of maps of size ``hw``, as :func:`dense_crf`
    takes them: made once, they serve every pass on the same images at the same size (calibration runs one
    per threshold)."""
    H, W = crf_size(hw, cfg)
    imgs = images.detach().float()
    if images.dtype == torch.uint8:
        imgs = imgs / 255.0
    if (H, W) != tuple(imgs.shape[-2:]):
        imgs = F.interpolate(imgs, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    rgb = (imgs * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return Colours(rgb, tuple(hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in rgb))


def crf_unary(soft: torch.Tensor, threshold: torch.Tensor | float, cfg: CRFConfig) -> np.ndarray:
    """The object's probability that :func:`dense_crf` starts from for ``soft (B, H, W)`` thresholded at
    ``threshold``: :func:`unary_probability` at the CRF's size, ``(B, h, w)`` float32 strictly inside (0, 1).
    It depends on the threshold, ``cfg.confidence`` and ``cfg.size`` only, so calibration makes it once for
    every CRF weight, iteration count and cutoff it tries at a threshold."""
    H0, W0 = soft.shape[-2:]
    H, W = crf_size((H0, W0), cfg)
    prob = unary_probability(soft.detach().float(), threshold, cfg.confidence)
    if (H, W) != (H0, W0):
        prob = F.interpolate(prob[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    return prob.clamp(1e-4, 1 - 1e-4).cpu().numpy()


def dense_crf(soft: torch.Tensor, images: torch.Tensor | None, cfg: CRFConfig | None = None,
              threshold: torch.Tensor | float = 0.5, *, colours: Colours | None = None,
              unary: np.ndarray | None = None) -> torch.Tensor:
    """Refine ``soft (B, H, W)`` in [0, 1], thresholded at ``threshold`` (a float or one per image), with
    the colour ``images (B, 3, H, W)`` (uint8, or float in [0, 1]; or ``colours`` made from them before by
    :func:`crf_colours`) -> the object's marginal probability ``(B, H, W)`` on ``soft``'s device; the mask is
    ``> cfg.cutoff`` (the consensus applies it). ``unary``: :func:`crf_unary` of the same ``soft``,
    ``threshold`` and settings, made before (then ``soft`` only gives the size and device)."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as exc:
        raise ConfigError("the dense CRF refinement needs pydensecrf2, which is not installed",
                          fix=INSTALL_HINT) from exc
    cfg = cfg or CRFConfig()
    B, H0, W0 = soft.shape
    H, W = crf_size((H0, W0), cfg)
    if colours is None:
        if images is None:
            raise ValueError("dense_crf needs the images or their colours")
        colours = crf_colours(images, (H0, W0), cfg)
    if colours.rgb.shape[:3] != (B, H, W):
        raise ValueError(f"colours of shape {colours.rgb.shape[:3]} for {B} maps at the CRF's size {(H, W)}")
    p = crf_unary(soft, threshold, cfg) if unary is None else unary
    if p.shape != (B, H, W):
        raise ValueError(f"a unary of shape {p.shape} for {B} maps at the CRF's size {(H, W)}")
    rgb = colours.rgb
    kernels = {"gaussian_sxy": cfg.gaussian_sxy, "gaussian_compat": cfg.gaussian_compat,
               "bilateral_sxy": cfg.bilateral_sxy * max(H, W), "bilateral_srgb": cfg.bilateral_srgb,
               "bilateral_compat": cfg.bilateral_compat, "iterations": cfg.iterations}
    reused = _reused.get()
    if reused is None:
        parts = _parallel(crf_pass.marginals, p, rgb, kernels, worker_count(B))
        out = crf_pass.marginals(p, rgb, kernels) if parts is None else np.concatenate(parts)
    else:
        size = f"{H}x{W}".encode()
        # the pairwise terms do not depend on the iterations or the unary's confidence: one built CRF
        # serves every count calibration tries
        pairwise = cfg.model_dump_json(exclude={"iterations", "confidence", "cutoff"}).encode() + size
        counts = reused.steps if cfg.iterations in reused.steps else (cfg.iterations,)
        # the cutoff is applied to the result, so one result serves every cutoff
        settings = {n: cfg.model_copy(update={"iterations": n}).model_dump_json(exclude={"cutoff"}).encode()
                    + size for n in counts}
        out = _reused_passes(p, rgb, colours.digests, kernels, reused, settings, pairwise, cfg.iterations)
    q = torch.from_numpy(out).to(soft.device)
    if (H, W) != (H0, W0):
        q = F.interpolate(q[:, None], size=(H0, W0), mode="bilinear", align_corners=False)[:, 0]
    return q


# within reuse(), passes this long run in the workers: two workers that build each CRF, (3.5 + n) / 2
# iterations' time per image, beat this process on held CRFs, n, from n = 4
PARALLEL_FROM_ITERATIONS = 4


def _reused_passes(p: np.ndarray, rgb: np.ndarray, digests: tuple[bytes, ...], kernels: dict[str, float],
                   reused: _Reuse, settings: dict[int, bytes], pairwise: bytes,
                   iterations: int) -> np.ndarray:
    """The images' passes within :func:`reuse`: each image's held result, or a pass that keeps its result
    after each iteration count of ``settings`` (the settings' key for each). Two or more such passes of at
    least :data:`PARALLEL_FROM_ITERATIONS` run in the worker processes, each on a CRF it builds (building
    costs about 3.5 iterations); others run here, on the image's held (or a new) CRF."""
    keys = []
    for b in range(len(p)):
        data = hashlib.blake2b(p[b].tobytes() + digests[b], digest_size=16).digest()
        keys.append({n: hashlib.blake2b(data + key, digest_size=16).digest() for n, key in settings.items()})
    out: list[np.ndarray | None] = [reused.get("results", k[iterations]) for k in keys]
    todo = [b for b, held in enumerate(out) if held is None]
    parts = None
    if len(todo) > 1 and max(settings) >= PARALLEL_FROM_ITERATIONS:
        parts = _parallel(crf_pass.marginal_steps, p[todo], rgb[todo], kernels, worker_count(len(todo)),
                          tuple(settings))
    if parts is None:
        steps = [crf_pass.infer_steps(_held_crf(rgb[b], digests[b], kernels, reused, pairwise), p[b],
                                      settings) for b in todo]
    else:
        steps = [s for part in parts for s in part]
    for b, by_count in zip(todo, steps, strict=True):
        for n in sorted(by_count, key=lambda n: n == iterations):  # the one asked for is kept last: newest
            reused.keep("results", keys[b][n], by_count[n])
        out[b] = by_count[iterations]
    return np.stack(out)


def _held_crf(rgb: np.ndarray, digest: bytes, kernels: dict[str, float], reused: _Reuse,
              pairwise: bytes) -> Any:
    """The CRF built for these colours and pairwise settings within :func:`reuse` (built now if not held)."""
    key = hashlib.blake2b(digest + pairwise, digest_size=16).digest()
    d = reused.get("crfs", key)
    if d is None:
        d = crf_pass.build(rgb, kernels)
        reused.keep("crfs", key, d)
    return d


WORKERS_ENV = "PIXELVOTE_CRF_WORKERS"
_workers: ContextVar[int | None] = ContextVar("crf_workers", default=None)
_parallel_failed = False


@contextmanager
def workers(n: int) -> Iterator[None]:
    """Within the block, :func:`dense_crf` runs the images of a batch in at most ``n`` worker processes (1:
    all in this one). Outside any such block the limit is ``$PIXELVOTE_CRF_WORKERS``, else the number of CPU
    cores (joblib's count, which respects affinity and container limits). The results are the same."""
    if n < 1:
        raise ValueError(f"CRF workers must be >= 1, got {n}")
    token = _workers.set(n)
    try:
        yield
    finally:
        _workers.reset(token)


def worker_count(batch: int) -> int:
    """How many worker processes :func:`dense_crf` uses for ``batch`` images (1: none)."""
    n = _workers.get()
    if n is None:
        raw = os.environ.get(WORKERS_ENV, "").strip()
        if raw:
            n = int(raw) if raw.isdigit() else 0
            if n < 1:
                raise ConfigError(f"${WORKERS_ENV} must be a whole number >= 1, not {raw!r}",
                                  fix=f"set {WORKERS_ENV}=1 (one process) or unset it (one per core)")
        else:
            from joblib import cpu_count

            n = cpu_count()
    return max(1, min(n, batch))


def _parallel(fn: Callable[..., Any], p: np.ndarray, rgb: np.ndarray, kernels: dict[str, float], n: int,
              *args: Any) -> list[Any] | None:
    """``fn(p, rgb, kernels, *args)`` (a :mod:`crf_pass` function) on ``n`` chunks of the images in ``n``
    loky processes (joblib's reusable pool: started once, in about half a second, and reused) -> each
    chunk's result in order, or None where ``n`` is 1 or the workers cannot run, so that the caller runs
    them here. loky starts its workers by fork + exec: no ``__main__`` guard is needed in a user's script and
    no forked copy of torch's threads."""
    global _parallel_failed
    if n < 2 or _parallel_failed:
        return None
    from joblib import Parallel, delayed

    chunks = [c for c in np.array_split(np.arange(len(p)), n) if len(c)]
    try:
        # max_nbytes=None: joblib would hand arrays over 1 MB (a batch at a CRF size above 128 px) to the
        # workers as read-only memory maps, which pydensecrf2 refuses
        parts = Parallel(n_jobs=len(chunks), backend="loky", max_nbytes=None)(
            delayed(fn)(p[c], rgb[c], kernels, *args) for c in chunks)
    except Exception as exc:  # a worker that cannot start or dies: the same passes, in this process
        _parallel_failed = True
        log.warning("the dense CRF's worker processes failed (%s: %s); running it in this process from now "
                    "on (set %s=1 to skip the workers)", type(exc).__name__, exc, WORKERS_ENV)
        return None
    return list(parts)
