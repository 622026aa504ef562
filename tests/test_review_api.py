"""The review desk's HTTP API through FastAPI's test client: queue, files, decisions, bad requests, safety."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_review_fixtures import BACKGROUND, SPECS, make_review_out

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from pixelvote.errors import ConfigError, DataError  # noqa: E402
from pixelvote.review.app import create_app  # noqa: E402
from pixelvote.review.settings import ReviewSettings  # noqa: E402
from pixelvote.review.store import ReviewStore  # noqa: E402

BASE = "http://127.0.0.1:8765"
H, W = 96, 128


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_review_out(tmp_path_factory.mktemp("review"), size=(H, W), torn=True)


@pytest.fixture
def out(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the output folder (the images it names are shared, read-only)."""
    return Path(shutil.copytree(template, tmp_path / "out"))


@pytest.fixture
def client(out: Path):
    app = create_app(ReviewSettings(out_dir=out, reviewer="tester"))
    with TestClient(app, base_url=BASE) as c:
        yield c


def png_b64(mask: np.ndarray, mode: str = "L") -> str:
    arr = np.where(mask, 255, 0).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def predicted(out: Path, key: str) -> np.ndarray:
    return np.asarray(Image.open(out / "masks" / f"{key}.png")) > 127


def image_of(out: Path, key: str) -> str:
    for line in (out / "annotations.jsonl").read_text().splitlines():
        if line.endswith("}") and json.loads(line)["key"] == key:
            return str(json.loads(line)["image"])
    raise KeyError(key)


def post(client: TestClient, **body):
    return client.post("/api/decisions", json=body)


# --------------------------------------------------------------------------------------- queue
def test_meta_and_summary(client: TestClient, out: Path) -> None:
    meta = client.get("/api/meta").json()
    assert meta["classes"] == ["benign", "malignant", "normal"]
    assert meta["background"] == BACKGROUND and meta["foreground"] == ["benign", "malignant"]
    assert meta["reviewer"] == "tester"
    s = client.get("/api/summary").json()
    flagged = sum(bool(r) for _, _, r, _ in SPECS.values())
    assert (s["images"], s["flagged"], s["reviewed"], s["decisions"]) == (len(SPECS), flagged, 0, 0)
    assert s["by_reason"]["low_confidence"] == 2


def test_queue_is_flagged_first_then_most_uncertain(client: TestClient) -> None:
    items = client.get("/api/images").json()["items"]
    keys = [it["key"] for it in items]
    expected = sorted(SPECS, key=lambda k: (not SPECS[k][2], -SPECS[k][3], SPECS[k][1], k))
    assert keys == expected
    assert keys[0] == "case 01"  # flagged, uncertainty 0.31
    assert "half" not in keys  # the torn last line is ignored


def test_queue_filters(client: TestClient) -> None:
    def keys(q: str) -> set[str]:
        return {it["key"] for it in client.get("/api/images?" + q).json()["items"]}

    assert keys("flagged=true") == {k for k, v in SPECS.items() if v[2]}
    assert keys("flagged=false") == {k for k, v in SPECS.items() if not v[2]}
    assert keys("label=malignant") == {"case 01", "case 05"}
    assert keys("reason=low_confidence") == {"case 01", "case 03"}
    # every flag annotate can write is a known filter (none of these fired here)
    for reason in ("label_disagrees", "segmenter_disagrees", "no_agreeing_member"):
        assert keys(f"reason={reason}") == set()
        assert reason in client.get("/api/meta").json()["reasons"]
    assert keys("reviewed=true") == set()
    assert post(client, key="case 05", action="relabel", label="benign").status_code == 201
    assert keys("reviewed=true") == {"case 05"}
    assert keys("label=malignant") == {"case 01"}  # the label filter sees the reviewed label
    assert "case 05" in keys("label=benign&reviewed=true")
    everything = [it["key"] for it in client.get("/api/images").json()["items"]]
    page = client.get("/api/images?limit=2&offset=1").json()
    assert page["total"] == len(SPECS) and [it["key"] for it in page["items"]] == everything[1:3]


@pytest.mark.parametrize("query, needle", [
    ("label=maligant", "Did you mean 'malignant'"),
    ("reason=low_confidense", "Did you mean 'low_confidence'"),
    ("flagged=perhaps", "flagged"),
    ("limit=0", "limit"),
])
def test_queue_bad_filters(client: TestClient, query: str, needle: str) -> None:
    r = client.get("/api/images?" + query)
    assert r.status_code == 422
    assert needle in r.text


def test_image_detail_and_files(client: TestClient, out: Path) -> None:
    d = client.get("/api/images/a/scan 01").json()
    assert d["key"] == "a/scan 01" and (d["width"], d["height"]) == (W, H)
    assert d["reasons"] == ["empty_mask"] and d["current"] == {
        "reviewed": False, "label": "benign", "mask_area": 0, "decision_id": 0,
        "action": None, "reviewer": None, "created": None}
    assert set(d["members"]) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert "not stored" in d["cams_note"] and d["cams"] == {}
    for name in ("image", "overlay", "uncertainty", "mask", "predicted_mask"):
        r = client.get(d["files"][name])
        assert r.status_code == 200, name
        assert r.headers["content-type"] == "image/png"
        assert read_png(r.content).shape[:2] == (H, W)
    # the original image is re-encoded, pixel for pixel
    img = read_png(client.get(d["files"]["image"]).content)
    src = np.asarray(Image.open(image_of(out, "a/scan 01")).convert("RGB"))
    np.testing.assert_array_equal(img, src)
    assert client.get("/api/images/nope").status_code == 404
    assert client.get("/api/files/mask/nope").status_code == 404


def test_page_and_static(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/static/review.js" in r.text and "http" not in r.text.split("<body>")[0].replace("http-equiv", "")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    for name in ("review.js", "review.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/index.txt").status_code == 404
    assert client.get("/api/docs").status_code == 404  # Swagger UI would load a CDN


# --------------------------------------------------------------------------------------- decisions
def test_accept_keeps_what_was_shown(client: TestClient, out: Path) -> None:
    r = post(client, key="case 04", action="accept")
    assert r.status_code == 201, r.text
    dec = r.json()["decision"]
    assert (dec["action"], dec["label"], dec["reviewer"]) == ("accept", "benign", "tester")
    assert dec["based_on"] == 0
    mask = read_png(client.get(dec["mask_url"]).content) > 127
    np.testing.assert_array_equal(mask, predicted(out, "case 04"))
    assert dec["mask_area"] == int(mask.sum())


def test_reject_relabel_edit(client: TestClient, out: Path) -> None:
    r = post(client, key="case 01", action="reject", reviewer="Dr. O'Neil")
    assert r.status_code == 201
    dec = r.json()["decision"]
    assert dec["label"] == BACKGROUND and dec["mask_area"] == 0 and dec["reviewer"] == "Dr. O'Neil"

    r = post(client, key="case 02", action="relabel", label="malignant")
    assert r.json()["decision"]["label"] == "malignant"
    assert r.json()["decision"]["mask_area"] == int(predicted(out, "case 02").sum())
    r = post(client, key="case 03", action="relabel", label=BACKGROUND)
    assert r.json()["decision"]["mask_area"] == 0
    r = post(client, key="b/scan 01", action="relabel", label="benign")  # background image: empty mask
    assert r.json()["warning"] and "empty mask" in r.json()["warning"]

    drawn = np.zeros((H, W), bool)
    drawn[10:30, 40:90] = True
    r = post(client, key="a/scan 01", action="edit", mask_png=png_b64(drawn), label="malignant")
    assert r.status_code == 201, r.text
    dec = r.json()["decision"]
    assert (dec["label"], dec["mask_area"]) == ("malignant", int(drawn.sum()))
    current = read_png(client.get("/api/files/mask/a/scan 01").content) > 127
    np.testing.assert_array_equal(current, drawn)
    # the predicted mask is untouched
    assert not predicted(out, "a/scan 01").any()

    s = client.get("/api/summary").json()
    assert s["reviewed"] == 5 and s["by_action"] == {"reject": 1, "relabel": 3, "edit": 1}
    d = client.get("/api/images/a/scan 01").json()
    assert d["current"]["reviewed"] and d["current"]["action"] == "edit"
    assert [h["action"] for h in d["history"]] == ["edit"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1", "LA", "P"])
def test_edit_accepts_common_png_modes(client: TestClient, mode: str) -> None:
    drawn = np.zeros((H, W), bool)
    drawn[5:9, 7:20] = True
    r = post(client, key="case 04", action="edit", mask_png="data:image/png;base64," + png_b64(drawn, mode))
    assert r.status_code == 201, r.text
    assert r.json()["decision"]["mask_area"] == int(drawn.sum())


def test_transparent_pixels_are_background(client: TestClient) -> None:
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only a block is opaque
    rgba[0:4, 0:5, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    r = post(client, key="case 04", action="edit", mask_png=base64.b64encode(buf.getvalue()).decode())
    assert r.json()["decision"]["mask_area"] == 20


def test_accept_after_edit_keeps_the_edit(client: TestClient) -> None:
    drawn = np.zeros((H, W), bool)
    drawn[:5, :5] = True
    first = post(client, key="case 05", action="edit", mask_png=png_b64(drawn)).json()["decision"]
    second = post(client, key="case 05", action="accept", based_on=first["id"]).json()["decision"]
    assert (second["label"], second["mask_area"], second["based_on"]) == ("malignant", 25, first["id"])


def test_retry_with_same_request_id_is_stored_once(client: TestClient, out: Path) -> None:
    body = {"key": "case 04", "action": "accept", "request_id": "retry-0001"}
    a = client.post("/api/decisions", json=body)
    b = client.post("/api/decisions", json=body)
    assert (a.status_code, b.status_code) == (201, 200)
    assert b.json()["duplicate"] and b.json()["decision"]["id"] == a.json()["decision"]["id"]
    with ReviewStore(out / "review.sqlite") as st:
        assert st.count() == 1


def test_conflicting_reviewers_lose_nothing(client: TestClient) -> None:
    seen = client.get("/api/images/case 03").json()["current"]["decision_id"]
    a = post(client, key="case 03", action="accept", reviewer="ann", based_on=seen).json()
    b = post(client, key="case 03", action="reject", reviewer="bob", based_on=seen).json()
    assert not a["conflict"] and b["conflict"]
    assert [d["reviewer"] for d in b["intervening"]] == ["ann"]
    hist = client.get("/api/images/case 03").json()["history"]
    assert [(h["reviewer"], h["action"]) for h in hist] == [("ann", "accept"), ("bob", "reject")]
    assert client.get("/api/decisions?key=case 03").json()["total"] == 2


# --------------------------------------------------------------------------------------- bad requests
GOOD = np.zeros((H, W), bool)


def _patched_size(png: bytes, w: int, h: int) -> bytes:
    """A PNG whose IHDR claims another size (CRC fixed): a decompression bomb costs nothing to make."""
    import struct
    import zlib

    ihdr = png[12:29]  # type + 13 data bytes
    data = struct.pack(">II", w, h) + ihdr[12:]
    chunk = b"IHDR" + data
    return png[:8] + png[8:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def _bad_pngs() -> dict[str, tuple[str, str]]:
    wrong = png_b64(np.zeros((H + 1, W), bool))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(jpeg, format="JPEG")
    trunc = base64.b64decode(png_b64(GOOD))[:60]
    bomb = _patched_size(base64.b64decode(png_b64(GOOD)), 30000, 30000)  # a header claiming 900 Mpx
    return {
        "wrong size": (wrong, f"expected a mask of {W}x{H}"),
        "jpeg": (base64.b64encode(jpeg.getvalue()).decode(), "expected a PNG"),
        "not base64": ("@@@###", "base64"),
        "truncated": (base64.b64encode(trunc).decode(), "cannot be decoded"),
        "huge": (base64.b64encode(bomb).decode(), "expected a mask of"),
    }


@pytest.mark.parametrize("case", list(_bad_pngs()))
def test_bad_mask_uploads(client: TestClient, case: str) -> None:
    data, needle = _bad_pngs()[case]
    r = post(client, key="case 04", action="edit", mask_png=data)
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]


@pytest.mark.parametrize("body, needle", [
    ({"key": "case 04"}, "action"),
    ({"key": "case 04", "action": "approve"}, "action"),
    ({"key": "case 04", "action": "accept", "colour": "red"}, "colour"),
    ({"key": "case 04", "action": "accept", "label": "benign"}, "relabel"),
    ({"key": "case 04", "action": "accept", "mask_png": "AAAA"}, "only accepted with action 'edit'"),
    ({"key": "case 04", "action": "edit"}, "needs mask_png"),
    ({"key": "case 04", "action": "relabel"}, "needs label"),
    ({"key": "case 04", "action": "relabel", "label": "benig"}, "Did you mean 'benign'"),
    ({"key": "case 04", "action": "reject", "label": "benign"}, "background class"),
    ({"key": "case 04", "action": "accept", "reviewer": "<script>"}, "reviewer"),
    ({"key": "case 04", "action": "accept", "reviewer": "x" * 65}, "reviewer"),
    ({"key": "case 04", "action": "accept", "request_id": "short"}, "request_id"),
    ({"key": "case 04", "action": "accept", "based_on": -1}, "based_on"),
    ({"key": "case 04", "action": "accept", "based_on": 999}, "not a decision on image"),
    ({"key": "", "action": "accept"}, "key"),
    ({"key": 5, "action": "accept"}, "key"),
])
def test_bad_decision_bodies(client: TestClient, body: dict, needle: str) -> None:
    r = client.post("/api/decisions", json=body)
    assert r.status_code == 422, r.text
    assert needle in r.text
    assert client.get("/api/summary").json()["decisions"] == 0


def test_unknown_key_and_background_mask(client: TestClient) -> None:
    assert post(client, key="../annotate", action="accept").status_code == 404
    drawn = np.ones((H, W), bool)
    r = post(client, key="case 04", action="edit", mask_png=png_b64(drawn), label=BACKGROUND)
    assert r.status_code == 422 and "finding class" in r.json()["detail"]


def test_body_type_and_size_limits(out: Path) -> None:
    app = create_app(ReviewSettings(out_dir=out, max_body_bytes=4096))
    with TestClient(app, base_url=BASE) as c:
        body = json.dumps({"key": "case 04", "action": "accept"})
        r = c.post("/api/decisions", content=body, headers={"content-type": "text/plain"})
        assert r.status_code == 422  # a cross-site form cannot post JSON as text/plain
        r = c.post("/api/decisions", content="{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        big = {"key": "case 04", "action": "edit", "mask_png": "A" * 10_000}
        assert c.post("/api/decisions", json=big).status_code == 413

        def chunks():
            yield b'{"key": "case 04", "action": "edit", "mask_png": "'
            for _ in range(10):
                yield b"A" * 1000
            yield b'"}'

        r = c.post("/api/decisions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/api/summary").json()["decisions"] == 0


# --------------------------------------------------------------------------------------- safety
@pytest.mark.parametrize("path", [
    "/api/files/mask/../../../../etc/passwd",
    "/api/files/mask/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/files/image/%2e%2e/%2e%2e/etc/passwd",
    "/api/files/overlay/%2Fetc%2Fpasswd",
    "/api/images/..%2Fannotate.json",
    "/static/..%2F..%2Fapp.py",
    "/static/%2e%2e/app.py",
    "/api/files/review.sqlite/case 04",
    "/api/files/cam/case 04?member=../../annotate.json",
])
def test_path_traversal_is_refused(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert b"root:" not in r.content and b"classes" not in r.content


def _write_records(out: Path, edit) -> None:
    lines = [json.loads(x) for x in (out / "annotations.jsonl").read_text().splitlines() if x.endswith("}")]
    for rec in lines:
        edit(rec)
    (out / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_records_naming_files_outside_out_are_refused(out: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((H, W), 7, np.uint8)).save(secret)
    (out / "overlays" / "link.png").symlink_to(secret)
    notes = tmp_path / "notes.txt"
    notes.write_text("root:x:0:0 a secret, not an image")

    def edit(rec: dict) -> None:
        if rec["key"] == "case 04":
            rec["mask"] = "../secret.png"
            rec["uncertainty"] = str(secret)
            rec["overlay"] = "overlays/link.png"
            rec["image"] = str(notes)

    _write_records(out, edit)
    app = create_app(ReviewSettings(out_dir=out))
    with TestClient(app, base_url=BASE) as c:
        d = c.get("/api/images/case 04").json()
        assert d["files"]["overlay"] is None and d["files"]["uncertainty"] is None
        for kind in ("mask", "predicted-mask", "overlay", "uncertainty"):
            r = c.get(f"/api/files/{kind}/case 04")
            assert r.status_code == 403, (kind, r.status_code)
            assert "outside the output folder" in r.json()["detail"]
        r = c.get("/api/files/image/case 04")  # decoded as an image or nothing: never raw bytes
        assert r.status_code == 422 and b"root:x" not in r.content
        assert post(c, key="case 04", action="accept").status_code == 403


def test_host_header_must_be_local(client: TestClient) -> None:
    assert client.get("/api/meta", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/api/meta", headers={"host": "localhost:8765"}).status_code == 200


def test_token_guards_everything(out: Path) -> None:
    token = "s3cret-token-123456"
    app = create_app(ReviewSettings(out_dir=out, host="0.0.0.0", token=token))
    with TestClient(app, base_url="http://review.lan:8765") as c:
        assert c.get("/healthz").status_code == 200
        for path in ("/", "/api/meta", "/api/files/mask/case 04", "/static/review.js"):
            assert c.get(path).status_code == 401, path
        assert post(c, key="case 04", action="accept").status_code == 401
        assert c.get("/api/meta", headers={"authorization": "Bearer nope-nope-nope"}).status_code == 401
        assert c.get("/api/meta", headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/api/meta", headers={"x-review-token": token}).status_code == 200
        assert c.get("/?token=wrong").status_code == 401
        r = c.get(f"/?token={token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        c.cookies.set("pixelvote_review_token", token)
        assert c.get("/api/meta").status_code == 200
        assert post(c, key="case 04", action="accept").status_code == 201


def test_settings_refuse_unsafe_or_bad_options(out: Path) -> None:
    with pytest.raises(ConfigError, match="token is required"):
        ReviewSettings.build(out_dir=out, host="0.0.0.0")
    with pytest.raises(ConfigError, match="at least 12"):
        ReviewSettings.build(out_dir=out, host="0.0.0.0", token="short")
    with pytest.raises(ConfigError, match="port"):
        ReviewSettings.build(out_dir=out, port=70000)
    with pytest.raises(ConfigError, match="reviewer"):
        ReviewSettings.build(out_dir=out, reviewer="a/b")
    assert ReviewSettings.build(out_dir=out, host="::1").token is None
    assert ReviewSettings.build(out_dir=out, host="127.0.0.2").hosts[0] == "127.0.0.1"
    with pytest.raises(DataError, match="annotate.json"):
        create_app(ReviewSettings(out_dir=out.parent))
    s = ReviewSettings.build(out_dir=out, host="0.0.0.0", token="0123456789abcdef")
    assert "0123456789abcdef" not in repr(s)


def test_records_reload_while_annotation_runs(client: TestClient, out: Path) -> None:
    n = client.get("/api/summary").json()["images"]
    text = (out / "annotations.jsonl").read_text()
    first = json.loads(text.splitlines()[0])
    first["key"] = "late arrival"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(out / "masks" / "late arrival.png")
    # replace the torn tail by a complete record, as a resumed run does
    (out / "annotations.jsonl").write_text(text.rsplit("\n", 1)[0] + "\n" + json.dumps(first) + "\n")
    os.utime(out / "annotations.jsonl", ns=(1, 10**18))
    assert client.get("/api/summary").json()["images"] == n + 1
    assert post(client, key="late arrival", action="accept").status_code == 201
