"""Token-level attention across modalities, read from an explanation's own forward pass (no second pass).

`cross_attention(explanation, "image", (x, y))` takes the fused tokens at a place of one input (a pixel of the
image as given, a time in seconds of the clip as given, or a word index of the text) and returns the fusion
attention between them and every token of the other present modalities, mapped onto those inputs as the heatmaps
are: image (height, width) of the image as given, audio (mel, frames) on `audio_times`, text [(piece, score)].
`direction="from"` is what the chosen tokens attend to (their attention rows, averaged over them); `"to"` is what
attends to them (for every other token, the attention mass it gives the chosen tokens). Values are attention
weights (a row of one head of one layer sums to 1), averaged over heads and layers unless one is named.

`token_attention(explanation, "text", "image")` is the token × token block of the same attention.

Shape legend: N fused tokens, H heads, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .modalities import REGISTRY

if TYPE_CHECKING:
    from .explain import Explanation
    from .image_processing import ImageGeometry

DIRECTIONS = ("from", "to")


@dataclass
class TokenLayout:
    """Where each modality's tokens sit in the fused sequence and on its input, kept from an explained pass.

    Args:
        spans (`dict[str, tuple[int, int]]`): each present modality's tokens in the fused sequence.
        token_mask (`np.ndarray (N,)`): real (not padding) fused tokens.
        grids (`dict[str, tuple[int, int, int]]`): for image and audio, (special tokens first, grid height,
            grid width) of the encoder's tokens.
        shapes (`dict[str, tuple[int, int]]`): for image and audio, the model input's (height, width): the
            model's square, the spectrogram's (mel, frames).
        text (`str | None`), text_offsets (`list[tuple[int, int]]`): the text and each text token's characters.
        image_geometry (`ImageGeometry | None`): how the model's square maps onto the image as given.
        audio_start (`float`), frame_seconds (`float`), audio_duration (`float | None`): the audio window's start
            and frame step, in seconds of the clip as given, and the clip's duration.
    """

    spans: dict[str, tuple[int, int]]
    token_mask: np.ndarray
    grids: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    text: str | None = None
    text_offsets: list[tuple[int, int]] = field(default_factory=list)
    image_geometry: ImageGeometry | None = None
    audio_start: float = 0.0
    frame_seconds: float = 0.01
    audio_duration: float | None = None

    def tokens_at(self, modality: str, at: Any) -> list[int]:
        """Indices (within the modality's tokens) of the tokens at `at`; a `ValueError` says why none are."""
        if modality not in self.spans:
            raise ValueError(f"the input has no {modality}; it has {', '.join(self.spans)}")
        grid = REGISTRY[modality].grid
        if grid == "sequence":
            return self._words_tokens(at)
        special, rows, columns = self.grids[modality]
        height, width = self.shapes[modality]
        if modality != "audio":
            # A pixel (x, y): of the image as given, or for another grid modality of the model's input.
            if not (isinstance(at, (tuple, list)) and len(at) == 2):
                given = "of the image as given" if modality == "image" else "of the model's input"
                raise ValueError(f"an {modality} place is a pixel (x, y) {given}, got {at!r}")
            x, y = float(at[0]), float(at[1])
            geometry = self.image_geometry if modality == "image" else None
            if geometry is not None:
                if not (0 <= x < geometry.width and 0 <= y < geometry.height):
                    raise ValueError(f"pixel ({x:g}, {y:g}) is outside the image ({geometry.width}×{geometry.height})")
                left, top = geometry.box[:2]
                x = geometry.offset[0] + (x - left) * geometry.scale
                y = geometry.offset[1] + (y - top) * geometry.scale
            row = min(rows - 1, max(0, int(y / height * rows)))
            column = min(columns - 1, max(0, int(x / width * columns)))
            return [special + row * columns + column]
        try:
            seconds = float(at)
        except (TypeError, ValueError):
            raise ValueError(f"an audio place is a time in seconds of the clip as given, got {at!r}") from None
        end = self.audio_start + width * self.frame_seconds
        if not self.audio_start - self.frame_seconds <= seconds <= end:
            raise ValueError(f"{seconds:g} s is outside the part of the clip the model heard "
                             f"({max(0.0, self.audio_start):.2f}–{end if self.audio_duration is None else min(end, self.audio_duration):.2f} s)")
        frame = (seconds - self.audio_start) / self.frame_seconds
        column = min(columns - 1, max(0, int(frame / width * columns)))
        return [special + row * columns + column for row in range(rows)]

    def _words_tokens(self, at: Any) -> list[int]:
        from .explain import word_spans

        if self.text is None:
            raise ValueError("the input has no text")
        words = word_spans(self.text)
        if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or not 0 <= int(at) < len(words):
            raise ValueError(f"a text place is a word index in 0..{len(words) - 1}, got {at!r}")
        start, end = words[int(at)]
        chosen = [i for i, (s, e) in enumerate(self.text_offsets) if e > s and s < end and e > start]
        if not chosen:
            raise ValueError(f"word {int(at)} ({self.text[start:end]!r}) was cut off before the model read it")
        return chosen


@dataclass
class CrossAttention:
    """The attention between chosen tokens of one modality and every token of the other present modalities.

    Args:
        modality (`str`), tokens (`list[int]`): the chosen tokens (indices within that modality's tokens).
        direction (`str`): "from" (what they attend to) or "to" (what attends to them).
        layer (`int | None`), head (`int | None`): the attention read (None: averaged).
        maps (`dict[str, Any]`): each other modality's map, by name; `image`, `audio` and `text` read it: per pixel
            of the image as given (height, width), per spectrogram cell (mel, frames), and the text's pieces with
            their tokens' summed attention (None where that modality is the chosen one or absent).
        mass (`dict[str, float]`): the total attention between the chosen tokens and each other modality.
        peak (`float`): the largest single-token value, for a colour scale.
    """

    modality: str
    tokens: list[int]
    direction: str
    layer: int | None
    head: int | None
    maps: dict[str, Any] = field(default_factory=dict)
    mass: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0

    @property
    def image(self) -> np.ndarray | None:
        return self.maps.get("image")

    @property
    def audio(self) -> np.ndarray | None:
        return self.maps.get("audio")

    @property
    def text(self) -> list[tuple[str, float]] | None:
        return self.maps.get("text")


def averaged_attention(attentions: list[np.ndarray], *, layer: int | None, head: int | None) -> np.ndarray:
    """(N, N): the fusion attention of `layer` and `head`, averaged over those that are None."""
    if not attentions:
        raise ValueError("the explanation kept no attention maps")
    layers, heads = len(attentions), attentions[0].shape[0]
    if layer is not None and not 0 <= layer < layers:
        raise ValueError(f"layer must be in 0..{layers - 1}, got {layer}")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"head must be in 0..{heads - 1}, got {head}")
    chosen = attentions if layer is None else [attentions[layer]]
    stacked = np.stack([a if head is None else a[head : head + 1] for a in chosen])  # (L', H', N, N)
    return stacked.mean(axis=(0, 1))


def cross_attention(explanation: Explanation, modality: str, at: Any, *, layer: int | None = None,
                    head: int | None = None, direction: str = "from") -> CrossAttention:
    """See the module's docstring."""
    layout = _layout(explanation)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'from' or 'to', got {direction!r}")
    chosen = layout.tokens_at(modality, at)
    attention = averaged_attention(explanation.attentions, layer=layer, head=head)
    start = layout.spans[modality][0]
    rows = [start + t for t in chosen]
    result = CrossAttention(modality=modality, tokens=chosen, direction=direction, layer=layer, head=head)
    for other, (s0, s1) in layout.spans.items():
        if other == modality:
            continue
        block = attention[rows, s0:s1].mean(axis=0) if direction == "from" else attention[s0:s1][:, rows].sum(axis=1)
        block = block * layout.token_mask[s0:s1]
        result.mass[other] = float(block.sum())
        result.peak = max(result.peak, float(block.max(initial=0.0)))
        result.maps[other] = map_tokens(layout, other, block)
    return result


def token_attention(explanation: Explanation, rows: str, columns: str, *, layer: int | None = None,
                    head: int | None = None) -> np.ndarray:
    """(tokens of `rows`, tokens of `columns`): how much each token of one modality attends to each of another's."""
    layout = _layout(explanation)
    for name in (rows, columns):
        if name not in layout.spans:
            raise ValueError(f"the input has no {name}; it has {', '.join(layout.spans)}")
    attention = averaged_attention(explanation.attentions, layer=layer, head=head)
    (r0, r1), (c0, c1) = layout.spans[rows], layout.spans[columns]
    real_rows, real_columns = layout.token_mask[r0:r1], layout.token_mask[c0:c1]
    return attention[r0:r1, c0:c1][real_rows][:, real_columns]


def map_tokens(layout: TokenLayout, modality: str, scores: np.ndarray) -> Any:
    """Scores of one modality's tokens on its input, each token's value spread over its own cell (no blending)."""
    from .explain import image_to_given, text_pieces

    if REGISTRY[modality].grid == "sequence":
        assert layout.text is not None
        return text_pieces(layout.text, layout.text_offsets, scores[: len(layout.text_offsets)], scale=False)
    special, rows, columns = layout.grids[modality]
    grid = torch.from_numpy(np.ascontiguousarray(scores[special : special + rows * columns], dtype=np.float32))
    cells = F.interpolate(grid.reshape(1, 1, rows, columns), size=layout.shapes[modality], mode="nearest")[0, 0].numpy()
    if modality == "image" and layout.image_geometry is not None:
        return image_to_given(cells, layout.image_geometry, scale=False)
    return cells


def _layout(explanation: Explanation) -> TokenLayout:
    if explanation.layout is None:
        raise ValueError("this explanation has no token layout (it was not made by explain_item)")
    return explanation.layout
