"""Reading images as the model needs them, and checking them as ``check_data`` reports them.

The challenge ships JPEGs, but students re-save, convert and truncate files: anything Pillow reads
becomes an upright 8-bit RGB image, and anything it cannot read is a UserError naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

from coco_multilabel.data.labels import CHECK_DATA_HINT
from coco_multilabel.errors import UserError
from coco_multilabel.io import one_line

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
# What Pillow raises on a damaged file varies by plugin; none of it is the user's bug to debug.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode: 16-bit grey is scaled (Pillow would clip it to white) and transparent
    pixels become white (their colour under the alpha is arbitrary)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = np.asarray(image, dtype=np.uint32) >> 8 if image.mode != "I" else _scaled_int(image)
        image = Image.fromarray(grey.astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _scaled_int(image: Image.Image) -> np.ndarray:
    """Mode ``I`` is how Pillow opens 16-bit PNGs; values above 255 mean a 16-bit range."""
    values = np.asarray(image, dtype=np.int64).clip(0, 65535)
    return values >> 8 if values.max(initial=0) > 255 else values


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode an image, apply its EXIF orientation and convert any mode to 8-bit RGB.

    With ``min_side``, a JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) that keeps both sides
    at least ``min_side``: much less work when the model looks at smaller images anyway.
    """
    try:
        with Image.open(path) as image:
            check_pixel_count(image, path)
            if min_side:
                image.draft(image.mode, (min_side, min_side))  # keep the mode: to_rgb converts it
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as err:
        raise too_large(path, str(err)) from err
    except IsADirectoryError as err:
        raise UserError(f"image {path} is a folder, not an image; rename or remove it") from err
    except DECODE_ERRORS as err:
        raise UserError(f"cannot read image {path}: {one_line(err)}; {CHECK_DATA_HINT}") from err


def decode_image(path: str | Path, min_side: int | None = None) -> torch.Tensor:
    """An image as the model's transforms take it: upright 8-bit RGB, a 3 x H x W uint8 tensor.

    A baseline or progressive RGB or grey JPEG that would be decoded at full scale anyway (no
    reduced-scale decode applies, see ``load_rgb``) is decoded by torchvision's ``decode_jpeg``:
    the same libjpeg-turbo pixels as Pillow's, identical on every COCO photo tested, without a PIL
    image in between (``make bench`` measures both). Anything else, and anything ``decode_jpeg``
    refuses, goes through ``load_rgb``, which also names what is wrong with a damaged file."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # the header only
            check_pixel_count(image, path)
            fast = image.format == "JPEG" and image.mode in ("RGB", "L") and not _reduced(image, min_side)
    except (OSError, *DECODE_ERRORS):
        fast = False
    if fast:
        try:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(buffer, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass  # load_rgb decodes it, or says why it cannot
    return pil_to_tensor(load_rgb(path, min_side))


def _reduced(image: Image.Image, min_side: int | None) -> bool:
    """Whether Pillow's ``draft`` would decode this JPEG at 1/2, 1/4 or 1/8 scale for ``min_side``."""
    return bool(min_side) and min(image.width // min_side, image.height // min_side) >= 2


def check_pixel_count(image: Image.Image, path) -> None:
    """Pillow refuses images over twice ``MAX_IMAGE_PIXELS`` and only warns above it, then decodes
    for seconds into gigabytes: both are refused here, by size, before any pixel is decoded."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise too_large(path, f"{image.width} x {image.height} pixels, more than Pillow's {limit}")


def too_large(path, detail: str) -> UserError:
    return UserError(
        f"image {path} is too large to decode safely ({detail.split('. ')[0].rstrip('.')}; Pillow's "
        "decompression-bomb guard); shrink it (e.g. mogrify -resize '4096x4096>' FILE) or delete it"
    )


def image_problem(path: str | Path, full: bool = False) -> str | None:
    """Why ``path`` is not a usable JPEG (``"not_jpeg"``, ``"unreadable"``, ``"truncated"``), or None.

    The default looks at the header and the last bytes only, fast enough for 70k files; ``full``
    decodes every pixel, which also finds damage in the middle of a file.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(3)
            size = file.seek(0, 2)
            file.seek(max(0, size - 4096))
            tail = file.read()
    except OSError:
        return "unreadable"
    if head != JPEG_MAGIC:
        try:
            with Image.open(path):
                return "not_jpeg"  # a PNG or GIF renamed .jpg: readable, but not what the challenge ships
        except DECODE_ERRORS:
            return "unreadable"
    if JPEG_END not in tail:  # a copy or download cut short ends without the end-of-image marker
        return "truncated"
    try:
        with Image.open(path) as image:
            check_pixel_count(image, path)
            if full:
                image.load()
                if image.format == "JPEG" and _grey_filled_end(image):
                    return "truncated"
    except (UserError, Image.DecompressionBombError):
        return "too_large"
    except DECODE_ERRORS as err:
        return "truncated" if "truncated" in str(err) else "unreadable"
    return None


def _grey_filled_end(image: Image.Image) -> bool:
    """A JPEG cut short and closed with an end marker decodes without error: the decoder fills the
    blocks it never got with zero coefficients, flat mid-grey. The last block decoded is the
    bottom-right one, so a file missing any data ends in an 8 x 8 corner of exactly 128."""
    if image.mode not in ("RGB", "L", "CMYK") or min(image.size) < 8:
        return False
    corner = np.asarray(image.crop((image.width - 8, image.height - 8, image.width, image.height)))
    return bool((corner == (0 if image.mode == "CMYK" else 128)).all())
