"""Bad --from / --to paths for `export` and `import`: the source folder is never overwritten, the skip
report never clobbers annotate's skipped.jsonl, and malformed COCO files give errors, not tracebacks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_export_fixtures import make_out, read_png
from test_reliability_cli import main

from pixelvote.errors import ConfigError, DataError
from pixelvote.export import export_annotations, import_annotations, skipped_report_path
from pixelvote.export.outputs import open_output, write_text

# pycocotools' decode trips a numpy 2 deprecation warning inside the library itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
ANNOTATE_SKIPPED = '{"image": "/data/broken.png", "reason": "cannot be read"}\n'


def run_cli(monkeypatch, capsys, *args: object) -> tuple[int, str]:
    """`pixelvote ARGS` through cli.main, which turns errors into a message and an exit code."""
    return main(monkeypatch, capsys, *map(str, args))


def export_cli(monkeypatch, capsys, src: Path, fmt: str, to: Path) -> tuple[int, str]:
    return run_cli(monkeypatch, capsys, "export", "--from", src, "--format", fmt, "--to", to)


def import_cli(monkeypatch, capsys, src: Path, to: Path) -> tuple[int, str]:
    return run_cli(monkeypatch, capsys, "import", "--format", "coco", "--from", src, "--to", to)


def annotated(tmp_path: Path) -> Path:
    """An output folder as annotate leaves it, with its own skipped.jsonl and overlays/uncertainty."""
    out = make_out(tmp_path, torn=False)
    (out / "skipped.jsonl").write_text(ANNOTATE_SKIPPED)
    for sub in ("overlays", "uncertainty"):
        (out / sub).mkdir()
        (out / sub / "lesion.png").write_bytes(b"png bytes")
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- 1. the skip report -----------------------------------------------------------------------------


def test_skip_report_names_never_collide_with_annotates_list(tmp_path):
    out = tmp_path / "out"
    assert skipped_report_path(out / "coco.json", "coco") == out / "coco_skipped.jsonl"
    assert skipped_report_path(tmp_path / "a.zip", "cvat") == tmp_path / "a_skipped.jsonl"
    assert skipped_report_path(tmp_path / "png", "png") == tmp_path / "png" / "skipped.jsonl"
    for fmt in ("coco", "coco-results", "labelstudio", "cvat"):
        for name in ("skipped.json", "skipped", ".json", "x"):
            assert skipped_report_path(tmp_path / name, fmt).name != "skipped.jsonl"


def test_export_into_the_source_folder_keeps_annotates_skipped_list(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    code, text = export_cli(monkeypatch, capsys, out, "coco", out / "coco.json")
    assert code == 0, text
    assert (out / "skipped.jsonl").read_text() == ANNOTATE_SKIPPED
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 7
    assert not (out / "coco_skipped.jsonl").exists()

    (out / "masks" / "lesion.png").unlink()
    code, text = export_cli(monkeypatch, capsys, out, "coco", out / "coco.json")
    assert code == 3, text
    assert (out / "skipped.jsonl").read_text() == ANNOTATE_SKIPPED
    report = [json.loads(line) for line in (out / "coco_skipped.jsonl").read_text().splitlines()]
    assert [r["image"] for r in report] == [str(out / "masks" / "lesion.png")]
    assert "mask file is missing" in report[0]["reason"]
    assert str(out / "coco_skipped.jsonl") in text
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 6

    # a later clean export removes its own stale report, and only that
    fresh = make_out(tmp_path / "again", torn=False)
    (out / "masks" / "lesion.png").write_bytes((fresh / "masks" / "lesion.png").read_bytes())
    code, text = export_cli(monkeypatch, capsys, out, "coco", out / "coco.json")
    assert code == 0, text
    assert not (out / "coco_skipped.jsonl").exists()
    assert (out / "skipped.jsonl").read_text() == ANNOTATE_SKIPPED


def test_export_beside_another_skipped_list_leaves_it_alone(tmp_path):
    out = annotated(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "skipped.jsonl").write_text("keep me\n")
    (out / "masks" / "bg.png").unlink()
    export_annotations(out, "labelstudio", elsewhere / "tasks.json", skip_bad=True)
    assert (elsewhere / "skipped.jsonl").read_text() == "keep me\n"
    assert "bg.png" in (elsewhere / "tasks_skipped.jsonl").read_text()


def test_folder_formats_keep_their_report_inside_the_target(tmp_path):
    out = annotated(tmp_path)
    (out / "masks" / "bg.png").unlink()
    export_annotations(out, "png", tmp_path / "png", skip_bad=True)
    assert "bg.png" in (tmp_path / "png" / "skipped.jsonl").read_text()
    assert (out / "skipped.jsonl").read_text() == ANNOTATE_SKIPPED


# --- 2. never overwrite the source ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "target", "entry"),
    [
        ("coco", "annotations.jsonl", "annotations.jsonl"),
        ("coco-results", "annotate.json", "annotate.json"),
        ("labelstudio", "skipped.jsonl", "skipped.jsonl"),
        ("cvat", "masks/cvat.xml", "masks"),
        ("coco", "overlays/lesion.png", "overlays"),
        ("png", "masks", "masks"),
        ("nifti", "uncertainty", "uncertainty"),
        ("monailabel", "overlays/store", "overlays"),
        ("coco", "review.sqlite", "review.sqlite"),
    ],
)
def test_export_refuses_the_source_folders_own_files(tmp_path, fmt, target, entry):
    out = annotated(tmp_path)
    before = snapshot(out)
    with pytest.raises(ConfigError, match=f"the --from folder's own {entry}") as err:
        export_annotations(out, fmt, out / target)
    assert err.value.path == str(out / target)
    assert "--to" in err.value.fix
    assert snapshot(out) == before


@pytest.mark.parametrize("fmt", ["png", "nifti", "monailabel", "coco"])
def test_export_refuses_the_source_folder_itself(tmp_path, fmt):
    out = annotated(tmp_path)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="--to is the --from folder itself"):
        export_annotations(out, fmt, out)
    assert snapshot(out) == before


def test_cli_png_into_the_source_keeps_its_0_255_masks(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    before = snapshot(out)
    code, text = export_cli(monkeypatch, capsys, out, "png", out)
    assert code == 2, text
    assert "--to is the --from folder itself" in text and "Fix:" in text and "Traceback" not in text
    assert snapshot(out) == before
    assert set(np.unique(read_png(out / "masks" / "lesion.png"))) == {0, 255}


def test_cli_coco_onto_the_records_file_is_refused(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    before = (out / "annotations.jsonl").read_bytes()
    code, text = export_cli(monkeypatch, capsys, out, "coco", out / "annotations.jsonl")
    assert code == 2, text
    assert "--to is the --from folder's own annotations.jsonl" in text
    assert str(out / "coco.json") in text  # the suggested --to
    assert (out / "annotations.jsonl").read_bytes() == before


def test_the_source_reached_through_a_link_is_refused_too(tmp_path):
    out = annotated(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(ConfigError, match="own annotations.jsonl"):
        export_annotations(out, "coco", link / "annotations.jsonl")
    with pytest.raises(ConfigError, match="folder itself"):
        export_annotations(link, "png", out)


def test_new_files_and_folders_inside_the_source_folder_are_fine(tmp_path):
    out = annotated(tmp_path)
    before = snapshot(out)
    export_annotations(out, "coco", out / "coco.json")
    export_annotations(out, "png", out / "png-export")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert "coco.json" in after and "png-export/classes.json" in after
    assert set(np.unique(read_png(out / "png-export" / "masks" / "lesion.png"))) == {0, 1}


# --- 6, 7. the kind of path --------------------------------------------------------------------------


def test_file_format_into_an_existing_folder(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder, but --format coco writes a file") as err:
        export_annotations(out, "coco", tmp_path / "empty")
    assert str(tmp_path / "empty" / "coco.json") in err.value.fix
    assert list((tmp_path / "empty").iterdir()) == []
    code, text = export_cli(monkeypatch, capsys, out, "cvat", tmp_path / "empty")
    assert code == 2 and "Traceback" not in text, text
    assert "is a folder, but --format cvat writes a file" in text and "empty/cvat.xml" in text


def test_folder_format_onto_an_existing_file(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, text = export_cli(monkeypatch, capsys, out, "png", afile)
    assert code == 2 and "Traceback" not in text, text
    assert f"{afile}: is a file, but --format png writes a folder" in text
    assert afile.read_text() == "mine"
    with pytest.raises(ConfigError, match=f"{afile} is a file, not a folder"):
        export_annotations(out, "coco", afile / "c.json")
    with pytest.raises(ConfigError, match=f"{afile} is a file, not a folder"):
        export_annotations(out, "nifti", afile / "sub" / "nii")
    assert afile.read_text() == "mine"


def test_from_a_file_says_it_is_a_file(tmp_path, monkeypatch, capsys):
    out = annotated(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, text = export_cli(monkeypatch, capsys, afile, "coco", tmp_path / "c.json")
    assert code == 2, text
    assert f"{afile}: is a file, not an annotation output folder" in text and "does not exist" not in text
    with pytest.raises(DataError, match="is a file") as err:
        open_output(out / "annotations.jsonl")
    assert str(out) in err.value.fix  # points at the folder holding the records file
    with pytest.raises(DataError, match="does not exist"):
        open_output(tmp_path / "nowhere")


def test_atomic_writes_name_a_folder_in_the_way(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(DataError, match="is a folder") as err:
        write_text(tmp_path / "x.json", "{}")
    assert err.value.path == str(tmp_path / "x.json")
    (tmp_path / "f").write_text("")
    with pytest.raises(DataError, match="a file stands where a folder is needed"):
        write_text(tmp_path / "f" / "x.json", "{}")


# --- 3, 4, 5, 6. malformed COCO files on import -------------------------------------------------------


def good_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "x.png", "width": 4, "height": 3}],
        "categories": [{"id": 1, "name": "lesion"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": {"size": [3, 4], "counts": [1, 2, 9]}}
        ],
    }


def write(tmp_path: Path, obj, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_good_coco_still_imports(tmp_path):
    back = import_annotations("coco", write(tmp_path, good_coco()), tmp_path / "im")
    rec = json.loads((back / "annotations.jsonl").read_text())
    assert rec["label"] == "lesion" and rec["mask_area"] == 2


def test_annotation_of_an_unknown_image_is_an_error(tmp_path, monkeypatch, capsys):
    coco = good_coco()
    coco["annotations"][0]["image_id"] = 99
    src = write(tmp_path, coco)
    with pytest.raises(DataError, match="annotation 7: image_id 99 is not the id of any image") as err:
        import_annotations("coco", src, tmp_path / "im")
    assert err.value.path == str(src)
    assert not (tmp_path / "im").exists()
    code, text = import_cli(monkeypatch, capsys, src, tmp_path / "im")
    assert code == 2 and "image_id 99" in text and "Fix:" in text, text
    assert not (tmp_path / "im").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category_id": 5}, "annotation 7: unknown category_id 5"),
        ({"image_id": [1]}, r"annotation 7: image_id \[1\] is not the id"),
        ({"segmentation": None}, "annotation 7: bad segmentation"),
    ],
)
def test_broken_annotations_are_named(tmp_path, change, message):
    coco = good_coco()
    coco["annotations"][0].update(change)
    with pytest.raises(DataError, match=message):
        import_annotations("coco", write(tmp_path, coco), tmp_path / "im")


def test_annotation_without_fields_is_named(tmp_path):
    coco = good_coco()
    del coco["annotations"][0]["category_id"], coco["annotations"][0]["id"]
    with pytest.raises(DataError, match=r"annotations\[0\]: no 'category_id'"):
        import_annotations("coco", write(tmp_path, coco), tmp_path / "im")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"height": None}, r"image 1 \(images\[0\]\): expected a positive integer 'height' but got no"),
        ({"width": "forty"}, "image 1 .*: expected a positive integer 'width' but got 'width' \"forty\""),
        ({"width": -5}, "image 1 .*: expected a positive integer 'width' but got 'width' -5"),
        ({"width": 0}, "positive integer 'width'"),
        ({"width": True}, "positive integer 'width'"),
        ({"width": 100000, "height": 100000}, "100000x100000 pixels is over pixelvote's limit of 268435456"),
        ({"id": None}, r"images\[0\]\): expected an integer 'id'"),
        ({"file_name": 3}, r"image 1 \(images\[0\]\): expected a 'file_name'"),
    ],
)
def test_malformed_image_entries_are_named(tmp_path, change, message):
    coco = good_coco()
    coco["images"][0].update(change)
    if change.get("height", 1) is None:
        del coco["images"][0]["height"]
    with pytest.raises(DataError, match=message) as err:
        import_annotations("coco", write(tmp_path, coco), tmp_path / "im")
    assert err.value.path == str(tmp_path / "c.json") and err.value.fix
    assert not (tmp_path / "im").exists()


def test_two_images_with_one_id(tmp_path):
    coco = good_coco()
    coco["images"].append({"id": 1, "file_name": "y.png", "width": 4, "height": 3})
    with pytest.raises(DataError, match=r"images\[1\]\): two images share the id 1"):
        import_annotations("coco", write(tmp_path, coco), tmp_path / "im")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([], "not a COCO instances file: expected a JSON object with 'images', 'annotations' and "
             "'categories' lists but got a list"),
        ({"images": "x", "categories": [], "annotations": []}, "'images' is a string"),
        ({"images": [], "categories": 3, "annotations": []}, "'categories' is a number"),
        ({"images": [], "categories": [], "annotations": {}}, "'annotations' is an object"),
        ({"images": [], "annotations": []}, "missing 'categories'"),
        ({"images": [3], "categories": []}, r"images\[0\] is a number, expected an object"),
        ({"images": [], "categories": [{"name": "a"}]}, r"categories\[0\] needs an integer 'id' and a"),
    ],
)
def test_not_a_coco_file(tmp_path, obj, message):
    with pytest.raises(DataError, match=message) as err:
        import_annotations("coco", write(tmp_path, obj), tmp_path / "im")
    assert "--from" in err.value.fix


def test_import_paths_of_the_wrong_kind(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    code, text = import_cli(monkeypatch, capsys, tmp_path / "data", tmp_path / "im")
    assert code == 2, text
    assert f"{tmp_path / 'data'}: is a folder, but --from expects a COCO file" in text
    with pytest.raises(DataError, match="is a folder, but --from expects a Label Studio export file"):
        import_annotations("labelstudio", tmp_path / "data", tmp_path / "im")
    with pytest.raises(DataError, match=r"COCO file is missing \(no such file\)"):
        import_annotations("coco", tmp_path / "none.json", tmp_path / "im")
    src = write(tmp_path, good_coco())
    with pytest.raises(ConfigError, match="is a file, but --to must be the new annotation output folder"):
        import_annotations("coco", src, src)
    assert json.loads(src.read_text()) == good_coco()
    with pytest.raises(ConfigError, match=f"cannot create the --to folder: {src} is a file"):
        import_annotations("coco", src, src / "im")
