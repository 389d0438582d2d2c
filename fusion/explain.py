"""Explanations of a fusion prediction: relevance over pixels, spectrogram cells and words, modality shares,
counterfactual subsets with Shapley values, and attention between modalities.

Methods:
- `relevance` (default): class-specific gradient-weighted attention relevance (Chefer et al., 2021, "Generic
  Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"): R ← R + E_h[(∇A ⊙ A)⁺] R
  through the fusion layers, then through each attention encoder; convolutional encoders map their tokens'
  relevance back onto the input with gradient × input inside each token's cell.
- `rollout`: attention rollout (Abnar and Zuidema, 2020), no gradients.
- `attention`: the summary token's raw attention in one fusion layer and head (or their average).

Shape legend: N fused tokens, T an encoder's tokens, H heads, L layers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cross_attention import TokenLayout
from .image_processing import ImageGeometry
from .modalities import MODALITIES, REGISTRY, subset_key, subsets

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .modeling import FusionForClassification, FusionOutput

METHODS = ("relevance", "rollout", "attention")
GROUPS = ("summary", *MODALITIES)


@dataclass
class Explanation:
    """Why the model answered as it did, for one item; every heatmap is in [0, 1].

    Args:
        method (`str`): the method that ran (it may differ from the one asked, see `notes`).
        target (`str`): the class explained.
        image_heatmap (`np.ndarray (height, width)`): relevance per pixel of the image as given.
        image_token_heatmap (`np.ndarray (height, width)`): the same relevance at the encoder's own resolution (per
            token cell, smoothed between cells) before gradient × input picks out pixels inside each cell: what
            the app draws, since it covers the strokes a token sees rather than a few of its inked pixels.
        audio_heatmap (`np.ndarray (mel, frames)`): relevance per spectrogram cell.
        audio_spectrogram (`np.ndarray (mel, frames)`): the log-mel spectrogram the model saw.
        audio_times (`np.ndarray (frames,)`): time of each frame in seconds of the clip as given.
        text_heatmap (`list[tuple[str, float]]`): pieces of the text (words and the gaps between) and scores;
            the pieces join back to the text exactly.
        modality_shares (`dict[str, float]`): each present modality's share of the relevance, summing to 1.
        counterfactuals (`dict[str, tuple[str, float]]`): for every non-empty subset of the given modalities
            (keys like `image+text`), the predicted label and its probability.
        shapley (`dict[str, float]`): each modality's Shapley value for the explained class's probability
            (the empty set counts as the uniform prior).
        agreement (`dict`): `agree` (bool), the single-modality labels, and `disagreeing` modalities.
        attention_matrix (`np.ndarray (L, H, 4, 4)`): attention mass from each group (summary, image, text,
            audio: rows) to each group (columns), per fusion layer and head; `attention_matrix_mean` averages.
        attentions (`list[np.ndarray (H, N, N)]`): raw fusion attention maps per layer.
        spans (`dict[str, tuple[int, int]]`): each modality's tokens in the fused sequence.
        notes (`list[str]`): what was adapted (a fallback of method, a truncated text).
        audio_clip (`tuple[int, int] | None`): the spectrogram frames that lie inside the clip as given (the rest
            of the model's window is padding).
        audio_clip_spectrogram (`np.ndarray (mel, frames) | None`): for a clip longer than the model's window, the
            whole clip's log-mel, frame 0 at 0 s, for pictures of all of it; `audio_clip_offset` is its frame where the
            window begins. (A shorter clip's picture is the window's frames in `audio_clip`.)
        input_heatmaps (`dict[str, np.ndarray]`): the relevance on the model's own inputs (the image's square,
            the spectrogram; for text, per token), which `FusionPipeline.trust` removes cells by.
        trust (`dict[str, dict]`): filled by `FusionPipeline.trust`: per map, how much the explained class's
            probability falls when its top cells are removed versus random ones.
        layout (`TokenLayout`): where the tokens sit, for `fusion.cross_attention`.
        embeddings (`dict[str, np.ndarray]`): each given modality's unit vector in the checkpoint's shared space
            (when it has an embedding head), from the same single-modality passes as the counterfactuals;
            `similarities` gives their cosines.
    """

    method: str
    target: str
    image_heatmap: np.ndarray | None = None
    image_token_heatmap: np.ndarray | None = None
    audio_heatmap: np.ndarray | None = None
    audio_spectrogram: np.ndarray | None = None
    audio_times: np.ndarray | None = None
    text_heatmap: list[tuple[str, float]] | None = None
    modality_shares: dict[str, float] = field(default_factory=dict)
    counterfactuals: dict[str, tuple[str, float]] = field(default_factory=dict)
    shapley: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, Any] = field(default_factory=dict)
    attention_matrix: np.ndarray | None = None
    attention_matrix_mean: np.ndarray | None = None
    attentions: list[np.ndarray] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    audio_clip: tuple[int, int] | None = None
    audio_clip_spectrogram: np.ndarray | None = field(default=None, repr=False)
    audio_clip_offset: int = 0
    input_heatmaps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    trust: dict[str, dict] = field(default_factory=dict)
    layout: TokenLayout | None = field(default=None, repr=False)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the model tensors explained
    embeddings: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def similarities(self) -> dict[tuple[str, str], float]:
        """Cosine similarity of every pair of the given modalities in the shared space ({} without embeddings)."""
        names = list(self.embeddings)
        return {(a, b): float(self.embeddings[a] @ self.embeddings[b]) for a in names for b in names}


# ------------------------------------------------------------------------------------- relevance rules


def chefer_relevance(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """R = I; for each layer R ← R + E_h[(∇A ⊙ A)⁺] R. Inputs are (H, N, N) per layer; returns (N, N)."""
    size = attentions[0].shape[-1]
    relevance = torch.eye(size)
    for attention, gradient in zip(attentions, gradients):
        cam = (gradient * attention).clamp(min=0).mean(dim=0)  # (N, N)
        relevance = relevance + cam @ relevance
    return relevance


def rollout(attentions: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout: the product of head-averaged attention mixed half-and-half with identity."""
    size = attentions[0].shape[-1]
    result = torch.eye(size)
    for attention in attentions:
        mixed = 0.5 * attention.mean(dim=0) + 0.5 * torch.eye(size)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed @ result
    return result


def attention_matrix(attentions: list[torch.Tensor], spans: dict[str, tuple[int, int]], token_mask: torch.Tensor) -> np.ndarray:
    """(L, H, 4, 4): mean over a group's real query tokens of the attention mass they give each key group (zero rows
    and columns for groups the item lacks)."""
    groups = {"summary": (0, 1), **spans}
    size = attentions[0].shape[-1]
    keys = torch.zeros(size, len(GROUPS))  # (N, G): which group each key belongs to
    queries = torch.zeros(len(GROUPS), size)  # (G, N): each group's real queries, weighted to average
    for index, name in enumerate(GROUPS):
        if name in groups:
            start, end = groups[name]
            keys[start:end, index] = 1.0
            real = token_mask[start:end].float()
            queries[index, start:end] = real / real.sum().clamp(min=1.0)
    stacked = torch.stack(attentions).float()  # (L, H, N, N)
    return (queries @ (stacked @ keys)).numpy().astype(np.float32)  # (L, H, G, G)


def shapley_values(values: dict[frozenset, float], players: list[str], empty: float) -> dict[str, float]:
    """Exact Shapley values of a game given as {coalition: value}; `empty` is the value of no player."""
    n = len(players)
    result = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(len(others) + 1):
            weight = _factorial(size) * _factorial(n - size - 1) / _factorial(n)
            for coalition in itertools.combinations(others, size):
                base = values.get(frozenset(coalition), empty) if coalition else empty
                total += weight * (values[frozenset((*coalition, player))] - base)
        result[player] = total
    return result


def _factorial(n: int) -> int:
    return math.factorial(n)


def normalise(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.clip(values, 0.0, None)
    peak = values.max(initial=0.0)
    return values / peak if peak > 0 else values


# --------------------------------------------------------------------------------- mapping to inputs


def token_grid(encoder: PreTrainedModel, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(special tokens first, grid height, grid width) of a grid-shaped encoder's tokens."""
    config = encoder.config
    if getattr(config, "hidden_sizes", None):  # convolutional: ask the encoder once per input shape
        cache = encoder.__dict__.setdefault("_fusion_token_grids", {})
        if tuple(input_shape) not in cache:
            parameter = next(encoder.parameters())
            with torch.no_grad():
                probe = torch.zeros((1, *input_shape), dtype=parameter.dtype, device=parameter.device)
                features = encoder(probe).last_hidden_state
            cache[tuple(input_shape)] = (int(features.shape[-2]), int(features.shape[-1]))
        return (0, *cache[tuple(input_shape)])
    if config.model_type == "audio-spectrogram-transformer":
        height, width = getattr(encoder, "embeddings").get_shape(config)
        return (2, int(height), int(width))
    if config.model_type == "whisper":  # one token per two frames, each spanning every mel bin
        return (0, 1, int(config.max_source_positions))
    side = int(config.image_size) // int(config.patch_size)
    return (1, side, side)


def cell_gradients(encoder: PreTrainedModel) -> bool:
    """Whether an encoder's token relevance is spread over its input cells by gradient × input: convolutional
    encoders, whose tokens are coarse cells, and Whisper, whose tokens are whole columns of the spectrogram."""
    return bool(getattr(encoder.config, "hidden_sizes", None)) or encoder.config.model_type == "whisper"


def _grid_map(token_scores: torch.Tensor, encoder: PreTrainedModel, spatial: tuple[int, ...], encoder_shape: tuple[int, ...]) -> torch.Tensor:
    """Token scores of a grid encoder spread over the input's (height, width)."""
    special, height, width = token_grid(encoder, encoder_shape)
    grid = token_scores[special : special + height * width].reshape(1, 1, height, width)
    return F.interpolate(grid.float(), size=spatial, mode="bilinear", align_corners=False)[0, 0]


def image_to_given(square: np.ndarray, geometry: ImageGeometry, *, scale: bool = True) -> np.ndarray:
    """A heatmap over the model's square mapped onto the image as given (same height and width), brought to [0, 1]
    (`scale=False`: values kept, and each model pixel's value spread without blending, for token cells)."""
    out = np.zeros((geometry.height, geometry.width), dtype=np.float32)
    left, top, right, bottom = geometry.box
    off_x, off_y = int(geometry.offset[0]), int(geometry.offset[1])
    inner_w = max(1, round((right - left) * geometry.scale))
    inner_h = max(1, round((bottom - top) * geometry.scale))
    inner = square[off_y : off_y + inner_h, off_x : off_x + inner_w]
    if inner.size:
        resample = Image.Resampling.BILINEAR if scale else Image.Resampling.NEAREST
        resized = Image.fromarray(inner.astype(np.float32), mode="F").resize((right - left, bottom - top), resample)
        out[top:bottom, left:right] = np.asarray(resized)
    return normalise(out) if scale else out


def text_pieces(text: str, offsets: list[tuple[int, int]], scores: np.ndarray, *, scale: bool = True) -> list[tuple[str, float]]:
    """Words of `text` with the summed scores of their tokens, and the gaps between them (score 0); the
    pieces join back to `text`. Untokenised tails (truncation) are one gap. Word scores are brought to [0, 1]
    unless `scale` is False."""
    words: list[list[int]] = []  # [start, end] of whitespace-separated words
    for match_start, match_end in word_spans(text):
        words.append([match_start, match_end])
    word_scores = np.zeros(len(words), dtype=np.float32)
    for (start, end), score in zip(offsets, scores):
        if end <= start:
            continue  # special tokens and padding
        for index, (w0, w1) in enumerate(words):
            if start < w1 and end > w0:
                word_scores[index] += float(score)
                break
    word_scores = normalise(word_scores) if scale else word_scores
    pieces, cursor = [], 0
    for (w0, w1), score in zip(words, word_scores):
        if w0 > cursor:
            pieces.append((text[cursor:w0], 0.0))
        pieces.append((text[w0:w1], float(score)))
        cursor = w1
    if cursor < len(text):
        pieces.append((text[cursor:], 0.0))
    return pieces


def word_spans(text: str) -> list[tuple[int, int]]:
    """Words split on whitespace; CJK characters are words of their own, as the tokenizer splits them."""
    spans, start = [], None
    for i, char in enumerate(text):
        cjk = "\u3400" <= char <= "\u9fff" or "\uf900" <= char <= "\ufaff"
        if char.isspace() or cjk:
            if start is not None:
                spans.append((start, i))
                start = None
            if cjk:
                spans.append((i, i + 1))
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(text)))
    return spans


# ---------------------------------------------------------------------------------------- explaining


def explain_item(
    model: FusionForClassification, inputs: dict[str, torch.Tensor], info: dict[str, Any], *,
    method: str = "relevance", target: int | None = None, layer: int | None = None, head: int | None = None,
    frame_seconds: float,
) -> tuple[torch.Tensor, Explanation, FusionOutput]:
    """Explain the one item of `inputs` (model tensors of a batch of one, on the model's device and in its
    dtype) for class index `target` (default: the predicted one).

    Args:
        info (`dict`): the processor's facts about the item (`meta[0]`): text and its token offsets, image geometry,
            audio window start.
        frame_seconds (`float`): seconds between spectrogram frames, for `audio_times`.

    Returns its probabilities (K,), the explanation and the model's output (for `counterfactuals`).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    labels = model.config.class_names
    notes: list[str] = []
    # Relevance differentiates the answer with respect to the grid inputs (gradient × input within each cell).
    grid_inputs = [REGISTRY[m].main_input for m in MODALITIES if REGISTRY[m].grid == "spatial"]
    grid_inputs = [key for key in grid_inputs if key in inputs]
    inputs = dict(inputs)
    for key in grid_inputs:
        inputs[key] = inputs[key].detach().requires_grad_(method == "relevance")

    ran = method
    gradients = None
    try:
        with torch.enable_grad():
            out = model(**inputs, output_attentions=True)
            probs = out.logits.float().softmax(dim=-1)[0].detach().cpu()
            target_index = int(probs.argmax()) if target is None else target
            if method == "relevance":
                wanted = list(out.fusion_attentions)
                for modality in out.encoder_attentions or {}:
                    wanted += list(out.encoder_attentions[modality])
                gradients = torch.autograd.grad(out.logits[0, target_index], wanted + [inputs[k] for k in grid_inputs],
                                                allow_unused=True)
    except (RuntimeError, NotImplementedError) as error:
        # Some 8-bit kernels have no backward pass on some devices; rollout needs none.
        notes.append(f"relevance needs gradients, which failed in {_precision(model)} ({error}); fell back to rollout")
        ran = "rollout"
        with torch.inference_mode():
            out = model(**{k: v.detach() for k, v in inputs.items()}, output_attentions=True)
        probs = out.logits.float().softmax(dim=-1)[0].cpu()
        target_index = int(probs.argmax()) if target is None else target
        gradients = None

    assert out.fusion_attentions is not None and out.modality_spans is not None and out.modality_mask is not None
    assert out.token_mask is not None
    fusion = [a[0].detach().float().cpu() for a in out.fusion_attentions]  # L × (H, N, N)
    encoder_attentions = {m: [a[0].detach().float().cpu() for a in atts] for m, atts in (out.encoder_attentions or {}).items()}
    encoder_grads: dict[str, list[torch.Tensor]] = {}
    input_grads: dict[str, torch.Tensor] = {}
    if ran == "relevance":
        assert gradients is not None
        grad_iter = iter(gradients)
        fusion_grads = [next(grad_iter)[0].float().cpu() for _ in fusion]
        encoder_grads = {m: [next(grad_iter)[0].float().cpu() for _ in encoder_attentions[m]] for m in encoder_attentions}
        input_grads = dict(zip(grid_inputs, grad_iter))
        token_relevance = chefer_relevance(fusion, fusion_grads)[0]
    elif ran == "rollout":
        token_relevance = rollout(fusion)[0]
    else:
        chosen = fusion if layer is None else [fusion[layer]]
        stacked = torch.stack([a if head is None else a[head : head + 1] for a in chosen])  # (L', H', N, N)
        token_relevance = stacked.mean(dim=(0, 1))[0]
    token_relevance = token_relevance.clone()
    token_relevance[0] = 0.0  # the summary token's relevance to itself says nothing about the inputs
    token_relevance = token_relevance.clamp(min=0) * out.token_mask[0].cpu().float()

    explanation = Explanation(method=ran, target=labels[target_index], notes=notes, spans=dict(out.modality_spans))
    explanation.inputs = {k: v.detach() for k, v in inputs.items()}
    layout = TokenLayout(spans=dict(out.modality_spans), token_mask=out.token_mask[0].cpu().numpy().astype(bool),
                         text=info.get("text"), text_offsets=list(info.get("text_offsets", [])),
                         image_geometry=info.get("image_geometry"), audio_start=float(info.get("audio_start", 0.0)),
                         frame_seconds=frame_seconds, audio_duration=info.get("audio_duration"))
    explanation.layout = layout
    totals = {m: float(token_relevance[s0:s1].sum()) for m, (s0, s1) in out.modality_spans.items() if out.modality_mask[m][0]}
    grand = sum(totals.values())
    explanation.modality_shares = {m: (v / grand if grand > 0 else 1 / len(totals)) for m, v in totals.items()}

    for name, (s0, s1) in out.modality_spans.items():
        if not out.modality_mask[name][0]:
            continue
        modality = REGISTRY[name]
        scores = token_relevance[s0:s1]
        encoder = model.fusion.encoder_of(name).encoder
        if name in encoder_attentions:
            within = (chefer_relevance(encoder_attentions[name], encoder_grads[name]) if ran == "relevance"
                      else rollout(encoder_attentions[name]))
            scores = scores @ within  # relevance of the encoder's input tokens
        if modality.grid == "sequence":
            offsets = info["text_offsets"]
            explanation.input_heatmaps[name] = scores[: len(offsets)].numpy()
            explanation.text_heatmap = text_pieces(info["text"], offsets, scores[: len(offsets)].numpy())
            continue
        values = inputs[modality.main_input][0].detach().float().cpu()
        spatial = tuple(values.shape[-2:])
        encoder_shape = tuple(values.shape) if values.dim() == 3 else (1, *values.shape)
        if values.dim() == 2 and encoder.main_input_name == "input_values":  # AST reads (frames, mel)
            encoder_shape = (values.shape[-1], values.shape[-2])
        heat = _grid_map(scores, encoder, spatial, encoder_shape)
        layout.grids[name], layout.shapes[name] = token_grid(encoder, encoder_shape), (int(spatial[0]), int(spatial[1]))
        token_level = normalise(heat.detach().numpy())
        if ran == "relevance" and cell_gradients(encoder):
            # Within each token's cell, gradient × signal above the background says which pixels mattered.
            grad = input_grads[modality.main_input][0].detach().float().cpu().reshape(values.shape)
            signal = values - values.min()
            heat = heat * (grad * signal).abs().reshape(-1, *spatial).sum(dim=0)
        heat_map = normalise(heat.numpy())
        explanation.input_heatmaps[name] = heat_map
        if name == "image":
            explanation.image_heatmap = image_to_given(heat_map, info["image_geometry"])
            explanation.image_token_heatmap = image_to_given(token_level, info["image_geometry"])
        elif name == "audio":  # another grid modality's map is in `input_heatmaps` only
            explanation.audio_heatmap = heat_map
            explanation.audio_spectrogram = values.numpy()
            explanation.audio_times = info["audio_start"] + np.arange(values.shape[-1]) * frame_seconds
            explanation.audio_clip = clip_frames(explanation.audio_times, info.get("audio_duration"), frame_seconds)
            if info.get("audio_clip_features") is not None:  # longer than the window: the whole clip
                explanation.audio_clip_spectrogram = np.asarray(info["audio_clip_features"], dtype=np.float32)
                explanation.audio_clip_offset = int(round(info["audio_start"] / frame_seconds))

    explanation.attentions = [a.numpy() for a in fusion]
    explanation.attention_matrix = attention_matrix(fusion, out.modality_spans, out.token_mask[0].cpu())
    explanation.attention_matrix_mean = explanation.attention_matrix.mean(axis=(0, 1))
    return probs, explanation, out


def clip_frames(times: np.ndarray, duration: float | None, frame_seconds: float) -> tuple[int, int]:
    """(first, last + 1) of the frames whose time lies in the clip as given, [0, duration]."""
    inside = (times >= -frame_seconds / 2) & (times <= (np.inf if duration is None else duration - frame_seconds / 2))
    chosen = np.nonzero(inside)[0]
    return (int(chosen[0]), int(chosen[-1]) + 1) if len(chosen) else (0, len(times))


def _precision(model: torch.nn.Module) -> str:
    """How the model's weights are stored, for messages: int8 or the floating-point dtype."""
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def counterfactuals(
    model: FusionForClassification, output: FusionOutput, present: list[str], target_index: int,
    embeddings: dict[str, np.ndarray] | None = None,
) -> tuple[dict, dict, dict]:
    """Every non-empty subset of the item's modalities, scored from the fused tokens of the explanation's own
    forward pass (`output`): labels, Shapley values and agreement.

    The subsets short of the full set run as one batch of the fusion layers, each row with the other modalities'
    tokens masked out, which equals running the subset alone (the fusion layers have no positions and the encoders
    never see each other). Training's `FusionModel.subset_summaries` runs each subset over its own tokens instead,
    which suits many rows per subset; with one row each, its six passes took 13.5–14.5 ms where this whole function
    takes 8.1–8.3 ms (shipped checkpoint, three modalities, this 2-core CPU). The full set is the explanation's
    own answer."""
    labels = model.config.class_names
    chosen = subsets(present)
    assert output.encoded is not None and output.token_mask is not None and output.modality_spans is not None
    assert output.logits is not None
    encoded, real = output.encoded[0].detach(), output.token_mask[0]
    partial = [subset for subset in chosen if len(subset) < len(present)]
    rows = []
    if partial:
        keep = real.expand(len(partial), -1).clone()  # (S, N)
        for row, subset in enumerate(partial):
            for modality, (start, end) in output.modality_spans.items():
                if modality not in subset:
                    keep[row, start:end] = False
        with torch.inference_mode():
            hidden, _ = model.fusion.fuse(encoded.expand(len(partial), -1, -1), keep, summary_only=True)
            rows = list(model.head(hidden[:, 0]))
            if embeddings is not None and model.embedding_head is not None:
                for subset, summary in zip(partial, hidden[:, 0]):
                    if len(subset) == 1:
                        embeddings[subset[0]] = model.embed(summary[None])[0].cpu().numpy()
    rows.append(output.logits[0].detach())  # the full set: `subsets` lists it last
    if len(present) == 1 and embeddings is not None and model.embedding_head is not None and output.summary is not None:
        with torch.inference_mode():  # the explanation's own pass is that modality alone
            embeddings[present[0]] = model.embed(output.summary[:1].detach())[0].cpu().numpy()
    probs = torch.stack(rows).float().softmax(dim=-1).cpu()
    results, values = {}, {}
    for subset, row in zip(chosen, probs):
        index = int(row.argmax())
        results[subset_key(subset)] = (labels[index], float(row[index]))
        values[frozenset(subset)] = float(row[target_index])
    shapley = shapley_values(values, list(present), empty=1.0 / len(labels))
    singles = {m: results[m][0] for m in present}
    full = results[subset_key(present)][0]
    distinct = set(singles.values())
    disagreeing = [m for m, label in singles.items() if label != full] if len(distinct) > 1 else []
    agreement = {"agree": len(distinct) <= 1, "labels": singles, "disagreeing": disagreeing}
    return results, shapley, agreement
