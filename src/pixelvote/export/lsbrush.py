"""Label Studio's brush RLE: a bit-packed run-length code over an RGBA buffer (not COCO RLE).

Ported from ``label_studio_sdk.converter.brush`` (``encode_rle``, ``mask2rle``, ``decode_rle``;
Copyright HumanSignal, Apache License 2.0), which ports the JavaScript decoder of
thi.ng/rle-pack that Label Studio's front end uses. The SDK itself pulls in pandas, nltk, OpenCV and
more, so it is not a dependency; ``tests/test_export_labelstudio.py`` compares this port with the
SDK whenever the SDK is installed.

Stream layout (big-endian bits): 32 bits value count ``num``; 5 bits ``word_size - 1``; four 4-bit
``run_size - 1`` fields; then blocks until ``num`` values are out. A block is 1 bit kind, 2 bits
index into the run sizes, ``run_sizes[index]`` bits ``length - 1``, then either one value repeated
``length`` times (kind 1) or ``length`` literal values (kind 0), each ``word_size`` bits wide.
The encoder pads to whole bytes exactly as the SDK does, so both produce the same list.
"""

from __future__ import annotations

import numpy as np

_RLE_SIZES = (3, 4, 8, 16)
_MAX_RUN = 2**16


def _runs(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values of a 1D array."""
    n = arr.size
    ends = np.append(np.flatnonzero(arr[1:] != arr[:-1]), n - 1)
    lengths = np.diff(np.append(-1, ends))
    return lengths, arr[ends]


def encode_rle(values: np.ndarray, word_size: int = 8) -> list[int]:
    """Encode a flat array of 0..255 values the way ``label_studio_sdk`` ``encode_rle`` does."""
    arr = np.asarray(values).ravel()
    parts = [f"{arr.size:032b}", f"{word_size - 1:05b}", "".join(f"{s - 1:04b}" for s in _RLE_SIZES)]
    if arr.size:
        lengths, vals = _runs(arr)
        for length, value in zip(lengths.tolist(), vals.tolist(), strict=True):
            v = f"{value:0{word_size}b}"
            if length == 1:
                parts.append("000000" + v)
            elif length <= 8:
                parts.append(f"100{length - 1:03b}" + v)
            elif length <= 16:
                parts.append(f"101{length - 1:04b}" + v)
            elif length <= 256:
                parts.append(f"110{length - 1:08b}" + v)
            else:
                while length > _MAX_RUN:
                    parts.append(f"111{_MAX_RUN - 1:016b}" + v)
                    length -= _MAX_RUN
                parts.append(f"111{length - 1:016b}" + v)
    bits = "".join(parts)
    bits += "0" * (8 - len(bits) % 8)  # the SDK always pads, a whole zero byte when already aligned
    return list(np.packbits(np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")).tolist())


def mask2rle(mask: np.ndarray) -> list[int]:
    """Label Studio RLE of a 2D mask: each pixel value repeated over R, G, B and A.

    Pass 0/255 values (``label_studio_sdk.converter.brush.mask2rle`` takes the same input).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask: expected a 2D array but got shape {m.shape}")
    if m.dtype == bool:
        m = np.where(m, 255, 0)
    return encode_rle(np.repeat(m.astype(np.uint8).ravel(), 4))


def decode_rle(rle: list[int] | bytes) -> np.ndarray:
    """Decode a Label Studio RLE into its flat array of values (RGBA interleaved for brushes)."""
    data = np.asarray(bytearray(rle) if isinstance(rle, bytes | bytearray) else rle, dtype=np.int64)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError("rle: expected bytes (0..255)")
    bits = "".join(np.unpackbits(data.astype(np.uint8)).astype("U1").tolist())
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("rle: stream ends early")
        v = int(bits[pos : pos + n], 2) if n else 0
        pos += n
        return v

    num = read(32)
    word_size = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    dtype = np.uint8 if word_size < 9 else np.uint16 if word_size < 17 else np.uint32
    out = np.zeros(num, dtype=dtype)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError(f"rle: a run ends at {j}, past the {num} values announced")
        if repeat:
            out[i:j] = read(word_size)
        else:
            for k in range(i, j):
                out[k] = read(word_size)
        i = j
    return out


def rle2mask(rle: list[int], width: int, height: int) -> np.ndarray:
    """Decode a brush RLE to a bool mask (height, width): pixels whose alpha channel is non-zero."""
    flat = decode_rle(rle)
    if flat.size != width * height * 4:
        raise ValueError(
            f"rle: expected {width}x{height}x4 = {width * height * 4} values but got {flat.size}"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 0
