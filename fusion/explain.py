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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .configuration import MODALITIES
from .processing import ImageGeometry

METHODS = ("relevance", "rollout", "attention")
GROUPS = ("summary", *MODALITIES)


@dataclass
class Explanation:
    """Why the model answered as it did, for one item; every heatmap is in [0, 1].

    Args:
        method (`str`): the method that ran (it may differ from the one asked, see `notes`).
        target (`str`): the class explained.
        image_heatmap (`np.ndarray (height, width)`): relevance per pixel of the image as given.
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
    """

    method: str
    target: str
    image_heatmap: np.ndarray | None = None
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
    """(L, H, 4, 4): mean over a group's real query tokens of the attention mass they give each key group."""
    groups = {"summary": (0, 1), **spans}
    layers, heads = len(attentions), attentions[0].shape[0]
    matrix = np.zeros((layers, heads, len(GROUPS), len(GROUPS)), dtype=np.float32)
    for layer, attention in enumerate(attentions):
        for row, query in enumerate(GROUPS):
            if query not in groups:
                continue
            q0, q1 = groups[query]
            real = token_mask[q0:q1]
            if not real.any():
                continue
            for column, key in enumerate(GROUPS):
                if key in groups:
                    k0, k1 = groups[key]
                    mass = attention[:, q0:q1, k0:k1].sum(dim=-1)[:, real].mean(dim=-1)  # (H,)
                    matrix[layer, :, row, column] = mass.numpy()
    return matrix


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


def token_grid(encoder: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
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
        return (2, *encoder.embeddings.get_shape(config))
    if config.model_type == "whisper":  # one token per two frames, each spanning every mel bin
        return (0, 1, config.max_source_positions)
    side = config.image_size // config.patch_size
    return (1, side, side)


def cell_gradients(encoder: torch.nn.Module) -> bool:
    """Whether an encoder's token relevance is spread over its input cells by gradient × input: convolutional
    encoders, whose tokens are coarse cells, and Whisper, whose tokens are whole columns of the spectrogram."""
    return bool(getattr(encoder.config, "hidden_sizes", None)) or encoder.config.model_type == "whisper"


def _grid_map(token_scores: torch.Tensor, encoder: torch.nn.Module, spatial: tuple[int, int], encoder_shape: tuple[int, ...]) -> torch.Tensor:
    """Token scores of a grid encoder spread over the input's (height, width)."""
    special, height, width = token_grid(encoder, encoder_shape)
    grid = token_scores[special : special + height * width].reshape(1, 1, height, width)
    return F.interpolate(grid.float(), size=spatial, mode="bilinear", align_corners=False)[0, 0]


def image_to_given(square: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """A heatmap over the model's square mapped onto the image as given (same height and width)."""
    out = np.zeros((geometry.height, geometry.width), dtype=np.float32)
    left, top, right, bottom = geometry.box
    off_x, off_y = int(geometry.offset[0]), int(geometry.offset[1])
    inner_w = max(1, round((right - left) * geometry.scale))
    inner_h = max(1, round((bottom - top) * geometry.scale))
    inner = square[off_y : off_y + inner_h, off_x : off_x + inner_w]
    if inner.size:
        resized = Image.fromarray(inner.astype(np.float32), mode="F").resize((right - left, bottom - top), Image.BILINEAR)
        out[top:bottom, left:right] = np.asarray(resized)
    return normalise(out)


def text_pieces(text: str, offsets: list[tuple[int, int]], scores: np.ndarray) -> list[tuple[str, float]]:
    """Words of `text` with the summed scores of their tokens, and the gaps between them (score 0); the
    pieces join back to `text`. Untokenised tails (truncation) are one gap."""
    words: list[list[int]] = []  # [start, end] of whitespace-separated words
    for match_start, match_end in _word_spans(text):
        words.append([match_start, match_end])
    word_scores = np.zeros(len(words), dtype=np.float32)
    for (start, end), score in zip(offsets, scores):
        if end <= start:
            continue  # special tokens and padding
        for index, (w0, w1) in enumerate(words):
            if start < w1 and end > w0:
                word_scores[index] += float(score)
                break
    word_scores = normalise(word_scores)
    pieces, cursor = [], 0
    for (w0, w1), score in zip(words, word_scores):
        if w0 > cursor:
            pieces.append((text[cursor:w0], 0.0))
        pieces.append((text[w0:w1], float(score)))
        cursor = w1
    if cursor < len(text):
        pieces.append((text[cursor:], 0.0))
    return pieces


def _word_spans(text: str) -> list[tuple[int, int]]:
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


def subset_key(subset) -> str:
    order = ("image", "audio", "text")
    return "+".join(m for m in order if m in subset)


def explain_item(pipeline, batch: dict[str, Any], *, method: str = "relevance", target: str | None = None,
                 layer: int | None = None, head: int | None = None) -> tuple[torch.Tensor, Explanation, Any]:
    """Explain the single item of a processed `batch`; returns its probabilities (K,), the explanation and the
    model's output (for `counterfactuals`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    model, processor = pipeline.model, pipeline.processor
    info = batch["meta"][0]
    inputs = {k: v.to(pipeline.device) for k, v in processor.model_inputs(batch).items()}
    notes = []
    if pipeline.precision in ("fp16", "bf16"):
        dtype = next(model.parameters()).dtype
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    for key in ("pixel_values", "audio_values"):
        if key in inputs:
            inputs[key] = inputs[key].detach().requires_grad_(method == "relevance")

    ran = method
    try:
        with torch.enable_grad():
            out = model(**inputs, output_attentions=True)
            probs = out.logits.float().softmax(dim=-1)[0].detach().cpu()
            target_index = int(probs.argmax()) if target is None else pipeline.labels.index(target)
            gradients = None
            if method == "relevance":
                wanted = list(out.fusion_attentions)
                for modality in out.encoder_attentions or {}:
                    wanted += list(out.encoder_attentions[modality])
                inputs_needing = [inputs[k] for k in ("pixel_values", "audio_values") if k in inputs]
                gradients = torch.autograd.grad(out.logits[0, target_index], wanted + inputs_needing, allow_unused=True)
    except (RuntimeError, NotImplementedError) as error:
        # Some 8-bit kernels have no backward pass on some devices; rollout needs none.
        notes.append(f"relevance needs gradients, which failed in {pipeline.precision} ({error}); fell back to rollout")
        ran = "rollout"
        with torch.inference_mode():
            out = model(**{k: v.detach() for k, v in inputs.items()}, output_attentions=True)
        probs = out.logits.float().softmax(dim=-1)[0].cpu()
        target_index = int(probs.argmax()) if target is None else pipeline.labels.index(target)
        gradients = None

    fusion = [a[0].detach().float().cpu() for a in out.fusion_attentions]  # L × (H, N, N)
    encoder_attentions = {m: [a[0].detach().float().cpu() for a in atts] for m, atts in (out.encoder_attentions or {}).items()}
    grad_iter = iter(gradients) if gradients is not None else None
    if ran == "relevance":
        fusion_grads = [next(grad_iter)[0].float().cpu() for _ in fusion]
        encoder_grads = {m: [next(grad_iter)[0].float().cpu() for _ in encoder_attentions[m]] for m in encoder_attentions}
        input_grads = {k: g for k, g in zip([k for k in ("pixel_values", "audio_values") if k in inputs], grad_iter)}
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

    explanation = Explanation(method=ran, target=pipeline.labels[target_index], notes=notes, spans=dict(out.modality_spans))
    totals = {m: float(token_relevance[s0:s1].sum()) for m, (s0, s1) in out.modality_spans.items() if out.modality_mask[m][0]}
    grand = sum(totals.values())
    explanation.modality_shares = {m: (v / grand if grand > 0 else 1 / len(totals)) for m, v in totals.items()}

    for modality, (s0, s1) in out.modality_spans.items():
        if not out.modality_mask[modality][0]:
            continue
        scores = token_relevance[s0:s1]
        encoder = model.encoders[modality].encoder
        if modality in encoder_attentions:
            within = (chefer_relevance(encoder_attentions[modality], encoder_grads[modality]) if ran == "relevance"
                      else rollout(encoder_attentions[modality]))
            scores = scores @ within  # relevance of the encoder's input tokens
        if modality == "text":
            offsets = info["text_offsets"]
            explanation.text_heatmap = text_pieces(info["text"], offsets, scores[: len(offsets)].numpy())
            continue
        key = "pixel_values" if modality == "image" else "audio_values"
        values = inputs[key][0].detach().float().cpu()
        spatial = tuple(values.shape[-2:])
        encoder_shape = tuple(values.shape) if values.dim() == 3 else (1, *values.shape)
        if modality == "audio" and encoder.main_input_name == "input_values":
            encoder_shape = (values.shape[-1], values.shape[-2])
        heat = _grid_map(scores, encoder, spatial, encoder_shape)
        if ran == "relevance" and cell_gradients(encoder):
            # Within each token's cell, gradient × signal above the background says which pixels mattered.
            grad = input_grads[key][0].detach().float().cpu().reshape(values.shape)
            signal = values - values.min()
            heat = heat * (grad * signal).abs().reshape(-1, *spatial).sum(dim=0)
        heat = normalise(heat.numpy())
        if modality == "image":
            explanation.image_heatmap = image_to_given(heat, info["image_geometry"])
        else:
            audio = processor.settings.audio
            explanation.audio_heatmap = heat
            explanation.audio_spectrogram = values.numpy()
            explanation.audio_times = info["audio_start"] + np.arange(values.shape[-1]) * audio.hop_length / audio.sampling_rate

    explanation.attentions = [a.numpy() for a in fusion]
    explanation.attention_matrix = attention_matrix(fusion, out.modality_spans, out.token_mask[0].cpu())
    explanation.attention_matrix_mean = explanation.attention_matrix.mean(axis=(0, 1))
    if info.get("text_truncated"):
        notes.append(f"the text was truncated to {processor.settings.text.max_tokens} tokens")
    return probs, explanation, out


def counterfactuals(pipeline, output, present: list[str], target_index: int) -> tuple[dict, dict, dict]:
    """Every non-empty subset of the item's modalities, scored from the fused tokens of the explanation's own
    forward pass (`output`): labels, Shapley values and agreement.

    A subset runs the fusion layers over its own tokens only, which equals masking the others (the fusion layers
    have no positions and the encoders never see each other) at a third of the cost of a padded batch of every
    subset; the full set is the explanation's own answer."""
    subsets = [s for r in range(1, len(present) + 1) for s in itertools.combinations(present, r)]
    encoded, real = output.encoded[0].detach(), output.token_mask[0]
    rows = []
    with torch.inference_mode():
        for subset in subsets:
            if len(subset) == len(present):
                rows.append(output.logits[0].detach())
                continue
            keep = real.clone()
            for modality, (start, end) in output.modality_spans.items():
                if modality not in subset:
                    keep[start:end] = False
            tokens = encoded[keep][None]
            logits, _, _ = pipeline.model.fuse(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
            rows.append(logits[0])
    probs = torch.stack(rows).float().softmax(dim=-1).cpu()
    results, values = {}, {}
    for subset, row in zip(subsets, probs):
        index = int(row.argmax())
        results[subset_key(subset)] = (pipeline.labels[index], float(row[index]))
        values[frozenset(subset)] = float(row[target_index])
    shapley = shapley_values(values, list(present), empty=1.0 / len(pipeline.labels))
    singles = {m: results[m][0] for m in present}
    full = results[subset_key(present)][0]
    labels = set(singles.values())
    disagreeing = [m for m, label in singles.items() if label != full] if len(labels) > 1 else []
    agreement = {"agree": len(labels) <= 1, "labels": singles, "disagreeing": disagreeing}
    return results, shapley, agreement


# ------------------------------------------------------------------------------------------ rendering


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


# ------------------------------------------------------------------------------------- faithfulness


def _true_probability(pipeline, items: list[dict], labels: list[int]) -> np.ndarray:
    predictions = pipeline(items)
    return np.array([p.probs[pipeline.labels[label]] for p, label in zip(predictions, labels)])


def image_deletion(pipeline, images: list[np.ndarray], labels: list[int], *, fraction: float = 0.2,
                   steps: int = 10, seed: int = 0) -> dict:
    """Replace the most relevant `fraction` of each image's pixels with its background, and a random
    `fraction` for comparison; report the mean drop of the true class's probability for both, their ratio,
    and deletion and insertion curves (true-class probability as the top pixels are removed or restored)."""
    rng = np.random.default_rng(seed)
    base = _true_probability(pipeline, [{"image": image} for image in images], labels)
    relevant, random_, curves_del, curves_ins = [], [], [], []
    grid = np.linspace(0, 1, steps + 1)
    for image, label, p0 in zip(images, labels, base):
        heat = pipeline(image=image, explain=True, target=pipeline.labels[label]).image_heatmap
        grey = np.asarray(image, dtype=np.float32)
        background = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
        order = np.lexsort((rng.random(heat.size), -heat.ravel()))
        count = int(round(fraction * heat.size))

        def erased(indices):
            out = grey.copy().ravel()
            out[indices] = background
            return out.reshape(grey.shape).astype(np.asarray(image).dtype)

        def restored(indices):
            out = np.full(grey.size, background, dtype=np.float32)
            out[indices] = grey.ravel()[indices]
            return out.reshape(grey.shape).astype(np.asarray(image).dtype)

        variants = [erased(order[:count]), erased(rng.permutation(heat.size)[:count])]
        variants += [erased(order[: int(round(f * heat.size))]) for f in grid]
        variants += [restored(order[: int(round(f * heat.size))]) for f in grid]
        probs = _true_probability(pipeline, [{"image": v} for v in variants], [label] * len(variants))
        relevant.append(p0 - probs[0])
        random_.append(p0 - probs[1])
        curves_del.append(probs[2 : 2 + len(grid)])
        curves_ins.append(probs[2 + len(grid) :])
    return _deletion_summary(relevant, random_, curves_del, curves_ins, grid)


def audio_deletion(pipeline, clips: list[Any], labels: list[int], *, fraction: float = 0.2, steps: int = 10, seed: int = 0) -> dict:
    """Mask the most relevant `fraction` of each spectrogram's frames (to the spectrogram's floor) and a
    random `fraction` for comparison; the same summary as `image_deletion`."""
    rng = np.random.default_rng(seed)
    processor = pipeline.processor
    relevant, random_, curves_del, curves_ins = [], [], [], []
    grid = np.linspace(0, 1, steps + 1)
    for clip, label in zip(clips, labels):
        features, _ = processor.audio_features(clip)
        pred = pipeline(audio=clip, explain=True, target=pipeline.labels[label])
        frame_relevance = pred.audio_heatmap.sum(axis=0)
        frames = frame_relevance.size
        order = np.lexsort((rng.random(frames), -frame_relevance))
        count = int(round(fraction * frames))
        floor = float(features.min())

        def masked(indices):
            out = features.clone()
            out[:, indices] = floor
            return out

        def kept(indices):
            out = torch.full_like(features, floor)
            out[:, indices] = features[:, indices]
            return out

        variants = [features, masked(order[:count]), masked(rng.permutation(frames)[:count])]
        variants += [masked(order[: int(round(f * frames))]) for f in grid]
        variants += [kept(order[: int(round(f * frames))]) for f in grid]
        batch = {"audio_values": torch.stack(variants), "audio_mask": torch.ones(len(variants), dtype=torch.bool)}
        probs = pipeline.forward(batch).logits.float().softmax(dim=-1)[:, label].cpu().numpy()
        relevant.append(probs[0] - probs[1])
        random_.append(probs[0] - probs[2])
        curves_del.append(probs[3 : 3 + len(grid)])
        curves_ins.append(probs[3 + len(grid) :])
    return _deletion_summary(relevant, random_, curves_del, curves_ins, grid)


def _deletion_summary(relevant, random_, curves_del, curves_ins, grid) -> dict:
    drop_relevant, drop_random = float(np.mean(relevant)), float(np.mean(random_))
    deletion, insertion = np.mean(curves_del, axis=0), np.mean(curves_ins, axis=0)
    return {
        "n": len(relevant),
        "drop_relevant": round(drop_relevant, 4),
        "drop_random": round(drop_random, 4),
        # Undefined (null in JSON, where infinity is not allowed) when random deletion does not lower it at all.
        "ratio": round(drop_relevant / drop_random, 2) if drop_random > 1e-6 else None,
        "fractions": [round(float(f), 2) for f in grid],
        "deletion_curve": [round(float(v), 4) for v in deletion],
        "insertion_curve": [round(float(v), 4) for v in insertion],
        "deletion_auc": round(float(np.trapezoid(deletion, grid)), 4),
        "insertion_auc": round(float(np.trapezoid(insertion, grid)), 4),
    }


def attribution_test(pipeline, images: list[np.ndarray], clips: list[Any], *, seed: int = 0) -> dict:
    """With a noise image beside clean audio, how often the audio's share beats the image's; and with
    white-noise audio beside a clean image, how often the image's share beats the audio's."""
    rng = np.random.default_rng(seed)
    rate = pipeline.processor.settings.audio.sampling_rate
    audio_wins = image_wins = 0
    for image, clip in zip(images, clips):
        noise_image = rng.integers(0, 256, np.asarray(image).shape, dtype=np.uint8)
        shares = pipeline(image=noise_image, audio=clip, explain=True).modality_shares
        audio_wins += shares["audio"] > shares["image"]
        noise_clip = (rate, rng.normal(0, 0.1, rate).astype(np.float32))
        shares = pipeline(image=image, audio=noise_clip, explain=True).modality_shares
        image_wins += shares["image"] > shares["audio"]
    n = min(len(images), len(clips))
    return {"n": n, "audio_over_noise_image": audio_wins / n, "image_over_noise_audio": image_wins / n}


def explain_cost(pipeline, items: list[dict], *, repeats: int = 3) -> dict:
    """Median seconds of a plain and of an explained prediction over `items`, measured in one run."""
    import time

    plain, explained = [], []
    pipeline(**items[0])  # warm up
    pipeline(**items[0], explain=True)
    for _ in range(repeats):
        for item in items:
            start = time.perf_counter()
            pipeline(**item)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipeline(**item, explain=True)
            explained.append(time.perf_counter() - start)
    p, e = float(np.median(plain)), float(np.median(explained))
    return {"plain_ms": round(1000 * p, 2), "explained_ms": round(1000 * e, 2), "ratio": round(e / p, 2)}
