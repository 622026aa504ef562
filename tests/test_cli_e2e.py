"""train -> annotate -> export through the real CLI on generated data (tiny models, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pixelvote.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import write_blob_dataset

    root = tmp_path_factory.mktemp("e2e")
    data = write_blob_dataset(root / "data", per_class=12)
    run = root / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                            "--epochs", "2", "--image-size", "64", "--no-pretrained", "--mc-samples", "4",
                            "--quiet"])
    assert r.exit_code == 0, r.output
    return root, data, run


def test_train_writes_a_self_describing_run(trained):
    _, _, run = trained
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["classes"] == ["lesion", "normal"] and cfg["background"] == "normal"
    assert [m["name"] for m in cfg["members"]] == ["tiny_cnn_a", "tiny_cnn_b"]
    assert all((run / m["file"]).exists() and m["file"].endswith(".safetensors") for m in cfg["members"])
    assert 0.1 <= cfg["consensus"]["threshold"] <= 0.9
    assert cfg["consensus"]["threshold_source"].startswith("validation")
    history = json.loads((run / "history.json").read_text())
    assert {h["member"] for h in history} == {"tiny_cnn_a", "tiny_cnn_b"}
    split = json.loads((run / "split.json").read_text())
    assert set(split["train"]).isdisjoint(split["val"]) and len(split["train"]) + len(split["val"]) == 24


def test_train_tries_the_crf_weights_given_and_says_what_it_chose(tmp_path):
    from conftest import write_blob_dataset

    from pixelvote.models.checkpoint import read_run_config
    from pixelvote.refine import crf

    data = write_blob_dataset(tmp_path / "data", per_class=12)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                            "--epochs", "1", "--image-size", "48", "--no-pretrained", "--mc-samples", "2",
                            "--val-fraction", "0.4", "--crf-weights", "4,25", "--crf-iterations", "7,2",
                            "--crf-cutoffs", "0.4", "--colour-weights", "0.5,1", "--tone-weights", "0.4",
                            "--quiet",
                            # every recipe's CRF grid scored on all seven fusions, up to 2.5 plain
                            # analyses (7 iterations cost more than 2 beside the tiny models)
                            "--crf-recipes", "7", "--crf-bases", "8", "--max-map-cost", "2.5"])
    assert r.exit_code == 0, r.output
    sel = json.loads((run / "calibration.json").read_text())["selection"]
    assert f"with {sel['recipe']} maps and {sel['fusion']} fusion" in r.output  # what was chosen, said
    fusions = {k.partition("+")[2] for k in sel["candidates"] if k.startswith("plain+")}
    crf_rows = {f for f in fusions if "crf" in f and "colour" not in f and "tone" not in f}
    tried = {f"{f}+crf:{w}:{n}:0.4" for f in ("intersection", "mean") for w in (4, 25) for n in (2, 7)}
    assert crf_rows == (tried if crf.available() else set())
    # the colour prior at each weight given, alone and under each CRF setting of the mean fusion
    colour_rows = {f for f in fusions if "colour" in f and "tone" not in f}
    crfs = [f"+crf:{w}:{n}:0.4" for w in (4, 25) for n in (2, 7)] if crf.available() else []
    assert colour_rows == {f"mean*colour:{c}{s}" for c in ("0.5", "1") for s in ["", *crfs]}
    # the tone map at the weight given, with every mean fusion (with and without the colour prior)
    tone_rows = {f for f in fusions if "tone" in f}
    assert tone_rows == {f"mean{c}*tone:0.4{s}" for c in ("", "*colour:0.5", "*colour:1")
                         for s in ["", *crfs]}
    assert read_run_config(run).consensus.tone in ("dark", "bright")
    assert read_run_config(run).consensus.colour_prior is not None
    chosen = read_run_config(run).consensus  # the one cutoff given, where the CRF was chosen
    assert chosen.crf.cutoff == (0.4 if chosen.refine == "crf" else 0.5)
    # the diagnosis with the colour evidence, tried at each weight given
    held = json.loads((run / "calibration.json").read_text())["decision"]["evidence"]["held_out_accuracy"]
    assert set(held) == {"threshold", "evidence:0.5", "evidence:1"}
    off = tmp_path / "off"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(off), "--preset", "tiny", "--epochs",
                            "1", "--image-size", "48", "--no-pretrained", "--mc-samples", "2",
                            "--val-fraction", "0.4", "--no-crf", "--no-colour", "--no-tone", "--quiet"])
    assert r.exit_code == 0, r.output
    assert read_run_config(off).consensus.colour_prior is None  # not learned
    assert read_run_config(off).consensus.tone is None
    assert not any("colour" in k or "tone" in k
                   for k in json.loads((off / "calibration.json").read_text())["selection"]["candidates"])
    assert "evidence" not in json.loads((off / "calibration.json").read_text())["decision"]
    no_ev = tmp_path / "no-evidence"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(no_ev), "--preset", "tiny", "--epochs",
                            "1", "--image-size", "48", "--no-pretrained", "--mc-samples", "2",
                            "--val-fraction", "0.4", "--no-crf", "--no-colour-evidence", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "evidence" not in json.loads((no_ev / "calibration.json").read_text())["decision"]
    assert read_run_config(no_ev).decision_evidence is None
    assert read_run_config(no_ev).consensus.colour_prior is not None  # still tried as a recipe


@pytest.mark.parametrize(("option", "bad"), [("--crf-iterations", b) for b in ("0", "3,x", "2.5", "60")]
                         + [("--crf-cutoffs", b) for b in ("0", "0.3,1", "x", "")]
                         + [("--crf-sizes", b) for b in ("8", "128,160.5", "x", "")])
def test_train_refuses_bad_crf_settings_before_training(tmp_path, option, bad):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), option, bad,
                            "--quiet"])
    assert r.exit_code != 0 and option in str(r.exception)
    assert not (tmp_path / "run").exists()


def test_existing_run_is_not_overwritten(trained):
    _, data, run = trained
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                            "--no-pretrained"])
    assert r.exit_code != 0 and "--resume" in str(r.exception)


def test_annotate_resume_and_bad_files(trained, tmp_path):
    _, data, run = trained
    imgs = tmp_path / "in"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir()
    src = sorted((data / "images" / "lesion").glob("*.png"))
    Image.open(src[0]).save(imgs / "a" / "same.png")
    Image.open(src[1]).save(imgs / "b" / "same.png")  # stem collision -> sub-folders kept
    Image.open(src[2]).convert("RGB").save(imgs / "odd name é.jpg")
    (imgs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(imgs), "--out", str(out),
                            "--workers", "0", "--mc-samples", "4"])
    assert r.exit_code == 3, r.output  # 3 = finished, but something was skipped
    recs = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert sorted(r_["key"] for r_ in recs) == ["a/same", "b/same", "odd name é"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["image"].endswith("broken.png")
    for rec in recs:
        mask = np.asarray(Image.open(out / rec["mask"]))
        assert mask.shape == (rec["height"], rec["width"]) and set(np.unique(mask)) <= {0, 255}
        assert rec["mask_area"] == int((mask > 0).sum())
        assert Image.open(out / rec["overlay"]).mode == "RGB"
        assert np.asarray(Image.open(out / rec["uncertainty"])).shape == mask.shape
        assert set(rec["members"]) == {"tiny_cnn_a", "tiny_cnn_b"}
        assert rec["flagged"] == bool(rec["reasons"])
        assert abs(sum(rec["probabilities"].values()) - 1) < 1e-4
    before = (out / "annotations.jsonl").read_text()
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(imgs), "--out", str(out),
                            "--workers", "0"])
    assert "0 annotated, 3 already done" in r.output
    assert (out / "annotations.jsonl").read_text() == before
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1

    r = runner.invoke(app, ["export", "--from", str(out), "--format", "coco",
                            "--to", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    coco = json.loads((tmp_path / "c.json").read_text())
    assert len(coco["images"]) == 3


def test_cli_reports_errors_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "train", "--data", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "r"), "--no-pretrained"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "error:" in p.stderr and "dataset not found" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "annotate", "--run", str(tmp_path),
                        "--images", str(tmp_path), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "not a pixelvote run" in p.stderr and "Traceback" not in p.stderr
    for weights, problem in (("10,ten", "not a comma-separated list of numbers"),
                             ("-1", "must be one or more numbers >= 0")):
        p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "train", "--data", str(tmp_path), "--out",
                            str(tmp_path / "r"), f"--crf-weights={weights}"], capture_output=True, text=True)
        assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr
        assert "--crf-weights 10,30" in p.stderr  # the fix
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "train", "--data", str(tmp_path), "--out",
                        str(tmp_path / "colour"), "--colour-weights=0.5,2"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--colour-weights 0.5,2: the colour prior's weights must be numbers above 0" in p.stderr
    assert not (tmp_path / "colour").exists()
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "train", "--data", str(tmp_path), "--out",
                        str(tmp_path / "tone"), "--tone-weights=0.5,1"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--tone-weights 0.5,1: the tone map's weights must be numbers between 0 and 1" in p.stderr
    assert not (tmp_path / "tone").exists()


def test_annotate_without_a_working_opencv_says_how_to_install_it(trained, tmp_path, monkeypatch):
    import types

    from pixelvote.engine.annotate import annotate
    from pixelvote.errors import ConfigError

    root, data, run = trained
    out = tmp_path / "o"
    script = ("import sys; sys.modules['cv2'] = None; from pixelvote.cli import main; "
              f"sys.argv = ['pixelvote', 'annotate', '--run', {str(run)!r}, '--images', {str(data)!r}, "
              f"'--out', {str(out)!r}]; main()")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "OpenCV (cv2), which writes annotate's files, cannot be imported" in p.stderr
    assert "pip install --force-reinstall 'opencv-python-headless>=4.11'" in p.stderr
    assert not out.exists()  # said before anything was written
    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="4.5.5"))
    with pytest.raises(ConfigError, match="OpenCV 4.5.5 is too old") as err:
        annotate(run, data, out)
    assert "opencv-python-headless>=4.11" in str(err.value) and not out.exists()


def test_segmenter_stage_two_through_the_cli(trained, tmp_path):
    _, data, run = trained
    out = tmp_path / "out"
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(data / "images"),
                            "--out", str(out), "--workers", "0", "--mc-samples", "2"])
    assert r.exit_code == 0, r.output
    seg = tmp_path / "seg"
    r = runner.invoke(app, ["segment", "train", "--annotations", str(out), "--out", str(seg), "--all",
                            "--epochs", "1", "--image-size", "64", "--no-pretrained", "--device", "cpu",
                            "--crf-iterations", "1,2"])
    assert r.exit_code == 0, r.output
    settings = json.loads((seg / "calibration.json").read_text()).get("crf_settings")
    if settings is not None:  # pydensecrf2 installed: the iterations asked for, and the run's own (5)
        assert {k.split(" iterations")[0] for k in settings} == {"1", "2", "5"}
    # the run that annotated OUT lends its validation masks to choose the thresholds, and the choice is said
    scfg = json.loads((seg / "segmenter.json").read_text())
    assert scfg["threshold_source"].startswith(f"validation masks of {run.resolve()}")
    assert f"mask at {scfg['threshold']} (IoU " in r.output
    r = runner.invoke(app, ["segment", "calibrate", "--segmenter", str(seg), "--run", str(run),
                            "--crf-iterations", "1,2"])
    assert r.exit_code == 0, r.output
    assert json.loads((seg / "segmenter.json").read_text()) == scfg  # the same choice again
    for bad, problem in ((["--segmenter", str(out), "--run", str(run)], "not a segmenter run"),
                         (["--segmenter", str(seg), "--run", str(out)], "not a pixelvote run"),
                         (["--segmenter", str(seg), "--run", str(run), "--crf-iterations", "2,0"],
                          "--crf-iterations 2,0: not whole numbers from 1 to 50"),
                         (["--segmenter", str(seg), "--run", str(run), "--crf-iterations", "2.5"],
                          "e.g. --crf-iterations 2,3,5,10")):
        p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "segment", "calibrate", *bad],
                           capture_output=True, text=True)
        assert p.returncode == 2 and problem in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "pixelvote.cli", "segment", "train", "--annotations", str(out),
                        "--out", str(tmp_path / "seg2"), "--crf-iterations", "three"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "--crf-iterations three: not a comma-separated list" in p.stderr, p.stderr
    assert not (tmp_path / "seg2").exists()  # refused before anything was trained
    out2 = tmp_path / "out2"
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(data / "images" / "lesion"),
                            "--out", str(out2), "--workers", "0", "--segmenter", str(seg),
                            "--mc-samples", "2"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(line) for line in (out2 / "annotations.jsonl").read_text().splitlines()]
    assert len(recs) == 12
    for rec in recs:
        mask = np.asarray(Image.open(out2 / rec["mask"]))
        assert rec["mask_area"] == int((mask > 0).sum())
        if rec["label"] == "normal":
            assert rec["mask_area"] == 0
        assert set(rec["reasons"]) <= {"disagreement", "high_mutual_information", "high_variance",
                                       "low_confidence", "empty_mask", "no_agreeing_member",
                                       "segmenter_disagrees"}


def test_improve_loop_with_simulated_review(trained, tmp_path):
    _, data, run = trained
    work = tmp_path / "work"
    r = runner.invoke(app, ["improve", "--run", str(run), "--images", str(data / "images"),
                            "--out", str(work), "--truth", str(data), "--review-fraction", "0.5",
                            "--seg-epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    log = json.loads((work / "improve_log.json").read_text())
    assert [e["round"] for e in log] == [0, 1]
    assert log[0]["masks_from"] == "consensus" and log[1]["masks_from"] == "segmenter"
    seg_cfg = json.loads((work / "round0" / "segmenter" / "segmenter.json").read_text())
    assert log[1]["segmenter_thresholds"] == {k: seg_cfg[k] for k in (
        "threshold", "crf_threshold", "crf_iterations", "crf_cutoff", "use_crf", "threshold_source")}
    assert seg_cfg["threshold_source"].startswith("validation masks of ")  # the run's, which --truth rescores
    assert log[0]["simulated_reviews"] == 6 and log[0]["reviewed"] == 6
    # the reviewed images are excluded from the score, so both rounds score the same 6 images
    assert log[0]["validation"]["images"] == log[1]["validation"]["images"] == 6
    recs = [json.loads(x)
            for x in (work / "round1" / "annotations" / "annotations.jsonl").read_text().splitlines()]
    reviewed = [x for x in recs if x.get("reviewed")]
    assert len(reviewed) == 6
    for x in reviewed:  # reviewed masks carried over: identical to the truth
        truth = np.asarray(Image.open(data / "masks" / "lesion" / (Path(x["image"]).stem + ".png"))) > 0
        pred = np.asarray(Image.open(work / "round1" / "annotations" / x["mask"])) > 0
        assert (truth == pred).all()


def test_improve_can_combine_several_segmenters_per_round(trained, tmp_path):
    _, data, run = trained
    work = tmp_path / "work"
    r = runner.invoke(app, ["improve", "--run", str(run), "--images", str(data / "images"),
                            "--out", str(work), "--truth", str(data), "--review-fraction", "0.5",
                            "--seg-epochs", "1", "--seg-members", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    seg = work / "round0" / "segmenter"
    seg_cfg = json.loads((seg / "segmenter.json").read_text())
    assert [m["source"] for m in seg_cfg["members"]] == [str((seg / f"member-{i}").resolve()) for i in (0, 1)]
    seeds = [json.loads((seg / f"member-{i}" / "segmenter.json").read_text())["seed"] for i in (0, 1)]
    assert seeds == [0, 1]
    log = json.loads((work / "improve_log.json").read_text())
    assert log[1]["masks_from"] == "segmenter"
    assert log[1]["segmenter_thresholds"]["threshold_source"].startswith("validation masks of ")


def test_annotate_contrast_flag_changes_the_maps_not_the_diagnosis(trained, tmp_path):
    _, data, run = trained
    imgs = data / "images" / "lesion"
    outs = {}
    for flag in ("--no-contrast", "--contrast"):
        out = tmp_path / flag
        r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(imgs), "--out", str(out),
                                "--mc-samples", "2", "--no-crf", flag])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "annotate.json").read_text())["maps"]["contrast"] is (flag == "--contrast")
        outs[flag] = {json.loads(line)["image"]: json.loads(line)
                      for line in (out / "annotations.jsonl").read_text().splitlines()}
    plain, contrast = outs["--no-contrast"], outs["--contrast"]
    assert plain.keys() == contrast.keys()
    assert all(plain[k]["label"] == contrast[k]["label"] for k in plain)
    heat = [np.asarray(Image.open(tmp_path / f / "overlays" / (Path(k).stem + ".jpg")), dtype=float)
            for f, k in (("--no-contrast", next(iter(plain))), ("--contrast", next(iter(plain))))]
    assert np.abs(heat[0] - heat[1]).mean() > 0.5  # the overlays show different maps


def test_annotate_with_labels_explains_each_images_own_class(trained, tmp_path):
    _, data, run = trained
    out = tmp_path / "labelled"
    # the dataset root: images/<class>/..., and masks/ beside it, which are not inputs
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(data), "--out", str(out),
                            "--mc-samples", "2", "--no-crf", "--labels"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(recs) == 24  # the 24 images, not the 12 masks
    for x in recs:
        truth = Path(x["image"]).parent.name
        assert x["label"] == truth and x["label_given"] is True
        assert ("label_disagrees" in x["reasons"]) == (x["diagnosis"] != truth)
        if truth == "normal":
            assert x["mask_area"] == 0
        else:
            assert x["target_class"] == "lesion"
    # without --labels the diagnosis is the label
    plain = tmp_path / "plain"
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(data / "images"), "--out",
                            str(plain),
                            "--mc-samples", "2", "--no-crf"])
    assert r.exit_code == 0, r.output
    for x in map(json.loads, (plain / "annotations.jsonl").read_text().splitlines()):
        assert x["label"] == x["diagnosis"] and x["label_given"] is False


def test_annotate_labels_errors_name_the_problem(trained, tmp_path):
    _, data, run = trained
    src = sorted((data / "images" / "lesion").glob("*.png"))[0]
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.open(src).save(loose / "x.png")
    wrong = tmp_path / "wrong" / "tumour"
    wrong.mkdir(parents=True)
    Image.open(src).save(wrong / "x.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{src}\n")
    unlabelled = tmp_path / "u.csv"
    unlabelled.write_text(f"path,label\n{src},\n")
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(data), "--out",
                            str(tmp_path / "o"), "--labels", "--engine", "ray"])
    assert r.exit_code != 0 and "not available with --engine ray" in str(r.exception)
    for images, message in ((loose, "not inside a class folder"), (wrong.parent, "not classes of this run"),
                            (manifest, "no 'label' column"), (unlabelled, "has no label")):
        r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(images), "--out",
                                str(tmp_path / "o"), "--labels"])
        assert r.exit_code != 0
        assert message in str(r.exception) or message in r.output, (images, r.output, r.exception)


def test_annotate_labels_from_a_csv_manifest(trained, tmp_path):
    _, data, run = trained
    src = sorted((data / "images" / "lesion").glob("*.png"))[:2]
    manifest = tmp_path / "m.csv"
    # the second image is labelled background: it gets no mask whatever the models see
    manifest.write_text(f"path,label\n{src[0]},lesion\n{src[1]},normal\n")
    out = tmp_path / "o"
    r = runner.invoke(app, ["annotate", "--run", str(run), "--images", str(manifest), "--out", str(out),
                            "--mc-samples", "2", "--no-crf", "--labels"])
    assert r.exit_code == 0, r.output
    lines = (out / "annotations.jsonl").read_text().splitlines()
    recs = {Path(x["image"]).name: x for x in map(json.loads, lines)}
    assert recs[src[0].name]["label"] == "lesion" and recs[src[1].name]["label"] == "normal"
    assert recs[src[1].name]["mask_area"] == 0


def test_improve_with_labels_annotates_by_the_labels(trained, tmp_path):
    _, data, run = trained
    work = tmp_path / "work"
    r = runner.invoke(app, ["improve", "--run", str(run), "--images", str(data / "images"), "--out",
                            str(work), "--truth", str(data), "--review-fraction", "0.5", "--seg-epochs", "1",
                            "--device", "cpu", "--labels"])
    assert r.exit_code == 0, r.output
    for rnd in ("round0", "round1"):
        lines = (work / rnd / "annotations" / "annotations.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        assert len(recs) == 24
        assert all(x["label"] == Path(x["image"]).parent.name for x in recs if not x.get("reviewed"))
        assert all(x["label_given"] for x in recs if not x.get("reviewed"))
