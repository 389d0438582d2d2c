"""What a person sees of a prediction: colour maps, overlays, the spectrogram with its time axis, the attention matrix,
tables, a one-paragraph notice (`present` gathers them) and the zip export; drawn with numpy and PIL (no figure
library in the hot path)."""

from __future__ import annotations

import functools
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .explain import GROUPS, Explanation, normalise
from .image_processing import open_image

AXIS_HEIGHT = 22
MATRIX_CELL = 64


def _colormap_table(name: str) -> np.ndarray:
    """A 256×3 uint8 table of viridis or cividis, interpolated from anchor colours of those maps."""
    anchors = {
        "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
                    (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
        "cividis": [(0, 34, 78), (18, 53, 112), (59, 73, 108), (87, 93, 109), (112, 113, 115), (138, 134, 120),
                    (165, 156, 116), (195, 179, 105), (225, 204, 85), (254, 232, 56)],
    }
    if name not in anchors:
        raise ValueError(f"colour map must be viridis or cividis, got {name!r}")
    points = np.array(anchors[name], dtype=np.float32)
    positions = np.linspace(0, 1, len(points))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, positions, points[:, c]) for c in range(3)], axis=1).astype(np.uint8)


_TABLES: dict[str, np.ndarray] = {}


def colorize(heatmap: np.ndarray, *, cmap: str = "viridis") -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 through a perceptual colour map."""
    table = _TABLES.setdefault(cmap, _colormap_table(cmap))
    return table[(np.clip(heatmap, 0, 1) * 255).astype(np.uint8)]


def overlay(base: np.ndarray | Image.Image, heatmap: np.ndarray, *, alpha: float = 0.5, cmap: str = "viridis") -> np.ndarray:
    """Blend a heatmap over an image of the same height and width; returns (H, W, 3) uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not (isinstance(base, np.ndarray) and base.ndim == 3 and base.shape[2] == 3 and base.dtype == np.uint8):
        base = np.asarray((Image.fromarray(base) if isinstance(base, np.ndarray) else base).convert("RGB"))
    base = base.astype(np.float32)
    if base.shape[:2] != heatmap.shape:
        raise ValueError(f"heatmap {heatmap.shape} does not match the image {base.shape[:2]}")
    colours = colorize(heatmap, cmap=cmap).astype(np.float32)
    weight = alpha * np.clip(heatmap, 0, 1)[..., None]  # irrelevant pixels keep the image
    return (base * (1 - weight) + colours * weight).astype(np.uint8)


def for_display(heatmap: np.ndarray) -> np.ndarray:
    """Relevance is peaked (a few pixels carry most of it): scale to the 99th percentile of the non-zero
    values and take the square root, so the eye sees where it lies, not only its single maximum."""
    positive = heatmap[heatmap > 0]
    if positive.size == 0:
        return heatmap
    return np.sqrt(np.clip(heatmap / max(float(np.percentile(positive, 99)), 1e-8), 0, 1))


INK = {"black": (0, 0, 0), "white": (255, 255, 255)}


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


@functools.lru_cache(maxsize=1024)
def _text_mask(text: str) -> Image.Image:
    """`text` rendered once as an antialiased mask; labels and two-decimal values recur in every picture, and
    rendering them with FreeType each time cost more than drawing the rest of the picture."""
    _, _, right, bottom = _font().getbbox(text)
    mask = Image.new("L", (max(1, int(right)), max(1, int(bottom))))
    ImageDraw.Draw(mask).text((0, 0), text, fill=255, font=_font())
    return mask


def _write(canvas: Image.Image, xy: tuple[int, int], text: str, ink: str = "black") -> None:
    """Draw `text` on `canvas` with its top-left corner at `xy`, as `ImageDraw.text` would."""
    canvas.paste(INK[ink], (int(xy[0]), int(xy[1])), _text_mask(text))


def base_image(image: Any) -> np.ndarray:
    """The image as given (after EXIF rotation, transparency on white) as (H, W, 3) uint8: decode it once and
    pass the result to `image_overlay` for every redraw."""
    rgba = open_image(image).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _needs(value: np.ndarray | None, what: str) -> np.ndarray:
    """`value`, or a `ValueError` saying the explanation lacks it (its input had no such modality)."""
    if value is None:
        raise ValueError(f"the explanation has no {what}: the input lacked that modality")
    return value


def image_overlay(base: np.ndarray, explanation: Explanation, *, alpha: float = 0.5) -> np.ndarray:
    """`base_image(...)` with the explanation's relevance on top; (H, W, 3) uint8."""
    return overlay(base, for_display(_needs(explanation.image_heatmap, "image heatmap")), alpha=alpha)


def spectrogram_image(explanation: Explanation, *, alpha: float = 0.6, scale: int = 4) -> np.ndarray:
    """The log-mel spectrogram in grey (low frequencies at the bottom) with relevance in colour and a time
    axis in seconds underneath; (mel·scale + axis, frames·scale, 3) uint8."""
    spectrogram = _needs(explanation.audio_spectrogram, "spectrogram")
    spectrogram = normalise(spectrogram - spectrogram.min())
    grey = np.repeat((spectrogram[::-1] * 255).astype(np.uint8)[..., None], 3, axis=2)
    coloured = overlay(grey, for_display(_needs(explanation.audio_heatmap, "audio heatmap")[::-1]), alpha=alpha)
    height, width = coloured.shape[0] * scale, coloured.shape[1] * scale
    picture = Image.fromarray(coloured).resize((width, height), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (width, height + AXIS_HEIGHT), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    times = _needs(explanation.audio_times, "audio times")
    step = _tick_step(times[-1] - times[0])
    first = np.ceil(times[0] / step) * step
    for tick in np.arange(first, times[-1] + 1e-9, step):
        x = int(round((tick - times[0]) / (times[1] - times[0]) * scale)) if len(times) > 1 else 0
        draw.line([(x, height), (x, height + 5)], fill="black")
        _write(canvas, (min(x + 2, width - 30), height + 6), f"{tick:.1f} s")
    return np.asarray(canvas)


def _tick_step(span: float) -> float:
    for step in (0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0):
        if span / step <= 8:
            return step
    return 10.0


def attention_image(matrix: np.ndarray, present: list[str]) -> np.ndarray:
    """A groups × groups grid (rows attend to columns) of attention mass with its numbers; (H, W, 3) uint8."""
    names = [g for g in GROUPS if g == "summary" or g in present]
    index = [GROUPS.index(g) for g in names]
    values = matrix[np.ix_(index, index)]
    margin = 70
    size = margin + MATRIX_CELL * len(names)
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    colours = colorize(np.clip(values, 0, 1))
    for r, row_name in enumerate(names):
        _write(canvas, (4, margin + r * MATRIX_CELL + MATRIX_CELL // 2 - 5), row_name)
        _write(canvas, (margin + r * MATRIX_CELL + 4, margin - 16), row_name)
        for c in range(len(names)):
            x0, y0 = margin + c * MATRIX_CELL, margin + r * MATRIX_CELL
            draw.rectangle([x0, y0, x0 + MATRIX_CELL - 2, y0 + MATRIX_CELL - 2], fill=tuple(int(v) for v in colours[r, c]))
            ink = "black" if values[r, c] > 0.55 else "white"
            _write(canvas, (x0 + 16, y0 + MATRIX_CELL // 2 - 5), f"{values[r, c]:.2f}", ink)
    _write(canvas, (4, 4), "rows attend to columns")
    return np.asarray(canvas)


def select_attention(explanation: Explanation, *, layer: int | None, head: int | None) -> np.ndarray:
    """The groups × groups matrix of one layer and head, or averaged over what is None."""
    matrix = _needs(explanation.attention_matrix, "attention matrix")
    matrix = matrix if layer is None else matrix[layer : layer + 1]
    matrix = matrix if head is None else matrix[:, head : head + 1]
    return matrix.mean(axis=(0, 1))


def explanation_record(prediction: Any) -> dict:
    """Everything about a prediction and its explanation as JSON-ready data."""
    e = prediction.explanation
    record = {
        "label": prediction.label,
        "probs": prediction.probs,
        "modalities": prediction.modalities,
        "method": e.method,
        "target": e.target,
        "notes": e.notes,
        "modality_shares": e.modality_shares,
        "shapley": e.shapley,
        "counterfactuals": {k: {"label": v[0], "confidence": v[1]} for k, v in e.counterfactuals.items()},
        "agreement": e.agreement,
        "spans": e.spans,
        "attention_groups": list(GROUPS),
        "attention_matrix": e.attention_matrix.round(5).tolist(),
        "attention_matrix_mean": e.attention_matrix_mean.round(5).tolist(),
        "text_heatmap": e.text_heatmap,
        "audio_times": None if e.audio_times is None else np.round(e.audio_times, 4).tolist(),
        "timings": prediction.timings,
    }
    return record


def png_bytes(picture: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 picture as PNG at compression level 1: several times faster to encode than the default
    level for a somewhat larger file, which suits pictures that are served at once."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def export_zip(prediction: Any, path: str | Path, *, image: np.ndarray | None = None,
               drawn: dict[str, bytes] | None = None) -> Path:
    """Write `explanation.json` plus PNGs of every heatmap (and the overlays) into one zip file; `image` is the
    input's `base_image`, for the image overlay. `drawn` gives PNGs already made, by name (`image_overlay.png`,
    `audio_overlay.png`, `attention_matrix.png`), such as the ones a viewer sees; the others are drawn here."""
    path = Path(path)
    e = prediction.explanation
    drawn = drawn or {}
    pictures = {}
    if e.image_heatmap is not None:
        pictures["image_heatmap.png"] = lambda: colorize(e.image_heatmap)
        if image is not None:
            pictures["image_overlay.png"] = lambda: image_overlay(image, e)
    if e.audio_heatmap is not None:
        pictures["audio_heatmap.png"] = lambda: colorize(e.audio_heatmap[::-1])
        pictures["audio_overlay.png"] = lambda: spectrogram_image(e)
    pictures["attention_matrix.png"] = lambda: attention_image(e.attention_matrix_mean, prediction.modalities)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("explanation.json", json.dumps(explanation_record(prediction), indent=1, ensure_ascii=False))
        for name, draw in pictures.items():
            data = drawn[name] if name in drawn else png_bytes(draw())
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)  # PNG is compressed already
    return path


# ------------------------------------------------------------------------------------------ presenting


def draw_pictures(prediction: Any, image: np.ndarray | None, *, alpha: float = 0.5, layer: int | None = None,
                  head: int | None = None) -> dict[str, bytes | None]:
    """The pictures that depend on the viewer's choices as PNG bytes, named as in the zip export: the image overlay
    (over `image`, the input's `base_image`), the spectrogram and the attention matrix of `layer` and `head` (0-based;
    None averages). None where the input lacks the modality."""
    explanation = prediction.explanation
    matrix = select_attention(explanation, layer=layer, head=head)
    pictures = {
        "image_overlay.png": image_overlay(image, explanation, alpha=alpha)
        if explanation.image_heatmap is not None and image is not None else None,
        "audio_overlay.png": spectrogram_image(explanation, alpha=alpha) if explanation.audio_heatmap is not None else None,
        "attention_matrix.png": attention_image(matrix, prediction.modalities),
    }
    return {name: None if picture is None else png_bytes(picture) for name, picture in pictures.items()}


def notice(prediction: Any) -> str:
    """One paragraph (Markdown) on the answer, agreement between modalities, the method and anything adapted."""
    explanation = prediction.explanation
    used = " + ".join(prediction.modalities)
    lines = [f"**{prediction.label}** ({prediction.confidence:.0%}) from {used}, explained by {explanation.method}."]
    agreement = explanation.agreement
    if not agreement["agree"]:
        said = ", ".join(f"{m} says {label}" for m, label in agreement["labels"].items())
        lines.append(f"⚠️ The modalities disagree: {said}. "
                     f"Disagreeing with the combined answer: {', '.join(agreement['disagreeing']) or 'none'}.")
    lines += [f"ℹ️ {note}" for note in explanation.notes]
    return "\n\n".join(lines)


@dataclass
class Presentation:
    """An explained prediction as a page shows it.

    Args:
        probs (`dict[str, float]`): every label's probability, most probable first.
        pictures (`dict[str, bytes | None]`): PNGs from `draw_pictures`.
        words (`list[tuple[str, float]] | None`): the text's pieces and their relevance.
        shares (`list[list]`): per given modality: its share of the relevance, its Shapley value, its answer alone.
        subsets (`list[list]`): per subset of the given modalities: its answer and that answer's probability.
        notice (`str`): `notice(prediction)`.
    """

    probs: dict[str, float]
    pictures: dict[str, bytes | None]
    words: list[tuple[str, float]] | None
    shares: list[list]
    subsets: list[list]
    notice: str


def present(prediction: Any, image: np.ndarray | None, *, alpha: float = 0.5, layer: int | None = None,
            head: int | None = None) -> Presentation:
    """Everything a page shows of an explained `prediction` (`image` is the input's `base_image`, if any)."""
    explanation = prediction.explanation
    if explanation is None:
        raise ValueError("present needs an explained prediction (call the pipeline with explain=True)")
    alone = explanation.counterfactuals
    shares = [[m, round(explanation.modality_shares.get(m, 0.0), 3), round(explanation.shapley.get(m, 0.0), 3),
               f"{alone[m][0]} ({alone[m][1]:.0%})"] for m in prediction.modalities]
    return Presentation(
        probs=dict(prediction.top(len(prediction.probs))),
        pictures=draw_pictures(prediction, image, alpha=alpha, layer=layer, head=head),
        words=explanation.text_heatmap,
        shares=shares,
        subsets=[[key, label, round(confidence, 3)] for key, (label, confidence) in alone.items()],
        notice=notice(prediction),
    )
