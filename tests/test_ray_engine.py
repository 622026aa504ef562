"""The Ray engine writes what the local engine writes (on a local Ray instance, num_cpus=2, tiny models)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pixelvote.cli import app
from pixelvote.engine.annotate import annotate, resolve_recipe
from pixelvote.engine.inputs import list_inputs
from pixelvote.errors import ConfigError

try:
    import ray
except ImportError:  # the optional extra is not installed
    ray = None  # type: ignore[assignment]

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'pixelvote[ray]')")
FILES = ("mask", "overlay", "uncertainty")
T = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run, and an input folder with a stem collision, a JPEG with an odd name and a broken file."""
    from conftest import write_blob_dataset

    root = tmp_path_factory.mktemp("ray")
    data = write_blob_dataset(root / "data", per_class=6)
    run = root / "run"
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                 "--epochs", "2", "--image-size", "64", "--no-pretrained",
                                 "--mc-samples", str(T), "--quiet"])
    assert r.exit_code == 0, r.output
    imgs = root / "in"
    shutil.copytree(data / "images", imgs)
    (imgs / "a").mkdir()
    (imgs / "b").mkdir()
    lesions = sorted((data / "images" / "lesion").glob("*.png"))
    Image.open(lesions[0]).save(imgs / "a" / "same.png")
    Image.open(lesions[1]).save(imgs / "b" / "same.png")
    Image.open(lesions[2]).convert("RGB").save(imgs / "odd name é.jpg")
    (imgs / "broken.png").write_bytes(b"not an image")
    return run, imgs


@pytest.fixture(scope="module")
def local_out(trained, tmp_path_factory):
    run, imgs = trained
    out = tmp_path_factory.mktemp("local") / "out"
    s = annotate(run, imgs, out, batch_size=4, mc_samples=T, num_workers=0, progress=False)
    assert s.annotated == 15 and s.skipped == 1
    return out


@pytest.fixture(scope="module")
def ray_local():
    if ray is None:
        pytest.skip("ray is not installed (pip install 'pixelvote[ray]')")
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "annotations.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_close(a, b, where: str = "") -> None:
    """Equal, floats within 1e-6."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-6), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def assert_same_outputs(local: Path, other: Path, *, same_image: bool = True) -> None:
    ra, rb = records(local), records(other)
    assert [r["key"] for r in ra] == [r["key"] for r in rb]  # the same images, in the same order
    for a, b in zip(ra, rb, strict=True):
        if not same_image:
            a, b = {**a, "image": None}, {**b, "image": None}
        assert_close(a, b, a["key"])
        ma, mb = np.asarray(Image.open(local / a["mask"])), np.asarray(Image.open(other / b["mask"]))
        assert ma.dtype == mb.dtype and np.array_equal(ma, mb), f"mask of {a['key']} differs"
        for k in ("overlay", "uncertainty"):
            assert np.array_equal(np.asarray(Image.open(local / a[k])), np.asarray(Image.open(other / b[k])))


@needs_ray
def test_ray_engine_writes_what_the_local_engine_writes_despite_a_dead_worker(trained, local_out, ray_local,
                                                                               tmp_path):
    from pixelvote.engine.ray_engine import annotate_ray

    run, imgs = trained
    out, marker = tmp_path / "out", tmp_path / "worker-died"
    # another batch size than the local run: per-image seeds make results independent of batching
    s = annotate_ray(run, imgs, out, batch_size=3, mc_samples=T, num_workers=2, progress=False,
                     _fault_marker=str(marker))
    assert marker.exists()  # a worker did die (os._exit) on its first batch; Ray restarted it and retried
    assert (s.total, s.annotated, s.already_done, s.skipped) == (16, 15, 0, 1)
    assert_same_outputs(local_out, out)
    assert (out / "skipped.jsonl").read_text() == (local_out / "skipped.jsonl").read_text()
    for k in FILES:  # byte for byte, too: the same PNG encoder settings
        assert all((out / r[k]).read_bytes() == (local_out / r[k]).read_bytes() for r in records(out))
    meta_l, meta_r = (json.loads((o / "annotate.json").read_text()) for o in (local_out, out))
    assert {**meta_l, "created": None} == {**meta_r, "created": None}


@needs_ray
def test_ray_rerun_skips_what_is_finished(trained, local_out, ray_local, tmp_path):
    """A local run killed after 3 images (a torn 4th line) is finished by the Ray engine, and a rerun of it
    annotates nothing."""
    from pixelvote.engine.ray_engine import annotate_ray

    run, imgs = trained
    out = tmp_path / "out"
    shutil.copytree(local_out, out)
    full = (local_out / "annotations.jsonl").read_text(encoding="utf-8")
    lines = full.splitlines(keepends=True)
    (out / "annotations.jsonl").write_text("".join(lines[:3]) + lines[3][:40], encoding="utf-8")
    s = annotate_ray(run, imgs, out, batch_size=4, mc_samples=T, num_workers=2, progress=False)
    assert (s.annotated, s.already_done, s.skipped) == (12, 3, 1)
    assert (out / "annotations.jsonl").read_text(encoding="utf-8") == full
    s = annotate_ray(run, imgs, out, batch_size=4, mc_samples=T, num_workers=1, progress=False)
    assert (s.annotated, s.already_done, s.skipped) == (0, 15, 1)
    assert (out / "annotations.jsonl").read_text(encoding="utf-8") == full
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1


def test_a_folder_uri_is_listed_and_read_like_the_local_folder(trained, local_out):
    """An fsspec URI (memory://, in this process) through the worker's own code, without Ray: the same keys,
    records (named by URI) and files as the local engine."""
    pytest.importorskip("pyarrow")
    fsspec = pytest.importorskip("fsspec")
    from pixelvote.engine.ray_engine import _Annotator, _row, list_uri_inputs, resolve_inputs, ship
    from pixelvote.models.checkpoint import read_run_config

    run, imgs = trained
    mem = fsspec.filesystem("memory")
    for p in imgs.rglob("*"):
        if p.is_file():
            mem.pipe(f"memory://pixelvote-test/in/{p.relative_to(imgs).as_posix()}", p.read_bytes())
    uri = "memory://pixelvote-test/in"
    items, names = list_uri_inputs(uri)
    local = list_inputs(imgs)
    assert [it.key for it in items] == [it.key for it in local]
    assert names[0].startswith(uri + "/") and len(set(names)) == len(names)
    assert resolve_inputs(imgs.as_uri())[0] == local  # file:// is the local engine's input

    cfg = read_run_config(run)
    ccfg, mcfg, t = resolve_recipe(cfg, "run", None, None, T)
    threads = torch.get_num_threads()
    try:
        worker = _Annotator(ship(run, cfg)[0], None, 0.2, ccfg, mcfg, t, "cpu", 1, uri)
        rows = [_row(it, n) for it, n in zip(items, names, strict=True)]
        res = worker({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    finally:
        torch.set_num_threads(threads)  # the worker sets its own thread count
    by_key = {r["key"]: r for r in records(local_out)}
    for i, key in enumerate(res["key"]):
        if key == "broken":
            assert res["error"][i].startswith(f"{uri}/broken.png: not a readable image")
            continue
        rec = json.loads(res["record"][i])
        assert rec["image"] == f"{uri}/{Path(by_key[key]['image']).relative_to(imgs.resolve()).as_posix()}"
        assert_close({**rec, "image": None}, {**by_key[key], "image": None}, key)
        for k in FILES:
            assert res[k][i] == (local_out / rec[k]).read_bytes()


def test_missing_ray_is_a_config_error_with_the_install_command(trained, tmp_path, monkeypatch):
    from pixelvote.engine.ray_engine import annotate_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    run, imgs = trained
    with pytest.raises(ConfigError, match=r"pip install 'pixelvote\[ray\]'"):
        annotate_ray(run, imgs, tmp_path / "out")


def test_the_local_engine_does_not_import_ray():
    code = ("import sys, pixelvote.cli, pixelvote.engine.annotate, pixelvote.engine.ray_engine; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
