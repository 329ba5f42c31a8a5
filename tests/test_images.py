"""Any image Pillow reads becomes upright 8-bit RGB; a damaged one is a UserError naming it."""

import numpy as np
import pytest
import torch
from PIL import Image

from coco_multilabel.data.images import image_problem, load_rgb
from coco_multilabel.errors import UserError

RED = (200, 30, 30)


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "JPEG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("LA", "PNG"), ("1", "PNG")],
)
def test_any_mode_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    Image.new("RGB", (16, 12), RED).convert(mode).save(path, format=fmt)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (16, 12)
    expected = np.asarray(Image.new("RGB", (1, 1), RED).convert(mode).convert("RGB"))[0, 0]
    assert np.abs(np.asarray(image)[6, 8].astype(int) - expected).max() <= 6


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    grey = np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0]
    assert np.array_equal(grey.ravel(), np.arange(256))  # a plain convert would give 0 then all 255


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (*RED, 255))
    image.save(tmp_path / "a.png")
    rgb = np.asarray(load_rgb(tmp_path / "a.png"))
    assert tuple(rgb[0, 0]) == RED and tuple(rgb[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), RED)
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    image.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "turned.jpg")
    assert upright.size == (20, 40)
    assert np.asarray(upright)[2, 10][2] > 200  # the blue band is now on top


def test_unreadable_and_truncated_images_name_the_file_and_check_data(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name in ("text.jpg", "cut.jpg"):
        with pytest.raises(UserError, match=rf"cannot read image .*{name}.*check-data"):
            load_rgb(tmp_path / name)
    assert image_problem(tmp_path / "full.jpg") is None
    assert image_problem(tmp_path / "cut.jpg") == "truncated"
    assert image_problem(tmp_path / "text.jpg") == "unreadable"
    assert image_problem(tmp_path / "missing.jpg") == "unreadable"


def photo(size=(120, 90), seed=0) -> Image.Image:
    """A photo-like RGB image: smooth gradients plus noise, so the JPEG has detail in every block."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def saved(tmp_path, name, image, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


@pytest.mark.parametrize("case", ["rgb", "progressive", "grey", "exif_rotated", "cmyk", "png", "large"])
def test_decode_image_matches_pillow_exactly_and_takes_decode_jpeg_where_it_applies(
    tmp_path, case, monkeypatch
):
    """The loader's decoder: torchvision's decode_jpeg for plain RGB and grey JPEGs decoded at full
    scale (pixel for pixel what Pillow decodes), Pillow for everything else."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    from coco_multilabel.data import images

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    path = {
        "rgb": lambda: saved(tmp_path, "a.jpg", photo(), quality=90),
        "progressive": lambda: saved(tmp_path, "a.jpg", photo(), quality=75, progressive=True),
        "grey": lambda: saved(tmp_path, "a.jpg", photo().convert("L")),
        "exif_rotated": lambda: saved(tmp_path, "a.jpg", photo(), exif=exif),
        "cmyk": lambda: saved(tmp_path, "a.jpg", photo().convert("CMYK")),
        "png": lambda: saved(tmp_path, "a.jpg", photo(), format="PNG"),  # a PNG named .jpg
        "large": lambda: saved(tmp_path, "a.jpg", photo((400, 300))),  # min_side 64: a reduced decode
    }[case]()
    calls = []
    real = images.decode_jpeg
    monkeypatch.setattr(images, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    min_side = 64 if case == "large" else None
    decoded = images.decode_image(path, min_side)
    expected = pil_to_tensor(load_rgb(path, min_side))
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)
    assert bool(calls) == (case in ("rgb", "progressive", "grey", "exif_rotated"))
    if case == "exif_rotated":
        assert decoded.shape == (3, 120, 90)  # upright: 90 x 120 on disk, turned


def test_decode_image_names_a_damaged_jpeg_as_load_rgb_does(tmp_path):
    from coco_multilabel.data.images import decode_image

    path = saved(tmp_path, "cut.jpg", photo())
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match=f"cannot read image {path}"):
        decode_image(path)
