"""Image loading for every mode and format users throw at it, image listing, CelebA attribute files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sia_cli.errors import SiaError
from sia_cli.inputs.images import ImageError, LabelledImages, list_images, load_image, read_attributes

RED, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)


def colour(rgb) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)


def close(image: torch.Tensor, rgb, atol: float = 0.03) -> bool:
    return bool(torch.allclose(image, colour(rgb).expand_as(image), atol=atol))


def halves(width: int, height: int, left, right, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


# ----------------------------------------------------------------------------- load_image: modes and formats


def test_rgb_png_keeps_pixels_and_layout(tmp_path):
    path = tmp_path / "rgb.png"
    halves(16, 16, (255, 0, 0), (0, 0, 255)).save(path)
    x = load_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert close(x[:, :, :8], RED, 1e-6) and close(x[:, :, 8:], BLUE, 1e-6)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 8), 128).save(path)
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8) and close(x, (128 / 255,) * 3, 1e-6)


def test_rgba_transparent_pixels_become_white(tmp_path):
    # Compositing on white: a transparent pixel's hidden colour must not leak into the image.
    path = tmp_path / "rgba.png"
    halves(16, 16, (255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA").save(path)
    x = load_image(path, 16)
    assert close(x[:, :, :8], WHITE, 1e-6) and close(x[:, :, 8:], BLUE, 1e-6)


def test_palette_with_transparent_index_becomes_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, index 1 red
    image.paste(0, (0, 0, 8, 16))
    image.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    x = load_image(path, 16)
    assert close(x[:, :, :8], WHITE, 1e-6) and close(x[:, :, 8:], RED, 1e-6)


@pytest.mark.parametrize("value, expected", [(32768, 0.5), (65535, 1.0), (200, 200 / 65535), (0, 0.0)])
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path, value, expected):
    # Clipping at 255 would make mid-grey white; a dark 16-bit image must not be stretched either.
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    x = load_image(path, 8)
    assert close(x, (expected,) * 3, atol=1 / 255)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # no key, full magenta+yellow = red
    assert Image.open(path).mode == "CMYK"
    x = load_image(path, 16)
    assert close(x, RED, atol=0.1)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high with a red left half; orientation 6 means "rotate 90 degrees clockwise
    # to display", so the upright image is 20 x 40 with red on top.
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(40, 20, (255, 0, 0), (0, 0, 255)).save(path, exif=exif, quality=95)
    x = load_image(path, 20)  # centre crop: rows 10..29 of the upright image
    assert close(x[:, :8, :], RED, atol=0.1) and close(x[:, 12:, :], BLUE, atol=0.1)
    # Exactly the decoded pixels, rotated, then cropped: nothing else changed.
    upright = tmp_path / "upright.png"
    Image.open(path).transpose(Image.Transpose.ROTATE_270).save(upright)
    assert torch.equal(x, load_image(upright, 20))


def test_odd_size_is_centre_cropped_to_a_square_then_resized(tmp_path):
    # 37 x 53: the square is rows 8..44; green bands outside it must vanish.
    path = tmp_path / "odd.png"
    image = Image.new("RGB", (37, 53), (0, 255, 0))
    image.paste((0, 0, 255), (0, 8, 37, 45))
    image.save(path)
    x = load_image(path, 32)
    assert x.shape == (3, 32, 32)
    assert close(x, BLUE, atol=0.02)


def test_one_pixel_image_is_upscaled(tmp_path):
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 200, 30)).save(path)
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8) and close(x, (10 / 255, 200 / 255, 30 / 255), atol=1 / 255)


def noise_png(path: Path, size: int = 64) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated_png(path: Path) -> None:
    data = noise_png(path).read_bytes()  # noise does not compress: half the file cuts the pixel data
    path.write_bytes(data[: len(data) // 2])


def text_file(path: Path) -> None:
    path.write_text("this is not an image\n")


@pytest.mark.parametrize("damage", [zero_bytes, truncated_png, text_file])
def test_unreadable_files_raise_image_error(tmp_path, damage):
    path = tmp_path / "bad.png"
    damage(path)
    with pytest.raises(ImageError, match="unreadable image") as exc:
        load_image(path, 16)
    assert isinstance(exc.value, SiaError)  # the CLI turns it into one line, never a traceback


# ----------------------------------------------------------------------------- list_images


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(SiaError, match="not found"):
        list_images(tmp_path / "nope")


def test_list_images_empty_folder(tmp_path):
    with pytest.raises(SiaError, match="no images"):
        list_images(tmp_path)


def test_list_images_ignores_other_files_and_sorts(tmp_path):
    for name in ["b.png", "a.jpg", "c.JPEG", "notes.txt", "list_attr.txt", "model.pth"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a folder with an image suffix is not an image
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.JPEG"]


# ----------------------------------------------------------------------------- read_attributes


def attr_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "list_attr.txt"
    path.write_text(text)
    return path


def test_read_attributes_maps_signed_and_binary_values_to_01(tmp_path):
    signed = attr_file(tmp_path, "2\nBangs Smiling Young \n000001.jpg -1  1  1\n000002.jpg  1 -1 -1\n")
    table = read_attributes(signed)
    assert table.names == ["Bangs", "Smiling", "Young"]
    assert table.vector("000001.jpg").tolist() == [0, 1, 1]
    assert table.vector(Path("some/dir/000002.jpg")).tolist() == [1, 0, 0]
    binary = read_attributes(attr_file(tmp_path, "1\nBangs Smiling\nx.png 0 1\n"))
    assert binary.vector("x.png").tolist() == [0, 1]
    assert binary.vector("missing.png") is None


@pytest.mark.parametrize("text, message", [
    ("3\nBangs Smiling\na.png 1 1\nb.png 1 -1\n", "declares 3 images but 2 rows"),
    ("2\nBangs Smiling\na.png 1 1\nb.png 1\n", "line 4: expected a file name and 2 values, found a file name and 1 value"),
    ("1\nBangs Smiling\na.png 1 2\n", "values must be -1, 0 or 1"),
    ("1\nBangs Smiling\na.png 1 yes\n", "values must be -1, 0 or 1"),
    ("1\nBangs Smiling Bangs\na.png 1 1 1\n", "listed twice: Bangs"),
    ("Bangs Smiling\na.png 1 1\n", "CelebA list_attr layout"),
    ("", "CelebA list_attr layout"),
])
def test_read_attributes_rejects_malformed_files(tmp_path, text, message):
    with pytest.raises(SiaError, match=message):
        read_attributes(attr_file(tmp_path, text))


def test_select_reorders_and_names_missing_attributes(tmp_path):
    table = read_attributes(attr_file(tmp_path, "1\nBangs Smiling Young\na.png 1 -1 1\n"))
    picked = table.select(["Young", "Bangs"])
    assert picked.names == ["Young", "Bangs"] and picked.vector("a.png").tolist() == [1, 1]
    with pytest.raises(SiaError) as exc:
        table.select(["Smiling", "Eyeglasses"])
    assert "Eyeglasses" in str(exc.value) and "Bangs, Smiling, Young" in str(exc.value)


# ----------------------------------------------------------------------------- LabelledImages


def test_labelled_images_pairs_each_image_with_its_vector(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    table = read_attributes(attr_file(tmp_path, "1\nBangs Smiling\na.png -1 1\n"))
    dataset = LabelledImages(tmp_path, table, 8)
    image, attrs = dataset[0]
    assert len(dataset) == 1 and image.shape == (3, 8, 8) and attrs.tolist() == [0, 1]


def test_labelled_images_refuses_listed_files_that_are_missing(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    table = read_attributes(attr_file(tmp_path, "2\nBangs\na.png 1\nb.png -1\n"))
    with pytest.raises(SiaError, match="b.png"):
        LabelledImages(tmp_path, table, 8)
