"""`FusionImageProcessor`: an image (path, bytes, PIL image or array) to the normalised square the image encoder
reads, and the geometry that maps heatmaps back onto the image as given."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .input_errors import FusionInputError
from .input_errors import describe as _describe
from .input_errors import reason as _reason
from .processor_base import ModalityProcessor


@dataclass
class ImageSettings:
    """How an image becomes `pixel_values`; the digits model follows MNIST's own preparation."""

    size: int = 28  # side of the square the model sees
    ink_box: int = 20  # the ink is scaled to fit this box, then centred by mass (MNIST: 20 in 28)
    invert_light_background: bool = True  # model expects light ink on a dark background
    crop_to_ink: bool = True
    ink_threshold: float = 0.25  # fraction of the contrast range above which a pixel is ink
    mean: float = 0.1307
    std: float = 0.3081
    max_pixels: int = 40_000_000  # larger images are refused before decoding fully


def open_image(source: Any, settings: ImageSettings | None = None) -> Image.Image:
    """Decode a path, bytes, PIL image or array into a PIL image, refusing oversized ones."""
    settings = settings or ImageSettings()
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise FusionInputError(f"image file {str(source)!r} does not exist")
        if isinstance(source, (bytes, bytearray)) and not source:
            raise FusionInputError("image data is empty (0 bytes)")
        if isinstance(source, (str, os.PathLike)) and Path(source).stat().st_size == 0:
            raise FusionInputError(f"image file {Path(source).name!r} is empty (0 bytes)")
        data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(data)
                width, height = image.size
                if width * height > settings.max_pixels:
                    raise FusionInputError(
                        f"image is {width}×{height} pixels; at most {settings.max_pixels:,} pixels are accepted"
                    )
                image.load()
        except FusionInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise FusionInputError(f"image refused as a decompression bomb: {error}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise FusionInputError(
                f"could not decode the image ({_reason(error, source)}); accepted: PNG, JPEG, GIF, BMP, WebP, TIFF"
            ) from None
    else:
        raise FusionInputError(
            f"image must be a file path, bytes, PIL image or array, got {_describe(source)}"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise FusionInputError(f"image has no pixels ({width}×{height})")
    if width * height > settings.max_pixels:
        raise FusionInputError(f"image is {width}×{height} pixels; at most {settings.max_pixels:,} pixels are accepted")
    getattr(image, "seek", lambda _: None)(0)  # animated: the first frame
    return ImageOps.exif_transpose(image)


def _image_from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise FusionInputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.size == 0:
        raise FusionInputError(f"image array is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise FusionInputError("image array contains NaN or infinite values")
    if array.dtype.kind == "f":
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        top = np.iinfo(array.dtype).max if array.dtype.kind in "ui" and array.max() > 255 else 255
        array = np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels in [0, 1] for any mode: transparency is composited onto white, 16-bit is rescaled."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


@dataclass
class ImageGeometry:
    """Where the model's square came from in the image as given, to map heatmaps back onto it."""

    width: int  # of the image as given (after EXIF rotation)
    height: int
    box: tuple[int, int, int, int]  # crop (left, top, right, bottom) in given pixels
    scale: float  # model pixels per given pixel
    offset: tuple[float, float]  # top-left of the scaled crop inside the model's square (x, y)
    inverted: bool


def prepare_image(source: Any, settings: ImageSettings) -> tuple[np.ndarray, ImageGeometry]:
    """Grey, light-on-dark, cropped to the ink and centred by mass: a (size, size) float array in [0, 1]."""
    image = open_image(source, settings)
    grey = _to_grey(image)
    height, width = grey.shape
    # Border brightness tells paper from blackboard; drawings and photos of paper are dark-on-light.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    inverted = bool(settings.invert_light_background and np.median(border) > 0.5)
    if inverted:
        grey = 1.0 - grey
    low, high = float(grey.min()), float(grey.max())
    box = (0, 0, width, height)
    if settings.crop_to_ink and high - low > 1e-3:
        rows, cols = np.nonzero(grey > low + settings.ink_threshold * (high - low))
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    crop = grey[box[1] : box[3], box[0] : box[2]]
    scale = settings.ink_box / max(crop.shape)
    new_w, new_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.float64) / 255.0
    # Centre of mass at the centre of the square, as MNIST's preparation does.
    total = small.sum()
    if total > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    else:
        cy, cx = (new_h - 1) / 2, (new_w - 1) / 2
    size = settings.size
    off_x = int(round((size - 1) / 2 - cx))
    off_y = int(round((size - 1) / 2 - cy))
    off_x = min(max(off_x, 0), size - new_w)
    off_y = min(max(off_y, 0), size - new_h)
    square = np.zeros((size, size))
    square[off_y : off_y + new_h, off_x : off_x + new_w] = small
    geometry = ImageGeometry(width, height, box, new_w / crop.shape[1], (float(off_x), float(off_y)), inverted)
    return square, geometry


class FusionImageProcessor(ModalityProcessor):
    """Prepares images for the image encoder: grey, light ink on dark, cropped to the ink, scaled into the
    square and centred by mass as MNIST's digits were, then normalised.

    Args:
        settings (`ImageSettings`): the checkpoint's image constants.

    Example:
        ```python
        >>> pixels, geometry = FusionImageProcessor()("seven.png")
        >>> pixels.shape
        torch.Size([1, 28, 28])
        ```
    """

    modality = "image"
    Settings = ImageSettings

    def __init__(self, settings: ImageSettings | None = None):
        self.settings: ImageSettings = settings or ImageSettings()

    def __call__(self, source: Any) -> tuple[torch.Tensor, ImageGeometry]:
        """(1, size, size) normalised pixels, and where they came from."""
        square, geometry = prepare_image(source, self.settings)
        return self.normalize(square), geometry

    def prepare(self, source: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The pixels and the facts an explanation needs (`image_geometry`)."""
        pixels, geometry = self(source)
        return pixels, {"image_geometry": geometry}

    def normalize(self, square: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A prepared (size, size) square in [0, 1] as normalised (1, size, size) pixels."""
        square = torch.as_tensor(square, dtype=torch.float32)
        return ((square - self.settings.mean) / self.settings.std).reshape(1, *square.shape[-2:])

    def stack(self, prepared: list[torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
        """`pixel_values` (B, 1, size, size), zero where an item has no image, and `image_mask` (B,)."""
        return stack_grids(prepared, "pixel_values", "image_mask"), {}


def stack_grids(prepared: list[torch.Tensor | None], values_name: str, mask_name: str) -> dict[str, torch.Tensor]:
    """Same-shaped tensors of the items that have them, stacked with zeros for the others, and their mask."""
    present = {i: p for i, p in enumerate(prepared) if p is not None}
    first = next(iter(present.values()))
    values = torch.zeros((len(prepared), *first.shape))
    mask = torch.zeros(len(prepared), dtype=torch.bool)
    for i, tensor in present.items():
        values[i], mask[i] = tensor, True
    return {values_name: values, mask_name: mask}
