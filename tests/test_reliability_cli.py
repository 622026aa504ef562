"""Bad input through the real commands: `train`, `annotate` and `export` report each bad file once (log and
skipped.jsonl, with its path and reason), finish, and say so in the exit code (0 ok, 2 bad input or options,
3 finished with skipped inputs). Masks line up with the image as displayed."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_reliability_inputs import (
    STORE_FOR_ORIENTATION,
    displayed_with_lesion,
    exif_bytes,
    make_corpus,
)
from typer.testing import CliRunner

from pixelvote import cli
from pixelvote.cli import app
from pixelvote.data.imageio import image_size, read_image

runner = CliRunner()


def main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `pixelvote ARGS` through cli.main (the entry point, which maps errors to exit codes)."""
    monkeypatch.setattr(sys, "argv", ["pixelvote", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def lines(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


def skipped_warnings(caplog, path: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage())


_SHARED: dict[str, tuple[Path, Path, Path]] = {}


def tiny_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, data, run): one tiny trained run shared by the reliability modules (trained once a session)."""
    if "run" not in _SHARED:
        from conftest import write_blob_dataset

        root = tmp_path_factory.mktemp("rel_run")
        data = write_blob_dataset(root / "data", per_class=6)
        run = root / "run"
        r = runner.invoke(
            app,
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--no-pretrained",
                "--mc-samples",
                "2",
                "--quiet",
            ],
        )
        assert r.exit_code == 0, r.output
        _SHARED["run"] = (root, data, run)
    return _SHARED["run"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory)


# --------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def bad_training(tmp_path_factory):
    """Train on blobs + the corpus (as lesion images), a symlink loop in normal/, and a val/ split whose
    masks are of the wrong size, corrupt, 0/1-valued and 0/128/255-valued."""
    from conftest import write_blob_dataset

    root = tmp_path_factory.mktemp("rel_train")
    data = write_blob_dataset(root / "data", per_class=6)
    kinds = make_corpus(data / "images" / "lesion" / "corpus")
    val = write_blob_dataset(root / "valsrc", per_class=3)
    shutil.copytree(val, data / "val")
    vm = data / "val" / "masks" / "lesion"
    Image.new("L", (10, 10)).save(vm / "lesion 0.png")  # wrong size
    (vm / "lesion 1.png").write_bytes(b"\x89PNG not really")  # corrupt
    m = np.zeros((48, 64), np.uint8)
    m[5:15, 5:15] = 1
    Image.fromarray(m).save(vm / "lesion 2.png")  # 0/1 values: fine
    try:
        (data / "images" / "normal" / "loop").symlink_to("..")  # images/normal/loop -> images/
    except OSError:
        pass
    run = root / "run"
    logger = logging.getLogger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        r = runner.invoke(
            app,
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--epochs",
                "1",
                "--image-size",
                "32",
                "--no-pretrained",
                "--mc-samples",
                "2",
                "--quiet",
            ],
        )
    finally:
        logger.removeHandler(handler)
    return data, run, kinds, r, records


def test_train_skips_each_bad_input_once_and_finishes(bad_training):
    data, run, kinds, r, records = bad_training
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert (run / "run.json").exists() and (run / "calibration.json").exists()
    skipped = lines(run / "skipped.jsonl")
    listed = [s["image"] for s in skipped]
    bad = [str(data / "images" / "lesion" / "corpus" / n) for n, k in kinds.items() if k == "bad"]
    bad_masks = [str(data / "val" / "masks" / "lesion" / n) for n in ("lesion 0.png", "lesion 1.png")]
    assert sorted(listed) == sorted(bad + bad_masks)  # each once, nothing else
    for s in skipped:
        assert s["image"] in s["reason"] and "Fix:" in s["reason"]
    messages = [rec.getMessage() for rec in records]
    for path in bad + bad_masks:
        assert sum(path in m for m in messages) == 1, path  # reported once in the log
    split = json.loads((run / "split.json").read_text())
    used = split["train"] + split["val"]
    assert len(used) == len(set(used)) and not any("/loop/" in p for p in used)  # the loop added nothing


def test_train_exit_code_is_3_when_inputs_were_skipped(bad_training):
    _, run, _, r, _ = bad_training
    assert lines(run / "skipped.jsonl") and r.exit_code == 3


# --------------------------------------------------------------------------- annotate


@pytest.fixture(scope="module")
def annotated(trained, tmp_path_factory):
    _, _, run = trained
    root = tmp_path_factory.mktemp("rel_annotate")
    kinds = make_corpus(root / "in")
    out = root / "out"
    logger = logging.getLogger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        r = runner.invoke(
            app,
            [
                "annotate",
                "--run",
                str(run),
                "--images",
                str(root / "in"),
                "--out",
                str(out),
                "--workers",
                "0",
                "--batch-size",
                "2",
            ],
        )
    finally:
        logger.removeHandler(handler)
    return root, kinds, out, r, records


def test_annotate_reports_each_bad_file_once_and_exits_3(annotated):
    root, kinds, out, r, records = annotated
    assert r.exit_code == 3, r.output
    bad = sorted(str(root / "in" / n) for n, k in kinds.items() if k == "bad")
    skipped = lines(out / "skipped.jsonl")
    assert sorted(s["image"] for s in skipped) == bad
    assert all(s["image"] in s["reason"] for s in skipped)
    messages = [rec.getMessage() for rec in records]
    for path in bad:
        assert sum(path in m for m in messages) == 1, path


def test_annotate_writes_every_good_file_once_at_its_displayed_size(annotated):
    root, kinds, out, _, _ = annotated
    recs = lines(out / "annotations.jsonl")
    good = sorted(str((root / "in" / n).resolve()) for n, k in kinds.items() if k == "ok")
    assert sorted(rec["image"] for rec in recs) == good  # each once; the symlink loop added nothing
    assert len({rec["key"] for rec in recs}) == len(recs)
    for rec in recs:
        w, h = image_size(rec["image"])
        assert (rec["width"], rec["height"]) == (w, h)
        for name in ("mask", "uncertainty"):
            arr = np.asarray(Image.open(out / rec[name]))
            assert arr.shape == (h, w), (rec["key"], name)
        mask = np.asarray(Image.open(out / rec["mask"]))
        assert set(np.unique(mask).tolist()) <= {0, 255} and rec["mask_area"] == int((mask > 0).sum())
        assert np.asarray(Image.open(out / rec["overlay"])).shape == (h, w, 3)
    by_key = {rec["key"]: rec for rec in recs}
    assert (by_key["rotated"]["width"], by_key["rotated"]["height"]) == (80, 48)
    assert {"sub a/dup", "sub b/dup", "one by one", "scan 01 ünïcødé 日本", "v1.2.final"} <= set(by_key)
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []


def test_annotate_rerun_adds_nothing_and_still_exits_3(annotated, trained):
    root, _, out, _, _ = annotated
    before = {n: (out / n).read_bytes() for n in ("annotations.jsonl", "skipped.jsonl")}
    r = runner.invoke(
        app,
        [
            "annotate",
            "--run",
            str(trained[2]),
            "--images",
            str(root / "in"),
            "--out",
            str(out),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 3 and re.search(r"(?<!\d)0 annotated", r.output), r.output
    assert {n: (out / n).read_bytes() for n in before} == before


def test_export_of_the_corpus_output(annotated, tmp_path):
    _, kinds, out, _, _ = annotated
    n_ok = sum(k == "ok" for k in kinds.values())
    r = runner.invoke(
        app, ["export", "--from", str(out), "--format", "coco", "--to", str(tmp_path / "c.json")]
    )
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "c.json").read_text())["images"]) == n_ok
    r = runner.invoke(app, ["export", "--from", str(out), "--format", "png", "--to", str(tmp_path / "png")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "png").rglob("*.png"))) == n_ok


def test_export_skips_a_broken_mask_and_exits_3(annotated, tmp_path, monkeypatch, capsys):
    _, _, out, _, _ = annotated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    recs = lines(copy / "annotations.jsonl")
    (copy / recs[0]["mask"]).write_bytes(b"")  # zero bytes
    Image.new("L", (3, 3)).save(copy / recs[1]["mask"])  # wrong size
    code, text = main(
        monkeypatch,
        capsys,
        "export",
        "--from",
        str(copy),
        "--format",
        "coco",
        "--to",
        str(tmp_path / "c.json"),
    )
    assert code == 3, text
    assert len(json.loads((tmp_path / "c.json").read_text())["images"]) == len(recs) - 2
    skipped = [s["image"] for s in lines(tmp_path / "c_skipped.jsonl")] + [
        s["image"] for s in lines(copy / "skipped.jsonl")
    ]
    assert any(recs[0]["mask"] in s for s in skipped) and any(recs[1]["mask"] in s for s in skipped)


def test_export_never_silently_empties_a_mask_with_other_values(annotated, tmp_path):
    _, _, out, _, _ = annotated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rec = next(r for r in lines(copy / "annotations.jsonl") if r["width"] >= 20 and r["height"] >= 20)
    m = np.zeros((rec["height"], rec["width"]), np.uint8)
    m[2:10, 2:10] = 1
    Image.fromarray(m).save(copy / rec["mask"])
    r = runner.invoke(app, ["export", "--from", str(copy), "--format", "png", "--to", str(tmp_path / "png")])
    skipped = lines(tmp_path / "png" / "skipped.jsonl") + lines(copy / "skipped.jsonl")
    exported = np.asarray(Image.open(tmp_path / "png" / "masks" / f"{rec['key']}.png"))
    assert int((exported > 0).sum()) == 64 or (r.exit_code == 3 and skipped), r.output


def test_export_names_the_broken_mask(annotated, tmp_path, monkeypatch, capsys):
    """What export does today: a clear error naming the file (exit 2), never a traceback."""
    _, _, out, _, _ = annotated
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rec = lines(copy / "annotations.jsonl")[0]
    (copy / rec["mask"]).write_bytes(b"")
    code, text = main(
        monkeypatch,
        capsys,
        "export",
        "--from",
        str(copy),
        "--format",
        "coco",
        "--to",
        str(tmp_path / "c.json"),
    )
    assert code in (2, 3) and str(copy / rec["mask"]) in text and "Traceback" not in text


@pytest.mark.skipif(
    not os.environ.get("PIXELVOTE_BIG_TESTS"),
    reason="about 30 s and 6 GB of memory; set PIXELVOTE_BIG_TESTS=1 to run",
)
def test_annotate_a_10000_pixel_square_image(trained, tmp_path):
    _, _, run = trained
    (tmp_path / "in").mkdir()
    Image.new("L", (10_000, 10_000), 90).save(tmp_path / "in" / "huge.png")
    r = runner.invoke(
        app,
        [
            "annotate",
            "--run",
            str(run),
            "--images",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "out" / "masks" / "huge.png") as im:
        assert im.size == (10_000, 10_000)


# --------------------------------------------------------------------------- orientation


def test_exif_rotated_jpeg_gives_the_same_mask_as_its_upright_pixels(trained, tmp_path):
    _, _, run = trained
    (tmp_path / "rot").mkdir()
    (tmp_path / "upright").mkdir()
    for o in (6, 3, 8):
        stored = np.ascontiguousarray(STORE_FOR_ORIENTATION[o](displayed_with_lesion(seed=o)))
        Image.fromarray(stored).save(tmp_path / "rot" / f"photo{o}.jpg", quality=95, exif=exif_bytes(o))
        # the same pixels as displayed, saved without any orientation (same stem: same key, same MC seed)
        Image.fromarray(read_image(tmp_path / "rot" / f"photo{o}.jpg")).save(
            tmp_path / "upright" / f"photo{o}.png"
        )
    for name in ("rot", "upright"):
        r = runner.invoke(
            app,
            [
                "annotate",
                "--run",
                str(run),
                "--images",
                str(tmp_path / name),
                "--out",
                str(tmp_path / f"out_{name}"),
                "--workers",
                "0",
                "--threshold",
                "0.3",
            ],
        )
        assert r.exit_code == 0, r.output
    for o in (6, 3, 8):
        a = np.asarray(Image.open(tmp_path / "out_rot" / "masks" / f"photo{o}.png"))
        b = np.asarray(Image.open(tmp_path / "out_upright" / "masks" / f"photo{o}.png"))
        assert a.shape == (48, 80) and np.array_equal(a, b)
        ua = np.asarray(Image.open(tmp_path / "out_rot" / "uncertainty" / f"photo{o}.png"))
        ub = np.asarray(Image.open(tmp_path / "out_upright" / "uncertainty" / f"photo{o}.png"))
        assert np.array_equal(ua, ub)


def test_a_lesion_in_the_displayed_image_lands_in_the_mask_there(trained, tmp_path, monkeypatch):
    """Geometry end to end (decode, resize, map, resize back, write), with a stand-in explainer whose map is
    the input's brightness, so the mask must be the lesion wherever the model would have looked."""
    import pixelvote.engine.annotate as eng
    from pixelvote.explain.analyze import Analysis

    def brightness_analysis(ens, x, **kw):
        B = x.shape[0]
        g = x.float().mean(1)
        g = g / g.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1)
        maps = torch.stack([g, g])  # two members, same map
        probs = torch.tensor([0.9, 0.1]).expand(2, B, 2).clone()  # both say "lesion"
        stats = [
            {
                "mean": probs[m],
                "label": torch.zeros(B, dtype=torch.long),
                "entropy": torch.zeros(B),
                "mutual_information": torch.zeros(B),
                "variance": torch.zeros(B),
            }
            for m in range(2)
        ]
        label = torch.zeros(B, dtype=torch.long)
        return Analysis(
            ["a", "b"],
            probs,
            stats,
            probs.mean(0),
            label,
            label,
            maps,
            torch.zeros_like(maps),
            torch.ones(2, B),
        )

    monkeypatch.setattr(eng, "analyze", brightness_analysis)
    _, _, run = trained
    (tmp_path / "in").mkdir()
    shown = displayed_with_lesion(h=96, w=160)
    shown[12:36, 16:44] = 230  # a larger lesion, well above the 32 px model input's resolution
    stored = np.ascontiguousarray(STORE_FOR_ORIENTATION[6](shown))
    Image.fromarray(stored).save(tmp_path / "in" / "photo.jpg", quality=95, exif=exif_bytes(6))
    eng.annotate(
        run,
        tmp_path / "in",
        tmp_path / "out",
        num_workers=0,
        progress=False,
        consensus={
            "threshold": 0.6,
            "threshold_method": "fixed",
            "policy": "unanimous",
            "fusion": "intersection",
        },
        maps={},
    )
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "photo.png")) > 0
    assert mask.shape == (96, 160)
    lesion = np.zeros_like(mask)
    lesion[12:36, 16:44] = True
    iou = (mask & lesion).sum() / (mask | lesion).sum()
    assert iou > 0.6, iou
    assert mask[lesion].mean() > 0.9 and mask[~lesion].mean() < 0.05


# --------------------------------------------------------------------------- one output folder, many runs


def test_a_second_folder_with_the_same_stems_cannot_overwrite_masks(trained, tmp_path):
    _, data, run = trained
    src = sorted((data / "images" / "lesion").glob("*.png"))
    for name, i in (("first", 0), ("second", 1)):
        (tmp_path / name).mkdir()
        shutil.copy(src[i], tmp_path / name / "scan.png")
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            "annotate",
            "--run",
            str(run),
            "--images",
            str(tmp_path / "first"),
            "--out",
            str(out),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    mask = (out / "masks" / "scan.png").read_bytes()
    rec = lines(out / "annotations.jsonl")
    r = runner.invoke(
        app,
        [
            "annotate",
            "--run",
            str(run),
            "--images",
            str(tmp_path / "second"),
            "--out",
            str(out),
            "--workers",
            "0",
        ],
    )
    assert r.exit_code == 3, r.output
    assert (out / "masks" / "scan.png").read_bytes() == mask and lines(out / "annotations.jsonl") == rec
    (s,) = lines(out / "skipped.jsonl")
    assert s["image"] == str(tmp_path / "second" / "scan.png") and "first" in s["reason"]


def test_a_fixed_file_leaves_skipped_jsonl_when_annotated(trained, tmp_path):
    _, data, run = trained
    (tmp_path / "in").mkdir()
    shutil.copy(sorted((data / "images" / "lesion").glob("*.png"))[0], tmp_path / "in" / "good.png")
    (tmp_path / "in" / "later.png").write_bytes(b"")  # still being copied, say
    args = ["annotate", "--run", str(run), "--images", str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    assert runner.invoke(app, [*args, "--workers", "0"]).exit_code == 3
    skipped = [s["image"] for s in lines(tmp_path / "out" / "skipped.jsonl")]
    assert skipped == [str(tmp_path / "in" / "later.png")]
    shutil.copy(tmp_path / "in" / "good.png", tmp_path / "in" / "later.png")
    r = runner.invoke(app, [*args, "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert lines(tmp_path / "out" / "skipped.jsonl") == []
    assert sorted(rec["key"] for rec in lines(tmp_path / "out" / "annotations.jsonl")) == ["good", "later"]


def test_two_annotate_runs_cannot_write_one_folder_at_once(trained, tmp_path, monkeypatch, capsys):
    pytest.importorskip("fcntl")
    _, data, run = trained
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another process holding the folder's lock, as a running annotate does
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('locked', flush=True); time.sleep(60)",
            str(out / ".annotate.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, text = main(
            monkeypatch,
            capsys,
            "annotate",
            "--run",
            str(run),
            "--images",
            str(data / "images"),
            "--out",
            str(out),
            "--workers",
            "0",
        )
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and "another `pixelvote annotate` is writing" in text and str(out) in text
    assert not (out / "annotations.jsonl").exists()
    code, text = main(
        monkeypatch,
        capsys,
        "annotate",
        "--run",
        str(run),
        "--images",  # the lock died with it
        str(data / "images" / "lesion"),
        "--out",
        str(out),
        "--workers",
        "0",
    )
    assert code == 0, text


def test_annotate_into_a_folder_of_other_classes_is_refused(trained, tmp_path, monkeypatch, capsys):
    _, data, run = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotate.json").write_text(json.dumps({"format_version": 1, "classes": ["cat", "dog"]}))
    code, text = main(
        monkeypatch,
        capsys,
        "annotate",
        "--run",
        str(run),
        "--images",
        str(data / "images"),
        "--out",
        str(out),
        "--workers",
        "0",
    )
    assert code == 2 and str(out) in text and "['cat', 'dog']" in text and "Traceback" not in text
