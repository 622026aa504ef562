from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixelvote.data.imageio import (
    append_jsonl,
    image_size,
    read_image,
    read_jsonl,
    read_mask,
    repair_jsonl_tail,
    write_png_atomic,
)
from pixelvote.errors import DataError


def test_grey_8bit_becomes_rgb(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(a).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], a) and np.array_equal(out[..., 2], a)


def test_16bit_png_is_scaled_by_its_range(tmp_path):
    a = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255
    assert out[0, 1] == round(1000 / 4000 * 255)


def test_16bit_tiff(tmp_path):
    a = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.tif")
    assert read_image(tmp_path / "x.tif")[0, :, 0].tolist() == [0, 255]


def test_rgba_composited_on_black(tmp_path):
    a = np.zeros((1, 2, 4), np.uint8)
    a[0, 0] = (200, 100, 50, 255)
    a[0, 1] = (200, 100, 50, 0)
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 100, 50] and out[0, 1].tolist() == [0, 0, 0]


def test_palette_and_cmyk(tmp_path):
    Image.new("P", (3, 2), 5).save(tmp_path / "p.png")
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "p.png").shape == (2, 3, 3)
    red = read_image(tmp_path / "c.jpg")
    assert red[0, 0, 0] > 200 and red[0, 0, 1] < 60


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape[:2] == (4, 2)
    assert image_size(tmp_path / "r.jpg") == (2, 4)


@pytest.mark.parametrize("content", [b"", b"hello, this is text", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_broken_files_raise_data_error_naming_the_file(tmp_path, content):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_image(p)
    assert "bad.png" in str(e.value) and "Fix:" in str(e.value)


def test_truncated_jpeg(tmp_path):
    Image.fromarray((np.random.rand(64, 64, 3) * 255).astype(np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        read_image(tmp_path / "t.jpg")


def test_mask_size_mismatch_and_values(tmp_path):
    m = np.zeros((4, 5), np.uint8)
    m[1, 1] = 1  # any non-zero value is foreground
    m[2, 2] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", (5, 4)).sum() == 2
    with pytest.raises(DataError, match="mask is 5x4 but its image is 6x4"):
        read_mask(tmp_path / "m.png", (6, 4))


def test_png_atomic_and_jsonl_torn_tail(tmp_path):
    write_png_atomic(tmp_path / "sub" / "a.png", np.full((2, 3), 255, np.uint8))
    assert np.asarray(Image.open(tmp_path / "sub" / "a.png")).min() == 255
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a") as fh:
        fh.write('{"a": 2, "b"')  # a run killed mid-write
    assert [r["a"] for r in read_jsonl(path)] == [1]
    repair_jsonl_tail(path)
    append_jsonl(path, {"a": 3})
    assert [json.loads(line)["a"] for line in path.read_text().splitlines()] == [1, 3]


def test_resize_image_matches_the_float_reference_within_one_level():
    import torch
    import torch.nn.functional as F

    from pixelvote.data.transforms import resize_image

    g = torch.Generator().manual_seed(0)
    for h, w, s in ((585, 766, 224), (180, 320, 224), (40, 30, 64)):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        out = resize_image(img, s)
        ref = F.interpolate(img[None].float(), size=(s, s), mode="bilinear", antialias=True,
                            align_corners=False).round().clamp(0, 255)[0]
        assert out.dtype == torch.uint8 and out.shape == (3, s, s)
        assert int((out.int() - ref.int()).abs().max()) <= 1
    flat = torch.full((3, 77, 99), 123, dtype=torch.uint8)
    assert bool((resize_image(flat, 32) == 123).all())


def test_to_tensor_takes_read_only_flipped_and_strided_arrays():
    import numpy as np

    from pixelvote.data.transforms import to_tensor

    a = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8)
    ro = a.copy()
    ro.flags.writeable = False
    for v in (a, a[::-1], a[:, ::2], ro):
        t = to_tensor(v)
        assert t.shape == (3, *v.shape[:2]) and np.array_equal(t.permute(1, 2, 0).numpy(), v)
    t = to_tensor(ro)
    t[0, 0, 0] = 7  # a copy: the read-only array is untouched
    assert ro[0, 0, 0] == a[0, 0, 0]
