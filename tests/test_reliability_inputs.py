"""Bad and odd inputs at the file level: every kind of file a user may hand us is either read as displayed
or refused with a DataError naming it; folder walking, output keys and atomic writes hold up.

The bad-input corpus is generated here (no committed binaries); the CLI tests import ``make_corpus``.
"""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelvote.data import imageio
from pixelvote.data.dataset import _walk_images
from pixelvote.data.imageio import image_size, read_image, read_jsonl, read_mask, repair_jsonl_tail
from pixelvote.engine.inputs import list_inputs
from pixelvote.errors import DataError

# --------------------------------------------------------------------------- the corpus


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grey PNG whose header claims ``width x height`` but holds a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def _encoded(arr: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, fmt, **kw)
    return buf.getvalue()


# EXIF orientation -> how to store a displayed image so that a viewer shows it upright
STORE_FOR_ORIENTATION = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, -1),
}


def exif_bytes(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def displayed_with_lesion(h: int = 48, w: int = 80, seed: int = 0) -> np.ndarray:
    """An upright RGB image: noise with a bright lesion near the top-left (asymmetric on purpose)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 60).astype(np.uint8)
    img[6:18, 8:22] = 230
    return np.repeat(img[..., None], 3, axis=2)


def make_corpus(folder: Path) -> dict[str, str]:
    """Write the bad-input corpus into ``folder``; returns ``{relative path: "bad" | "ok"}``.

    "bad" files must be skipped and reported; "ok" files (odd but valid) must be annotated. A symlink loop
    (``loop/up -> ..``) is added where the OS allows links; it must not duplicate anything.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
    png, jpg = _encoded(rgb, "PNG"), _encoded(rgb, "JPEG", quality=90)
    kinds: dict[str, str] = {}

    def put(name: str, data: bytes, kind: str) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        kinds[name] = kind

    put("zero.png", b"", "bad")
    put("zero.jpg", b"", "bad")
    put("truncated.png", png[: len(png) // 2], "bad")
    put("truncated.jpg", jpg[: len(jpg) // 2], "bad")
    put("text.png", b"hello, I am not a picture\n", "bad")
    put("bomb.png", bomb_png(100_000, 100_000), "bad")
    put("cmyk.jpg", _encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "ok")
    put("cmyk.tif", _encoded(Image.fromarray(rgb).convert("CMYK"), "TIFF"), "ok")
    put("palette.png", _encoded(Image.fromarray(rgb).convert("P"), "PNG"), "ok")
    put("palette transparent.png", _encoded(Image.fromarray(rgb).convert("P"), "PNG", transparency=0), "ok")
    g16 = (rng.random((40, 50)) * 4000 + 1000).astype(np.uint16)
    put("grey16.png", _encoded(g16, "PNG"), "ok")
    put("grey16.tif", _encoded(g16, "TIFF"), "ok")
    rgba = np.dstack([rgb, np.full((40, 50), 255, np.uint8)])
    rgba[:, :25, 3] = 0
    put("rgba.png", _encoded(rgba, "PNG"), "ok")
    put("one by one.png", _encoded(np.array([[[200, 10, 10]]], np.uint8), "PNG"), "ok")
    put("scan 01 ünïcødé 日本.png", png, "ok")
    put("v1.2.final.png", png, "ok")
    put("sub a/dup.png", png, "ok")
    put("sub b/dup.png", _encoded(rgb[::-1].copy(), "PNG"), "ok")
    put(
        "rotated.jpg",
        _encoded(
            np.ascontiguousarray(STORE_FOR_ORIENTATION[6](displayed_with_lesion())),
            "JPEG",
            quality=95,
            exif=exif_bytes(6),
        ),
        "ok",
    )
    try:
        (folder / "loop").mkdir()
        os.symlink("..", folder / "loop" / "up")
        os.symlink("missing.png", folder / "dangling.png")
        kinds["dangling.png"] = "bad"
    except (OSError, NotImplementedError):  # no symlinks here (e.g. Windows without privileges)
        pass
    return kinds


# --------------------------------------------------------------------------- reading each kind


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def test_every_bad_file_is_a_data_error_naming_it(corpus):
    root, kinds = corpus
    for name, kind in kinds.items():
        if kind != "bad":
            continue
        with pytest.raises(DataError) as e:
            read_image(root / name)
        assert str(root / name) in str(e.value) and e.value.fix, name


def test_every_odd_but_valid_file_reads_as_displayed_rgb(corpus):
    root, kinds = corpus
    for name, kind in kinds.items():
        if kind != "ok":
            continue
        arr = read_image(root / name)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        assert (arr.shape[1], arr.shape[0]) == image_size(root / name), name
    assert read_image(root / "one by one.png").shape == (1, 1, 3)
    assert read_image(root / "rotated.jpg").shape == (48, 80, 3)  # displayed, not stored (80 x 48)
    g16 = read_image(root / "grey16.png")
    assert g16.min() == 0 and g16.max() == 255  # scaled by its own range, not by 65535
    assert np.array_equal(g16, read_image(root / "grey16.tif"))
    assert (read_image(root / "rgba.png")[:, :25] == 0).all()  # transparent shown on black


def test_bomb_header_is_refused_before_allocating(corpus):
    root, _ = corpus
    t0 = time.perf_counter()
    for reader in (read_image, image_size, read_mask):
        with pytest.raises(DataError, match="too large") as e:
            reader(root / "bomb.png")
        assert str(root / "bomb.png") in str(e.value)
    assert time.perf_counter() - t0 < 2.0  # 10^10 pixels would take minutes (and 10 GB) to allocate


def test_size_limit_is_pixelvotes_own(tmp_path, monkeypatch):
    # 10000 x 10000 (100 Mpx) is over PIL's 89 Mpx warning but under MAX_PIXELS: it must be read
    Image.new("L", (10_000, 10_000), 90).save(tmp_path / "big.png")
    assert image_size(tmp_path / "big.png") == (10_000, 10_000)
    arr = read_image(tmp_path / "big.png")
    assert arr.shape == (10_000, 10_000, 3) and int(arr[5000, 5000, 0]) == 90
    del arr
    monkeypatch.setattr(imageio, "MAX_PIXELS", 99_999_999)  # one pixel short: refused with our message
    with pytest.raises(DataError, match=r"10000x10000 pixels, over pixelvote's limit") as e:
        read_image(tmp_path / "big.png")
    assert "MAX_PIXELS" in str(e.value)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_gives_the_displayed_image(tmp_path, orientation):
    shown = displayed_with_lesion()
    stored = np.ascontiguousarray(STORE_FOR_ORIENTATION[orientation](shown))
    # PNG keeps pixels exact, so the comparison is exact; the JPEG is compared with a tolerance
    Image.fromarray(stored).save(tmp_path / "a.png", exif=exif_bytes(orientation))
    Image.fromarray(stored).save(tmp_path / "a.jpg", quality=95, exif=exif_bytes(orientation))
    assert np.array_equal(read_image(tmp_path / "a.png"), shown)
    jpg = read_image(tmp_path / "a.jpg").astype(int)
    assert jpg.shape == shown.shape and np.abs(jpg - shown).mean() < 4
    assert (jpg[6:18, 8:22] > 150).all()  # the lesion is where the viewer shows it
    assert image_size(tmp_path / "a.jpg") == (80, 48)
    # a mask drawn on the displayed image has the displayed size and is accepted as such
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", image_size(tmp_path / "a.jpg")).shape == (48, 80)


def test_masks_wrong_size_odd_values_and_kinds(tmp_path):
    m = np.zeros((4, 6), np.uint8)
    m[1, 2], m[2, 3], m[3, 4] = 1, 128, 255
    Image.fromarray(m).save(tmp_path / "values.png")
    assert read_mask(tmp_path / "values.png", (6, 4)).sum() == 3  # any non-zero pixel is foreground
    Image.fromarray(m.astype(np.uint16) * 200).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png", (6, 4)).sum() == 3
    Image.fromarray(np.repeat(m[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png", (6, 4)).sum() == 3
    with pytest.raises(DataError, match="mask is 6x4 but its image is 4x6") as e:
        read_mask(tmp_path / "values.png", (4, 6))
    assert str(tmp_path / "values.png") in str(e.value)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(DataError, match="junk.png"):
        read_mask(tmp_path / "junk.png", (6, 4))


# --------------------------------------------------------------------------- folders and keys


def test_walk_survives_symlink_loops_and_lists_dangling_links(tmp_path):
    cls = tmp_path / "images" / "normal"
    (cls / "deep").mkdir(parents=True)
    (tmp_path / "images" / "lesion").mkdir()
    Image.new("L", (4, 4)).save(cls / "a b.png")
    Image.new("L", (4, 4)).save(cls / "deep" / "c.d.png")
    Image.new("L", (4, 4)).save(tmp_path / "images" / "lesion" / "x.png")
    (cls / ".hidden.png").write_bytes(b"")
    try:
        os.symlink("..", cls / "deep" / "to_class")  # loop inside the class
        os.symlink("..", cls / "to_images")  # a parent: would pull lesion/ into normal/
        os.symlink("self", cls / "self")  # a link to itself
        os.symlink("missing.png", cls / "gone.png")
    except OSError:
        pytest.skip("no symlinks here")
    found = _walk_images(cls)
    assert [p.relative_to(cls).as_posix() for p in found] == ["a b.png", "deep/c.d.png", "gone.png"]
    with pytest.raises(DataError, match="file not found"):
        read_image(cls / "gone.png")


def test_keys_are_unique_safe_and_stable(tmp_path):
    for rel in ("a/x.png", "a/x.jpg", "a/x.png.png", "b/x.png.png", "b/x.png", "c/scan 01 é.png", "v1.2.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (2, 2)).save(tmp_path / rel, format="PNG")
    items = list_inputs(tmp_path)
    keys = [it.key for it in items]
    assert len(set(keys)) == len(keys) == 7
    assert all(".." not in k.split("/") and not k.startswith("/") for k in keys)
    assert {it.key for it in items if it.path.name in ("scan 01 é.png", "v1.2.png")} == {"scan 01 é", "v1.2"}
    assert [it.key for it in list_inputs(tmp_path)] == keys  # same keys on a re-run: resumable
    # a CSV may point outside its folder and list an image twice
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "l.csv").write_text("path\n../a/x.png\n../b/x.png\n../a/x.png\n", encoding="utf-8")
    items = list_inputs(tmp_path / "lists" / "l.csv")
    assert len(items) == 2 and len({it.key for it in items}) == 2
    assert all(".." not in it.key.split("/") for it in items)


# --------------------------------------------------------------------------- atomic writes and manifests


def test_atomic_write_keeps_the_old_file_on_failure_and_uses_normal_permissions(tmp_path, monkeypatch):
    target = tmp_path / "out" / "m.png"
    imageio.write_png_atomic(target, np.full((3, 3), 255, np.uint8))
    old = target.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        imageio.write_png_atomic(target, np.zeros((3, 3), np.uint8))
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.png"]  # no temp file left behind


def test_manifest_torn_tail_is_ignored_then_cut_and_appends_stay_whole(tmp_path):
    path = tmp_path / "annotations.jsonl"
    imageio.append_jsonl(path, {"key": "a", "n": 1})
    imageio.append_jsonl(path, {"key": "b", "n": 2})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c", "n"')  # killed mid-line
    assert [r["key"] for r in read_jsonl(path)] == ["a", "b"]
    repair_jsonl_tail(path)
    imageio.append_jsonl(path, {"key": "c", "n": 3})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    repair_jsonl_tail(path)  # a whole file is left alone
    assert len(path.read_text().splitlines()) == 3
    with open(path, "ab") as fh:
        fh.write(b"garbage\n")
    imageio.append_jsonl(path, {"key": "d"})
    with pytest.raises(DataError, match="line 4 is not valid JSON") as e:
        list(read_jsonl(path))
    assert str(path) in str(e.value)
