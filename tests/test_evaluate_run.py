"""evaluate_run end to end on a tiny trained run: masks, TBX11K boxes, classification only, bad inputs.

Figures are cross-checked against an independent recomputation with numpy from the masks that
`pixelvote annotate` writes for the same images (same per-image seeds, so the same masks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelvote.data.tbx11k import TBMapping
from pixelvote.errors import ConfigError, DataError
from pixelvote.evaluate.gallery import GalleryKeeper
from pixelvote.evaluate.run import evaluate_run
from pixelvote.evaluate.shortcut import shortcut_check
from tests.conftest import mask_iou, scored_masks, val_manifest, write_blob_dataset

KEYS = {"format_version", "dataset", "classes", "n_images", "run", "created", "config", "data",
        "classification", "calibration", "risk_coverage", "flags", "uncertainty_scores", "shortcut_check",
        "warnings", "notes", "skipped", "mask_problems", "per_image"}
PIXEL_KEYS = {"pixel", "fusion", "threshold_sweep"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pixelvote.train.config import TrainConfig
    from pixelvote.train.loop import train

    root = tmp_path_factory.mktemp("evaluate")
    data = write_blob_dataset(root / "data", per_class=12)
    run = train(TrainConfig(data=data, out=root / "run", preset="tiny", epochs=2, image_size=64,
                            pretrained=False, mc_samples=4))
    return root, data, run


def _evaluate(run, data, out, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("max_gallery", 3)
    return evaluate_run(run, data, out, **kw)


def _iou(p: np.ndarray, t: np.ndarray) -> float:
    return float((p & t).sum() / (p | t).sum())


def _prior(h: int, w: int) -> np.ndarray:
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    return ((ys >= h / 4) & (ys < 3 * h / 4))[:, None] & ((xs >= w / 4) & (xs < 3 * w / 4))[None, :]


def test_val_split_figures_match_annotate_masks(trained, tmp_path):
    from pixelvote.engine.annotate import annotate

    _, data, run = trained
    m = _evaluate(run, data, tmp_path / "report")
    assert KEYS | PIXEL_KEYS <= set(m)
    val = json.loads((run / "split.json").read_text())["val"]
    assert m["config"]["split"] == "val" and m["n_images"] == len(val) == m["data"]["images_selected"]
    assert {data / r["image"] for r in m["per_image"]} == {Path(p) for p in val}
    assert (tmp_path / "report" / "report.html").stat().st_size > 10_000
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == m

    # the same images through `pixelvote annotate`: identical masks and diagnoses
    manifest = tmp_path / "val.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path"], *([p] for p in val)])
    T = m["config"]["mc_samples"]
    annotate(run, manifest, tmp_path / "ann", mc_samples=T, num_workers=0, progress=False)
    lines = (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()
    recs = {r["key"]: r for r in map(json.loads, lines)}
    rows = {r["key"]: r for r in m["per_image"]}
    assert set(recs) == set(rows)
    classes = m["classes"]
    ious, inter, union, prior_ious = [], 0, 0, []
    for key, r in rows.items():
        assert recs[key]["label"] == r["label"] and recs[key]["flagged"] == r["flagged"]
        assert recs[key]["probability"] == pytest.approx(r["probability"], abs=1e-5)
        truth_path = data / "masks" / r["truth"] / f"{key}.png"
        if r["truth"] == "normal":
            assert r["iou"] is None and not truth_path.exists()
            continue
        pred = np.asarray(Image.open(tmp_path / "ann" / recs[key]["mask"])) > 0
        truth = np.asarray(Image.open(truth_path)) > 0
        assert pred.shape == truth.shape == (r["height"], r["width"])  # scored at the original size
        ious.append(_iou(pred, truth))
        assert r["iou"] == pytest.approx(ious[-1], abs=1e-9)
        inter, union = inter + (pred & truth).sum(), union + (pred | truth).sum()
        prior_ious.append(_iou(_prior(*truth.shape), truth))
    px = m["pixel"]
    assert px["protocol"] == "mask" and px["images"] == "positives" and px["consensus"]["images"] == len(ious)
    assert px["consensus"]["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert px["consensus"]["pooled_iou"] == pytest.approx(inter / union, abs=1e-9)
    assert px["prior"]["mean_iou"] == pytest.approx(np.mean(prior_ious), abs=1e-9)
    assert set(px["members"]) == {"tiny_cnn_a", "tiny_cnn_b"} == set(m["classification"]["members"])
    assert set(px["pointing_game"]) == {"consensus", "tiny_cnn_a", "tiny_cnn_b", "prior"}
    fusion = {row[0]: row[1:] for row in m["fusion"]["rows"]}
    assert fusion["centred-box prior"][0] == pytest.approx(px["prior"]["mean_iou"])
    assert next(v for k, v in fusion.items() if k.startswith("configured"))[0] == px["consensus"]["mean_iou"]
    assert {"intersection (AND)", "union (OR, 1-of-n)", "mean map", "tiny_cnn_a alone"} <= set(fusion)
    sweep = m["threshold_sweep"]
    assert len(sweep["mean_iou"]) == len(sweep["thresholds"]) == 101
    assert set(sweep["members"]) == set(px["members"])

    # classification from the per-image diagnoses
    y = [classes.index(r["truth"]) for r in rows.values()]
    pred_y = [classes.index(r["label"]) for r in rows.values()]
    ens = m["classification"]["ensemble"]
    assert ens["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(pred_y)))
    cm = np.zeros((2, 2), int)
    np.add.at(cm, (y, pred_y), 1)
    assert ens["confusion_matrix"] == cm.tolist()
    flags = m["flags"]
    assert flags["flagged"] == sum(r["flagged"] for r in rows.values()) and flags["n"] == len(rows)
    assert m["risk_coverage"]["classification"]["n"] == len(rows)
    assert m["risk_coverage"]["localisation"]["n"] == len(ious)
    assert m["calibration"]["n_bins"] == 15 and sum(m["calibration"]["count"]) == len(rows)

    # fingerprint: sha256 over sorted relative paths and sizes of the images and masks read
    files = [data / r["image"] for r in rows.values()]
    files += [data / "masks" / r["truth"] / f"{k}.png" for k, r in rows.items() if r["truth"] == "lesion"]
    text = "".join(f"{p.relative_to(data).as_posix()}\t{p.stat().st_size}\n" for p in sorted(files))
    assert m["data"]["fingerprint"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert any("tuned on the run's validation images" in n for n in m["notes"])


def test_bad_image_and_mismatched_mask_are_reported_not_fatal(trained, tmp_path):
    _, data, run = trained
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "images" / "lesion" / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(copy / "masks" / "lesion" / "lesion 3.png")
    m = _evaluate(run, copy, tmp_path / "r1", max_gallery=0)
    assert m["config"]["split"] == "all" and m["n_images"] == 24  # another root: every image
    assert [Path(s["image"]).name for s in m["skipped"]] == ["broken.png"]
    assert len(m["mask_problems"]) == 1 and "10x10" in m["mask_problems"][0]["reason"]
    row = next(r for r in m["per_image"] if r["key"] == "lesion 3")
    assert row["iou"] is None and row["truth"] == "lesion"  # classification only
    assert m["pixel"]["consensus"]["images"] == 11
    assert m["classification"]["ensemble"]["n"] == 24
    page = (tmp_path / "r1" / "report.html").read_text()
    assert "broken.png" in page and "Warnings and notes" in page
    # the run's validation list, found in a moved copy by relative path; the paper's fixed rule
    v = _evaluate(run, copy, tmp_path / "r2", split="val", method="paper", max_gallery=0)
    assert v["n_images"] == len(json.loads((run / "split.json").read_text())["val"])
    assert v["config"]["method"] == "paper" and v["config"]["consensus"]["threshold"] == 0.5
    assert v["config"]["consensus"]["fusion"] == "intersection"
    with pytest.raises(ConfigError, match="split"):
        _evaluate(run, copy, tmp_path / "r3", split="train")
    with pytest.raises(ConfigError, match="method.*Did you mean .paper."):
        _evaluate(run, copy, tmp_path / "r3", method="papr")
    with pytest.raises(DataError, match="test"):  # the run has no test split
        _evaluate(run, copy, tmp_path / "r3", split="test")


def test_excluded_split_scores_only_the_images_kept_out_of_training(trained, tmp_path):
    _, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    lists = json.loads((copy / "split.json").read_text())
    kept_out = sorted(lists["train"])[:3]
    lists["excluded_from_training"] = kept_out
    (copy / "split.json").write_text(json.dumps(lists))
    m = _evaluate(copy, data, tmp_path / "r", split="excluded", max_gallery=0)
    assert m["config"]["split"] == "excluded" and m["n_images"] == 3
    assert sorted(r["key"] for r in m["per_image"]) == sorted(Path(p).stem for p in kept_out)
    assert any("calibration did not see" in n for n in m["notes"])
    # those whose masks calibration scored are not held out: left out
    lists["calibration_masks"] = kept_out[:1]
    (copy / "split.json").write_text(json.dumps(lists))
    m = _evaluate(copy, data, tmp_path / "r1", split="excluded", max_gallery=0)
    assert sorted(r["key"] for r in m["per_image"]) == sorted(Path(p).stem for p in kept_out[1:])
    assert any("the 1 whose masks calibration scored are left out" in n for n in m["notes"])
    lists["calibration_masks"] = kept_out
    (copy / "split.json").write_text(json.dumps(lists))
    with pytest.raises(DataError, match="calibration scored every image.*--calibration-per-group"):
        _evaluate(copy, data, tmp_path / "r3", split="excluded")
    lists["excluded_from_training"] = []
    (copy / "split.json").write_text(json.dumps(lists))
    with pytest.raises(DataError, match="excluded.*empty.*--train-exclude"):
        _evaluate(copy, data, tmp_path / "r2", split="excluded")


def _tbx_root(root: Path, health: int = 2, broken_xml: bool = False) -> tuple[Path, dict[str, np.ndarray]]:
    """imgs/tb (64x64 PNGs, XML boxes in a 640x640 'scan') and imgs/health; returns the truth masks."""
    rng = np.random.default_rng(1)
    truths = {}
    (root / "annotations" / "xml").mkdir(parents=True)
    for i in range(4):
        img = (rng.random((64, 64)) * 60).astype(np.uint8)
        x0, y0 = 8 + 8 * i, 6 + 4 * i
        img[y0:y0 + 16, x0:x0 + 20] += 150
        (root / "imgs" / "tb").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "imgs" / "tb" / f"tb{i:04d}.png")
        # VOC 1-based inclusive in scan pixels: [x0*10 + 1, (x0+20)*10] -> image edges [x0, x0 + 20)
        obj = (f"<object><name>ActiveTuberculosis</name><bndbox><xmin>{x0 * 10 + 1}</xmin><ymin>{y0 * 10 + 1}"
               f"</ymin><xmax>{(x0 + 20) * 10}</xmax><ymax>{(y0 + 16) * 10}</ymax></bndbox></object>")
        text = f"<annotation><size><width>640</width><height>640</height></size>{obj}</annotation>"
        broken = broken_xml and i == 3
        (root / "annotations" / "xml" / f"tb{i:04d}.xml").write_text("<a" if broken else text)
        t = np.zeros((64, 64), bool)
        t[y0:y0 + 16, x0:x0 + 20] = True
        truths[f"tb{i:04d}"] = t
    for i in range(health):
        (root / "imgs" / "health").mkdir(parents=True, exist_ok=True)
        img = (rng.random((64, 64)) * 60).astype(np.uint8)
        Image.fromarray(img).save(root / "imgs" / "health" / f"h{i}.png")
    return root, truths


def test_tbx11k_layout_box_protocol(trained, tmp_path):
    _, _, run = trained
    root, truths = _tbx_root(tmp_path / "TBX11K")
    m = _evaluate(run, root, tmp_path / "r", dataset="tbx11k")
    assert m["dataset"] == "tbx11k" and m["data"]["protocol"] == "box" and m["n_images"] == 6
    assert m["data"]["class_counts"] == {"lesion": 4, "normal": 2}  # TB -> the run's non-background class
    assert any("TB images are scored as the run's class 'lesion'" in n for n in m["notes"])
    assert any("filled union" in n for n in m["notes"])
    px = m["pixel"]
    assert px["protocol"] == "box" and px["consensus"]["images"] == 4
    prior = [_iou(_prior(64, 64), t) for t in truths.values()]
    assert px["prior"]["mean_iou"] == pytest.approx(np.mean(prior), abs=1e-9)
    rows = {r["key"]: r for r in m["per_image"]}
    assert px["consensus"]["mean_iou"] == pytest.approx(np.mean([rows[k]["iou"] for k in truths]), abs=1e-9)
    assert all(rows[f"h{i}"]["iou"] is None for i in range(2))
    # box IoU of the centred box (16,16)-(48,48) with each truth box, computed by hand
    def box_iou(a, b):
        iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    boxes = [(8 + 8 * i, 6 + 4 * i, 28 + 8 * i, 22 + 4 * i) for i in range(4)]
    expected = np.mean([box_iou((16, 16, 48, 48), b) for b in boxes])
    assert px["box_iou"]["prior"] == pytest.approx(expected)
    assert 0 <= px["box_iou"]["consensus"] <= 1 and px["pointing_game"]["prior"] is not None
    assert "Box protocol" in (tmp_path / "r" / "report.html").read_text()

    # TB images only (the shared set's shape), a broken XML skipped, mapping configurable
    only, _ = _tbx_root(tmp_path / "TBonly", health=0, broken_xml=True)
    (only / "imgs" / "Active-TB").mkdir()
    (only / "imgs" / "tb" / "tb0000.png").rename(only / "imgs" / "Active-TB" / "tb0000.png")
    mapping = TBMapping(tb_folders=frozenset({"tb", "active_tb"}))
    o = _evaluate(run, only, tmp_path / "o", tbx11k_mapping=mapping, max_gallery=0)
    assert o["n_images"] == 3 and [Path(s["image"]).name for s in o["skipped"]] == ["tb0003.png"]
    assert o["data"]["class_counts"] == {"lesion": 3, "normal": 0}
    assert any("not meaningful" in n for n in o["notes"])
    assert o["classification"]["ensemble"]["auroc"] is None
    assert "not meaningful" in (tmp_path / "o" / "report.html").read_text()


def test_classification_only_set_and_shortcut_warning(trained, tmp_path):
    _, _, run = trained
    data = write_blob_dataset(tmp_path / "cls", per_class=8)
    shutil.rmtree(data / "masks")
    for p in sorted((data / "images" / "normal").glob("*.png")):  # normals: another size and file type
        Image.open(p).resize((40, 40)).save(p.with_suffix(".jpg"))
        p.unlink()
    m = _evaluate(run, data, tmp_path / "r", max_gallery=4)
    assert KEYS <= set(m) and not (PIXEL_KEYS & set(m))
    assert m["data"]["protocol"] == "none" and m["n_images"] == 16
    assert set(m["risk_coverage"]) == {"classification"}
    assert m["flags"]["mean_iou_flagged"] is None
    sc = m["shortcut_check"]
    assert sc["checked"] and sc["warning"] and sc["accuracy"] == 1.0 and sc["majority_rate"] == 0.5
    assert any("Shortcut" in w for w in m["warnings"])
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Shortcut" in page and "Gallery" in page


def test_shortcut_check_unit():
    rng = np.random.default_rng(0)
    labels = [0] * 20 + [1] * 20
    w = [400] * 20 + [256] * 20
    r = shortcut_check(w, [256] * 40, [".jpg"] * 40, labels)
    assert r["warning"] and r["by_features"]["size"] == 1.0 and r["by_features"]["extension"] == 0.5
    noise = rng.integers(200, 300, 40).tolist()
    assert not shortcut_check(noise, noise, [".png"] * 40, labels)["warning"]
    assert shortcut_check([1, 2], [1, 2], [".png"] * 2, [0, 0])["checked"] is False
    with pytest.raises(ValueError, match="one length"):
        shortcut_check([1], [1, 2], [".png"], [0])


def test_gallery_keeper_is_bounded_and_splits_best_worst():
    g = GalleryKeeper(6)  # 2 best, 2 worst, 2 flagged
    built = []
    for i, iou in enumerate([0.5, 0.9, 0.1, 0.7, 0.3, 0.2]):
        def build(i=i, iou=iou):
            built.append(i)
            return {"title": f"im{i}", "caption": f"{iou}"}
        g.offer("best", iou, build)
        g.offer("worst", -iou, build)
        if i % 2:
            g.offer("flagged", iou, build)
    items = g.items()
    groups = {k: [it["title"] for it in items if it["group"] == k] for k in ("best", "worst", "flagged")}
    assert groups == {"best": ["im1", "im3"], "worst": ["im2", "im5"], "flagged": []}  # im1/im3 already shown
    assert len(built) < 18  # cases are built only when they enter a heap
    few = GalleryKeeper(6)
    for i, iou in enumerate([0.4, 0.8, 0.6]):
        few.offer("best", iou, lambda i=i: {"title": f"im{i}"})
        few.offer("worst", -iou, lambda i=i: {"title": f"im{i}"})
    assert [(it["group"], it["title"]) for it in few.items()] == [("best", "im1"), ("best", "im2"),
                                                                  ("worst", "im0")]


def test_a_crf_run_evaluates_and_annotates_the_same_masks(trained, tmp_path):
    """A run whose consensus refines with the dense CRF: evaluate (including its per-member and fusion
    tables) runs, and its IoU per image is that of the masks `annotate` writes."""
    pytest.importorskip("pydensecrf.densecrf")
    import shutil

    from pixelvote.engine.annotate import annotate

    _, data, run = trained
    crf_run = tmp_path / "run"
    shutil.copytree(run, crf_run)
    cfg = json.loads((crf_run / "run.json").read_text())
    cfg["consensus"].update(refine="crf", fusion="mean", threshold=0.3, threshold_method="fixed")
    (crf_run / "run.json").write_text(json.dumps(cfg))
    m = _evaluate(crf_run, data, tmp_path / "report")
    assert m["config"]["consensus"]["refine"] == "crf"
    annotate(crf_run, val_manifest(crf_run, tmp_path / "val.csv"), tmp_path / "ann",
             mc_samples=m["config"]["mc_samples"], num_workers=0, progress=False)
    scored = 0
    for r, _, pred, truth in scored_masks(m, tmp_path / "ann", data):
        assert r["iou"] == pytest.approx(mask_iou(pred, truth), abs=1e-9)
        scored += 1
    assert scored > 0


def test_segmenter_rows_score_the_masks_annotate_writes_with_it(trained, tmp_path):
    """`evaluate --segmenter`: the segmenter's row is the mean IoU of the masks `annotate --segmenter` writes
    (gated by the same diagnosis), beside the CAM rules in the fusion table."""
    from pixelvote.engine.annotate import annotate
    from pixelvote.segment.train import SegConfig, train_segmenter

    _, data, run = trained
    annotate(run, data / "images", tmp_path / "pseudo", num_workers=0, progress=False)
    seg = train_segmenter(tmp_path / "pseudo", tmp_path / "seg", run=run,
                          cfg=SegConfig(epochs=1, image_size=64, batch_size=4, mode="all", crf=False),
                          pretrained=False, device="cpu")
    m = _evaluate(run, data, tmp_path / "report", segmenter=seg)
    rows = {row[0]: row[1:] for row in m["fusion"]["rows"]}
    assert "segmenter (stage two)" in rows and "segmenter (stage two)" in m["pixel"]["segmenter"]
    manifest = val_manifest(run, tmp_path / "val.csv")

    def annotated_iou(ann: Path) -> float:
        annotate(run, manifest, ann, segmenter=seg, mc_samples=m["config"]["mc_samples"], num_workers=0,
                 progress=False)
        ious = [mask_iou(pred, truth) for _, _, pred, truth in scored_masks(m, ann, data)]
        assert ious
        return float(np.mean(ious))

    iou = annotated_iou(tmp_path / "ann")
    assert rows["segmenter (stage two)"][0] == pytest.approx(iou, abs=1e-9)
    scored = m["pixel"]["segmenter"]["segmenter (stage two)"]
    assert scored["mean_iou"] == pytest.approx(iou, abs=1e-9)
    if "segmenter + dense CRF" in rows:  # with the crf extra: a segmenter saved with crf=True writes that row
        meta = json.loads((seg / "segmenter.json").read_text())
        (seg / "segmenter.json").write_text(json.dumps({**meta, "crf": True}))
        assert rows["segmenter + dense CRF"][0] == pytest.approx(annotated_iou(tmp_path / "ann-crf"),
                                                                 abs=1e-9)


def test_labels_mode_scores_the_masks_annotate_labels_writes(trained, tmp_path):
    from pixelvote.engine.annotate import annotate

    _, data, run = trained
    m = _evaluate(run, data, tmp_path / "report", labels=True, split="all")
    assert m["config"]["masks_from"] == "labels" and any("annotate --labels" in n for n in m["notes"])
    manifest = tmp_path / "all.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"],
                                  *([str(data / r["image"]), r["truth"]] for r in m["per_image"])])
    annotate(run, manifest, tmp_path / "ann", mc_samples=m["config"]["mc_samples"], num_workers=0,
             progress=False, labels=True)
    lines = (tmp_path / "ann" / "annotations.jsonl").read_text().splitlines()
    recs = {r["key"]: r for r in map(json.loads, lines)}
    scored = 0
    for r in m["per_image"]:
        if r["truth"] != "lesion":
            continue
        pred = np.asarray(Image.open(tmp_path / "ann" / recs[r["key"]]["mask"])) > 0
        truth = np.asarray(Image.open(data / "masks" / "lesion" / f"{r['key']}.png")) > 0
        assert r["iou"] == pytest.approx(_iou(pred, truth), abs=1e-9)
        scored += 1
    assert scored == m["pixel"]["consensus"]["images"] == 12
    assert _evaluate(run, data, tmp_path / "plain", split="all")["config"]["masks_from"] == "diagnosis"


def test_masks_are_scored_per_group_of_the_runs_group_pattern(trained, tmp_path):
    import re

    _, data, run = trained
    plain = _evaluate(run, data, tmp_path / "plain", max_gallery=0)
    assert "by_group" not in plain["pixel"]  # trained without --group-pattern
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = json.loads((copy / "run.json").read_text())
    config["train"]["group_pattern"] = r"^(\w+ \d)"  # "lesion 1", "lesion 10" and "lesion 11" are one group
    (copy / "run.json").write_text(json.dumps(config))
    m = _evaluate(copy, data, tmp_path / "grouped", max_gallery=0)
    by_group = m["pixel"]["by_group"]
    assert by_group["pattern"] == r"^(\w+ \d)"
    expected: dict[str, list[float]] = {}
    for r in m["per_image"]:
        if r["iou"] is not None:
            expected.setdefault(re.match(r"^(\w+ \d)", Path(r["image"]).name).group(1), []).append(r["iou"])
    assert len(expected) > 1 and set(by_group["groups"]) == set(expected)
    for g, ious in expected.items():
        assert by_group["groups"][g]["images"] == len(ious)
        assert by_group["groups"][g]["mean_iou"] == pytest.approx(float(np.mean(ious)))
    # the groups' images add up to the images the consensus row scored, and their means to its mean
    assert sum(len(v) for v in expected.values()) == m["pixel"]["consensus"]["images"]
    assert sum(by_group["groups"][g]["mean_iou"] * len(v) for g, v in expected.items()) / sum(
        len(v) for v in expected.values()) == pytest.approx(m["pixel"]["consensus"]["mean_iou"])
    html = (tmp_path / "grouped" / "report.html").read_text()
    assert "Consensus masks by group" in html and sorted(expected)[0] in html
    from typer.testing import CliRunner

    from pixelvote.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--run", str(copy), "--data", str(data), "--out",
                                   str(tmp_path / "cli"), "--max-gallery", "0"])
    assert res.exit_code == 0, res.output
    g = sorted(expected)[0]
    assert f"{g} {by_group['groups'][g]['mean_iou']:.3f} ({len(expected[g])})" in res.output
    # a pattern that matches no image leaves one group: nothing to break down
    config["train"]["group_pattern"] = r"^nothing-matches-(\d+)"
    (copy / "run.json").write_text(json.dumps(config))
    assert "by_group" not in _evaluate(copy, data, tmp_path / "none", max_gallery=0)["pixel"]


def test_a_broken_group_pattern_costs_the_breakdown_not_the_evaluation(caplog):
    from pixelvote.evaluate.run import _with_groups

    rows = [{"image": "a/Video01_1.jpg", "iou": 0.5, "dice": 0.6}, {"image": "a/Video02_1.jpg", "iou": 0.1,
                                                                  "dice": 0.2}]
    ok = _with_groups({"pixel": {"consensus": {}}}, rows, r"^(Video\d+)")
    assert ok["pixel"]["by_group"]["groups"]["Video02"] == {"images": 1, "mean_iou": 0.1, "mean_dice": 0.2}
    with caplog.at_level("WARNING"):
        broken = _with_groups({"pixel": {"consensus": {}}}, rows, r"^(Video\d+")
    assert "by_group" not in broken["pixel"] and "no figures by group" in caplog.text
