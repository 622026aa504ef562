"""Training targets for the segmenter, read from an annotation output folder.

- unflagged (or reviewed) images diagnosed with a finding: their consensus mask;
- background-class images: all-background negatives;
- reviewed images weigh more (``reviewed_weight``);
- pixels that are uncertain are ignored in the loss rather than counted as background: a band around the
  mask's edge, and pixels whose MC uncertainty map is high.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixelvote.data.imageio import image_size, read_image, read_jsonl, read_mask
from pixelvote.data.transforms import content_box, fit_image, to_tensor
from pixelvote.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SegExample:
    image: Path
    mask: Path | None  # None = background negative
    uncertainty: Path | None
    weight: float
    reviewed: bool


NO_IMAGE_FIX = ("`pixelvote import` takes each image's path from the 'pixelvote_image' field that "
                "`pixelvote export` writes (a plain COCO or Label Studio file has none, and import has no "
                "option for an images folder): add \"pixelvote_image\": \"<path to the image>\" to each "
                "entry of the file's 'images' (COCO) or each task's 'data' (Label Studio), then import it "
                "again into a new --to folder")


def select_examples(out: str | Path, *, background: str, mode: str = "confident",
                    reviewed_weight: float = 3.0, skipped: list[dict] | None = None) -> list[SegExample]:
    """Pick training examples from ``out/annotations.jsonl``. ``mode``: ``confident`` (unflagged + reviewed),
    ``reviewed`` (reviewed only), ``all`` (every record). Records whose image or mask cannot be used (no
    image path, a missing or unreadable file, a mask of another size than its image) are left out and
    logged, and appended to ``skipped`` as ``{"image", "key", "reason"}``; none usable is an error."""
    out = Path(out)
    if not (out / "annotations.jsonl").exists():
        raise DataError("no annotations.jsonl here", path=out,
                        fix="pass the --out folder of `pixelvote annotate`")
    examples, problems = [], []
    from pixelvote.review.apply import reviewed_records  # review-desk decisions, when OUT has them

    for rec in reviewed_records(out, list(read_jsonl(out / "annotations.jsonl"))):
        reviewed = bool(rec.get("reviewed"))
        if mode == "reviewed" and not reviewed:
            continue
        if mode == "confident" and rec.get("flagged") and not reviewed:
            continue
        try:
            examples.append(_example(out, rec, background, reviewed_weight if reviewed else 1.0, reviewed))
        except DataError as exc:
            log.warning("skipped: %s", exc)
            problems.append({"image": rec.get("image"), "key": rec.get("key"), "reason": str(exc)})
    if skipped is not None:
        skipped.extend(problems)
    if not examples and problems and all(p["image"] is None for p in problems):
        raise DataError(f"none of the {len(problems)} record(s) has an image path (an import of a file that "
                        "does not name its images?)", path=out / "annotations.jsonl", fix=NO_IMAGE_FIX)
    if not examples and problems:
        raise DataError(f"none of the {len(problems)} record(s) for mode {mode!r} can be used; the first: "
                        f"{problems[0]['reason']}", path=out / "annotations.jsonl",
                        fix="restore the images and masks the records name (or annotate again into a new "
                            "--out folder)")
    if not examples:
        raise DataError(f"no usable records for mode {mode!r}", path=out / "annotations.jsonl",
                        fix="annotate more images, review some, or use --all")
    return examples


def _example(out: Path, rec: dict, background: str, weight: float, reviewed: bool) -> SegExample:
    """The training example of one record, its files checked (the image's header, the whole mask, at the
    image's size); a :class:`DataError` naming the file, for one that cannot be used."""
    if not rec.get("image"):
        raise DataError(f"record {rec.get('key')!r}: no image path", path=out / "annotations.jsonl",
                        fix=NO_IMAGE_FIX)
    image = Path(rec["image"])
    if not image.is_file():
        raise DataError("image not found", path=image, fix="restore the image at this path; until then "
                        "`segment train` leaves it out")
    size = image_size(image)
    mask = None
    if rec.get("label") != background:
        if not rec.get("mask"):
            raise DataError(f"record {rec.get('key')!r}: no mask path", path=out / "annotations.jsonl",
                            fix="annotate the image again into a new --out folder")
        mask = out / rec["mask"]
        fix = ("restore the mask (a PNG of its image's size) or annotate the image again into a new --out "
               "folder; until then `segment train` leaves it out")
        if not mask.is_file():
            raise DataError(f"mask of {image} not found", path=mask, fix=fix)
        try:
            read_mask(mask, size)
        except DataError as exc:
            raise DataError(f"mask of {image}: {exc.problem}", path=mask, fix=fix) from None
    unc = out / rec["uncertainty"] if rec.get("uncertainty") and not reviewed else None
    if unc is not None and unc.exists():
        try:
            image_size(unc)
        except DataError as exc:
            log.warning("%s; its uncertainty is not used", exc)
            unc = None
    return SegExample(image, mask, unc if unc is not None and unc.exists() else None, weight, reviewed)


def read_grey(path: Path) -> np.ndarray:
    return read_image(path)[..., 0]


def _band(mask: torch.Tensor, r: int) -> torch.Tensor:
    m = mask.float()[None, None]
    dil = F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    ero = -F.max_pool2d(-m, 2 * r + 1, stride=1, padding=r)
    return (dil - ero)[0, 0] > 0


class SegDataset(torch.utils.data.Dataset):
    """Images, targets and loss weights at ``size x size``, placed by ``resize`` as the ensemble places its
    inputs (:func:`pixelvote.data.transforms.fit_image`; letterbox padding counts as background); targets:
    1 fg, 0 bg; ``weight`` 0 = ignored."""

    def __init__(self, examples: list[SegExample], size: int, *, edge_band: float = 0.03,
                 uncertainty_ignore: float = 0.35, augment: bool = False, resize: str = "squash") -> None:
        self.examples, self.size, self.resize = examples, size, resize
        self.edge_band, self.uncertainty_ignore = edge_band, uncertainty_ignore
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.augment = None
        if augment:
            from pixelvote.data.transforms import seg_augment

            self.augment = seg_augment(size)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if i not in self.cache:
            self.cache[i] = self._load(self.examples[i])
        x, target, weight = self.cache[i]
        if self.augment is None:
            return x, target, weight
        x, maps = self.augment(x, torch.stack([target, weight]))
        return x, maps[0], maps[1]

    def _load(self, ex: SegExample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.size
        img = read_image(ex.image)
        x = fit_image(to_tensor(img), s, self.resize)
        if ex.mask is None:
            target = torch.zeros(s, s)
            weight = torch.full((s, s), ex.weight)
            return x, target, weight
        m = read_mask(ex.mask, (img.shape[1], img.shape[0]))
        target = self._place(torch.from_numpy(m.astype(np.float32))).gt(0.5).float()
        weight = torch.full((s, s), ex.weight)
        if not ex.reviewed:
            weight[_band(target > 0, max(1, round(self.edge_band * s)))] = 0.0
            if ex.uncertainty is not None:
                unc = self._place(torch.from_numpy(read_grey(ex.uncertainty).astype(np.float32) / 255.0))
                weight[(unc > self.uncertainty_ignore) & (target == 0)] = 0.0
        return x, target, weight

    def _place(self, values: torch.Tensor) -> torch.Tensor:
        """An ``(H, W)`` float map of the image -> ``(S, S)`` on the model input (area-weighted; 0 on
        letterbox padding)."""
        s = self.size
        top, left, h, w = content_box(tuple(values.shape), s, self.resize)
        out = torch.zeros(s, s)
        out[top:top + h, left:left + w] = F.interpolate(values[None, None], size=(h, w), mode="area")[0, 0]
        return out
