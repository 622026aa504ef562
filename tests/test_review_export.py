"""Review decisions reach the exporters: reviewed labels and masks replace the predicted ones."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_review_fixtures import BACKGROUND, CLASSES, SPECS, make_review_out

from pixelvote.errors import ConfigError
from pixelvote.export import export_annotations
from pixelvote.export.outputs import open_output
from pixelvote.export.png import export_png
from pixelvote.review.apply import apply_reviews, reviewed_records
from pixelvote.review.masks import encode_mask
from pixelvote.review.store import ACTIONS, NewDecision, ReviewStore

H, W = 40, 56


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return make_review_out(tmp_path, size=(H, W))


def decide(store: ReviewStore, key: str, action: str, label: str, mask: np.ndarray, who: str = "ann") -> int:
    return store.add(NewDecision(key=key, action=action, label=label, mask_png=encode_mask(mask),
                                 mask_area=int(mask.sum()), width=W, height=H, reviewer=who)).decision.id


def drawn() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[3:9, 30:50] = True
    return m


def reviewed_set(out: Path) -> dict[str, np.ndarray]:
    """Decide on three images; return the expected final masks."""
    with ReviewStore(out / "review.sqlite") as st:
        decide(st, "case 01", "edit", "malignant", np.ones((H, W), bool), who="ann")
        decide(st, "case 01", "reject", BACKGROUND, np.zeros((H, W), bool), who="bob")  # the latest wins
        decide(st, "a/scan 01", "edit", "benign", drawn())
        decide(st, "case 05", "relabel", "benign", np.asarray(Image.open(out / "masks/case 05.png")) > 127)
    return {"case 01": np.zeros((H, W), bool), "a/scan 01": drawn()}


def test_apply_reviews_writes_a_folder_every_exporter_reads(out: Path, tmp_path: Path) -> None:
    expected = reviewed_set(out)
    to = apply_reviews(out, tmp_path / "reviewed")
    folder = open_output(to)
    recs = {r["key"]: r for r in folder.records}
    assert set(recs) == set(SPECS)
    r = recs["case 01"]
    assert (r["label"], r["reviewed"], r["reviewer"], r["source"]) == (BACKGROUND, True, "bob", "review")
    assert r["review"]["action"] == "reject" and r["review"]["predicted_label"] == "malignant"
    assert r["label_index"] == CLASSES.index(BACKGROUND) and r["target_class"] == BACKGROUND
    assert recs["case 05"]["label"] == "benign" and recs["case 05"]["target_class"] == "benign"
    assert recs["a/scan 01"]["mask_area"] == int(drawn().sum())
    assert "reviewed" not in recs["case 04"]
    for key, mask in expected.items():
        np.testing.assert_array_equal(folder.load_mask(recs[key]), mask)
    # the original is untouched
    assert (np.asarray(Image.open(out / "masks/case 01.png")) > 0).any()
    assert json.loads((to / "annotate.json").read_text())["review"]["reviewed"] == 3
    assert (to / "overlays" / "case 04.png").is_file()

    png = export_annotations(to, "png", tmp_path / "png")
    idx = np.asarray(Image.open(png / "masks" / "a" / "scan 01.png"))
    np.testing.assert_array_equal(idx > 0, drawn())
    assert set(np.unique(idx)) == {0, CLASSES.index("benign") + 1}
    assert not np.asarray(Image.open(png / "masks" / "case 01.png")).any()
    coco = json.loads(export_annotations(to, "coco", tmp_path / "coco.json").read_text())
    assert len(coco["images"]) == len(SPECS)


def test_apply_only_reviewed_and_refusals(out: Path, tmp_path: Path) -> None:
    reviewed_set(out)
    to = apply_reviews(out, tmp_path / "only", only_reviewed=True)
    assert {r["key"] for r in open_output(to).records} == {"case 01", "a/scan 01", "case 05"}
    with pytest.raises(ConfigError, match="already holds"):
        apply_reviews(out, to)
    with pytest.raises(ConfigError, match="must differ"):
        apply_reviews(out, out)


def test_reviewed_records_for_the_exporters_reader(out: Path, tmp_path: Path) -> None:
    """What open_output() would do with the proposed hook: exporters then read the reviewed set in place."""
    expected = reviewed_set(out)
    folder = open_output(out)
    folder.records = reviewed_records(out, folder.records, folder.classes.names)
    recs = {r["key"]: r for r in folder.records}
    assert recs["a/scan 01"]["mask"].startswith("review/masks/a/scan 01.d")
    for key, mask in expected.items():
        np.testing.assert_array_equal(folder.load_mask(recs[key]), mask)
    export_png(folder, tmp_path / "png")
    idx = np.asarray(Image.open(tmp_path / "png" / "masks" / "a" / "scan 01.png"))
    np.testing.assert_array_equal(idx > 0, drawn())
    # written once: a second pass reuses the files
    again = reviewed_records(out, open_output(out).records, folder.classes.names)
    assert [r.get("mask") for r in again] == [r.get("mask") for r in folder.records]


def test_applying_twice_changes_nothing(out: Path, tmp_path: Path) -> None:
    reviewed_set(out)
    folder = open_output(out)
    once = reviewed_records(out, folder.records, folder.classes.names)
    twice = reviewed_records(out, once)  # classes from annotate.json
    assert once == twice
    assert {r["key"]: r["review"]["predicted_label"] for r in twice if r.get("reviewed")} == {
        "case 01": "malignant", "a/scan 01": "benign", "case 05": "malignant"}


def test_no_database_changes_nothing(out: Path) -> None:
    folder = open_output(out)
    assert reviewed_records(out, folder.records, folder.classes.names) == folder.records
    assert not (out / "review.sqlite").exists()


def test_stale_decisions_are_ignored(out: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ReviewStore(out / "review.sqlite") as st:
        st.add(NewDecision(key="case 04", action="edit", label="benign",
                           mask_png=encode_mask(np.ones((3, 3))), mask_area=9, width=3, height=3,
                           reviewer="ann"))
    folder = open_output(out)
    recs = reviewed_records(out, folder.records, folder.classes.names)
    assert recs == folder.records
    assert "made on a 3x3 image" in caplog.text


def test_store_is_append_only_wal_and_durable(out: Path) -> None:
    with ReviewStore(out / "review.sqlite") as st:
        a = decide(st, "case 04", "accept", "benign", drawn())
        b = decide(st, "case 04", "reject", BACKGROUND, np.zeros((H, W), bool), who="bob")
        assert [d.id for d in st.history("case 04")] == [a, b]
        assert st.latest()["case 04"].reviewer == "bob"
        assert st.latest_for("case 04").id == b and st.get(a).action == "accept"
        assert [d.id for d in st.since(0)] == [a, b] and st.count() == 2
        with pytest.raises(ValueError, match="action"):
            st.add(NewDecision(key="x", action="approve", label="benign", mask_png=b"", mask_area=0,
                               width=1, height=1, reviewer="ann"))
        conn = st._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(out / "review.sqlite")
    with pytest.raises(sqlite3.IntegrityError):  # the table refuses unknown actions too
        raw.execute("INSERT INTO decisions (image_key, action, label, mask_png, mask_area, width, height, "
                    "reviewer, created) VALUES ('k', 'approve', 'benign', x'', 0, 1, 1, 'r', 't')")
    raw.close()
    assert set(ACTIONS) == {"accept", "reject", "relabel", "edit"}


def test_a_corrupt_database_is_a_clear_error(out: Path) -> None:
    from pixelvote.errors import DataError

    (out / "review.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not a usable SQLite database"):
        ReviewStore(out / "review.sqlite")
