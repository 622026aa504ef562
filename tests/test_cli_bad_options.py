"""Bad paths and option values that used to end in a traceback, a misleading fix or a silently mixed output
folder: each is now a message naming the path or option and the fix, with exit code 2, and nothing is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_reliability_cli import main, tiny_run

from pixelvote.errors import ConfigError
from pixelvote.models.ensemble import resolve_device


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("keep me")
    return f


def annotate_args(run: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["annotate", "--run", str(run), "--images", str(images), "--out", str(out), "--mc-samples", "2",
            "--batch-size", "4", "--workers", "0", "--quiet", *extra]


# --------------------------------------------------------------------------- output paths that are files


def test_out_that_is_a_file_is_refused_before_any_work(monkeypatch, capsys, trained, a_file):
    _, data, run = trained
    commands = {
        "train": ["train", "--data", str(data), "--out", str(a_file), "--preset", "tiny", "--no-pretrained"],
        "annotate": annotate_args(run, data / "images", a_file),
        "evaluate": ["evaluate", "--run", str(run), "--data", str(data), "--out", str(a_file)],
        "demo": ["demo", "--where", str(a_file), "--epochs", "1"],
    }
    for name, args in commands.items():
        code, text = main(monkeypatch, capsys, *args)
        assert code == 2, (name, text)
        assert f"{a_file}: --{'where' if name == 'demo' else 'out'} is a file, not a folder" in text, name
        assert "Traceback" not in text
        assert a_file.read_text() == "keep me"


def test_out_inside_a_file_is_refused(monkeypatch, capsys, trained, a_file):
    _, data, run = trained
    code, text = main(monkeypatch, capsys, *annotate_args(run, data / "images", a_file / "sub"))
    assert code == 2
    assert f"lies inside {a_file}, which is a file" in text


def test_an_os_error_the_checks_did_not_foresee_is_a_message(monkeypatch, capsys, trained, tmp_path):
    _, data, run = trained
    import pixelvote.engine.annotate as engine

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "masks" / "x.png"))

    monkeypatch.setattr(engine, "annotate", full_disk)
    code, text = main(monkeypatch, capsys, *annotate_args(run, data / "images", tmp_path / "out"))
    assert code == 2
    assert f"error: {tmp_path / 'out' / 'masks' / 'x.png'}: No space left on device. Fix:" in text
    assert "Traceback" not in text


# --------------------------------------------------------------------------- option values


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device tpu: not a device name"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="pixelvote runs on cpu, cuda or mps"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU.*Fix: --device cpu"):
            resolve_device("cuda:1")


def test_bad_device_through_the_commands(monkeypatch, capsys, trained, tmp_path):
    _, data, run = trained
    args = annotate_args(run, data / "images", tmp_path / "o", "--device", "tpu")
    code, text = main(monkeypatch, capsys, *args)
    assert code == 2 and "--device tpu: not a device name" in text
    assert not (tmp_path / "o" / "annotations.jsonl").exists()
    code, text = main(monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"),
                      "--preset", "tiny", "--no-pretrained", "--device", "tpu")
    assert code == 2 and "--device tpu: not a device name" in text
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_seed_and_sample_counts_out_of_range(monkeypatch, capsys, trained, tmp_path):
    _, data, run = trained
    code, text = main(monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"),
                      "--preset", "tiny", "--no-pretrained", "--seed", "-5")
    assert code == 2 and "--seed" in text and "greater than or equal to 0" in text
    for option, value in (("--mc-samples", "0"), ("--mc-samples", "-3"), ("--workers", "-1")):
        args = annotate_args(run, data / "images", tmp_path / "o")
        args[args.index(option) + 1] = value
        code, text = main(monkeypatch, capsys, *args)
        assert code == 2, (option, value, text)
        assert option in text and "Traceback" not in text
    code, text = main(monkeypatch, capsys, "evaluate", "--run", str(run), "--data", str(data), "--out",
                      str(tmp_path / "e"), "--mc-samples", "0")
    assert code == 2 and "--mc-samples" in text


def test_list_options_suggest_a_value_they_accept(monkeypatch, capsys, trained, tmp_path):
    _, data, _ = trained
    code, text = main(monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"),
                      "--preset", "tiny", "--no-pretrained", "--tone-weights", "x")
    assert code == 2 and "Fix: e.g. --tone-weights 0.3,0.5" in text
    code, _ = main(monkeypatch, capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"),
                   "--preset", "tiny", "--no-pretrained", "--epochs", "1", "--image-size", "32",
                   "--tone-weights", "0.3,0.5", "--no-crf", "--mc-samples", "2", "--quiet")
    assert code == 0  # the suggested value is one train takes


# --------------------------------------------------------------------------- CSV manifests for annotate


@pytest.mark.parametrize(("content", "message"), [
    (b"path,label\n", "CSV manifest lists no images"),
    (b"path,label\n,lesion\n", "line 2 has an empty path"),
    ("path\nl\xe9sion 0.png\n".encode("latin-1"), "CSV manifest is not UTF-8 text"),
])
def test_annotate_csv_problems(monkeypatch, capsys, trained, tmp_path, content, message):
    _, data, run = trained
    csv = data / "images" / "lesion" / f"{tmp_path.name}.csv"
    csv.write_bytes(content)
    try:
        code, text = main(monkeypatch, capsys, *annotate_args(run, csv, tmp_path / "o"))
    finally:
        csv.unlink()
    assert code == 2, text
    assert f"{csv}: {message}" in text and "Traceback" not in text


# --------------------------------------------------------------------------- runs and their folders


def test_resume_with_corrupt_saved_settings_or_commit_record(monkeypatch, capsys, trained, tmp_path):
    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "train_config.json").write_text("{ not json")
    code, text = main(monkeypatch, capsys, "train", "--out", str(copy), "--resume")
    assert code == 2 and "saved settings are corrupt" in text and "another --out" in text

    shutil.copy(run / "train_config.json", copy / "train_config.json")
    (copy / "checkpoint" / "state.json").write_text("[1, 2")
    code, text = main(monkeypatch, capsys, "train", "--out", str(copy), "--resume")
    state = copy / "checkpoint" / "state.json"
    assert code == 2 and f"{state}: the training checkpoint's commit record is corrupt" in text


def test_one_background_class_asks_for_findings(monkeypatch, capsys, trained, tmp_path):
    _, data, _ = trained
    only = tmp_path / "only"
    shutil.copytree(data / "images" / "normal", only / "images" / "normal")
    code, text = main(monkeypatch, capsys, "train", "--data", str(only), "--out", str(tmp_path / "r"),
                      "--preset", "tiny", "--no-pretrained")
    assert code == 2 and "only one class found (['normal'])" in text
    assert "add a folder of images with the finding" in text


def test_evaluate_class_map_and_split_fix_are_cli_options(monkeypatch, capsys, trained, tmp_path):
    _, data, run = trained
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    for kind in ("images", "masks"):
        (renamed / kind / "lesion").rename(renamed / kind / "tumour")
    base = ["evaluate", "--run", str(run), "--data", str(renamed), "--mc-samples", "2", "--max-gallery", "0"]
    code, text = main(monkeypatch, capsys, *base, "--out", str(tmp_path / "e1"))
    assert code == 2 and "--class-map '<data class>:<run class>'" in text
    code, text = main(monkeypatch, capsys, *base, "--out", str(tmp_path / "e2"), "--class-map", "tumour")
    assert code == 2 and "not a list of 'data class:run class' pairs" in text
    code, text = main(monkeypatch, capsys, *base, "--out", str(tmp_path / "e3"),
                      "--class-map", "tumour:lesion")
    assert code == 0, text
    metrics = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert metrics["n_images"] == 12  # every image of the renamed data, scored against the run's classes
    code, text = main(monkeypatch, capsys, "evaluate", "--run", str(run), "--data", str(data), "--out",
                      str(tmp_path / "e4"), "--split", "test")
    assert code == 2 and "--split all" in text and "split='all'" not in text


def test_annotating_into_a_folder_of_another_recipe_is_refused(monkeypatch, capsys, trained, tmp_path):
    _, data, run = trained
    out = tmp_path / "out"
    assert main(monkeypatch, capsys, *annotate_args(run, data / "images", out))[0] == 0
    meta = (out / "annotate.json").read_text()
    masks = {p.name: p.read_bytes() for p in (out / "masks").iterdir()}
    code, text = main(monkeypatch, capsys, *annotate_args(run, data / "images", out, "--threshold", "0.9"))
    assert code == 2
    assert "annotated with another run or recipe" in text and "threshold" in text and "0.9" in text
    assert (out / "annotate.json").read_text() == meta  # what the folder holds is still described right
    assert {p.name: p.read_bytes() for p in (out / "masks").iterdir()} == masks
    code, text = main(monkeypatch, capsys, *annotate_args(run, data / "images", out))
    assert code == 0 and "0 annotated, 12 already done" in text  # the same recipe resumes as before


def test_an_unfinished_run_is_used_with_a_warning(monkeypatch, capsys, caplog, trained, tmp_path):
    _, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert (copy / "checkpoint" / "state.json").exists()
    (copy / "calibration.json").unlink()
    code, _ = main(monkeypatch, capsys, *annotate_args(copy, data / "images", tmp_path / "o"))
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert warned and f"pixelvote train --out {copy} --resume" in warned[0]
    caplog.clear()
    assert main(monkeypatch, capsys, *annotate_args(run, data / "images", tmp_path / "o2"))[0] == 0
    assert not [r for r in caplog.records if "did not finish" in r.getMessage()]


def test_only_reviewed_without_apply_to_does_not_start_the_desk(monkeypatch, capsys, tmp_path):
    code, text = main(monkeypatch, capsys, "review", str(tmp_path), "--only-reviewed")
    assert code == 2 and "no --apply-to was given" in text and "Fix: add --apply-to NEW_FOLDER" in text
