"""`FusionPipeline`: load a checkpoint once in the chosen precision, then answer any mix of inputs."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from .cross_attention import CrossAttention, cross_attention, token_attention
from .explain import Explanation, counterfactuals, explain_item
from .modalities import HALF_PRECISIONS, MODALITIES, PRECISIONS, REGISTRY
from .modeling import FusionForClassification, FusionOutput
from .processing import FusionInputError, FusionProcessor
from .retrieval import Gallery, Match, as_item, build_gallery, embed_items

REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")


@dataclass
class Prediction:
    """One answer: the label, every class's probability, and what went in.

    Args:
        label (`str`): the most probable class.
        probs (`dict[str, float]`): probability of every class, summing to 1.
        modalities (`list[str]`): the modalities the answer used.
        meta (`dict`): preprocessing facts (image geometry, audio window start, the voice's pitch `audio_pitch` in
            Hz, text truncation) and, where the model hears clips at several views (`FusionConfig.audio_views`),
            `audio_scale`: the one this clip was heard at.
        timings (`dict[str, float]`): seconds spent per stage.
    """

    label: str
    probs: dict[str, float]
    modalities: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    explanation: Explanation | None = None

    def __getattr__(self, name: str) -> Any:
        # `pred.image_heatmap`, `pred.modality_shares`, ...: the explanation's fields, when explained.
        explanation = self.__dict__.get("explanation")
        if explanation is not None and name in Explanation.__dataclass_fields__:
            return getattr(explanation, name)
        raise AttributeError(f"Prediction has no attribute {name!r}" + ("" if explanation else " (call with explain=True)"))

    @property
    def confidence(self) -> float:
        return self.probs[self.label]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        return sorted(self.probs.items(), key=lambda kv: kv[1], reverse=True)[:k]

    def cross_attention(self, modality: str, at: Any, *, layer: int | None = None, head: int | None = None,
                        direction: str = "from") -> CrossAttention:
        """The fusion attention between the tokens at `at` (a pixel `(x, y)` of the image as given, a time in
        seconds of the clip, or a word index of the text) and every token of the other given modalities, mapped
        onto those inputs; see `fusion.cross_attention`. Read from the explained pass: nothing is recomputed."""
        return cross_attention(self._explained(), modality, at, layer=layer, head=head, direction=direction)

    def token_attention(self, rows: str, columns: str, *, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """(tokens of `rows`, tokens of `columns`) attention between two modalities' tokens."""
        return token_attention(self._explained(), rows, columns, layer=layer, head=head)

    def _explained(self) -> Explanation:
        explanation = self.__dict__.get("explanation")
        if explanation is None:
            raise ValueError("this prediction was not explained; call the pipeline with explain=True")
        return explanation


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder, or a `FileNotFoundError` that names what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} lacks {', '.join(missing)}")
    return path


def resolve_precision(precision: str, device: str | torch.device | None) -> tuple[str, torch.device]:
    """`auto` means 8-bit on a CUDA GPU and fp32 on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if precision == "auto":
        precision = "int8" if device.type == "cuda" else "fp32"
    return precision, device


class _QuietCast(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


def load_model(path: str | Path, *, precision: str = "auto", device: str | torch.device | None = None) -> tuple[FusionForClassification, str, torch.device]:
    """Load `FusionForClassification` from a checkpoint folder in a precision; returns the model, precision and device."""
    path = check_checkpoint(path)
    precision, device = resolve_precision(precision, device)
    if precision == "int8":
        from transformers import BitsAndBytesConfig

        # Norms, the head and the convolutions stay in fp32; bitsandbytes casts inputs of its
        # 8-bit matmuls to fp16 itself, and logs that on every call.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_QuietCast())
        model = FusionForClassification.from_pretrained(
            path,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            use_safetensors=True,
            device_map={"": str(device)} if device.type == "cuda" else {"": "cpu"},
            dtype=torch.float32,
        )
    else:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        model = FusionForClassification.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    return model.eval(), precision, device


class FusionPipeline:
    """Loads a fusion checkpoint once and answers `image=`, `text=`, `audio=` (any non-empty subset).

    Args:
        model (`FusionForClassification`): a loaded model (see `from_pretrained`).
        processor (`FusionProcessor`): its processor.
        precision (`str`): the precision the model was loaded in, for display.
        name (`str`): the checkpoint's name, for display.

    Example:
        ```python
        >>> pipe = FusionPipeline.from_pretrained("assets/fusion-digits", precision="int8")
        >>> pred = pipe(image="seven.png", text="seven", audio="seven.wav")
        >>> pred.label, round(pred.confidence, 2)
        ('7', 0.99)
        ```
    """

    def __init__(self, model: FusionForClassification, processor: FusionProcessor, *, precision: str = "fp32", name: str = "fusion"):
        self.model, self.processor = model, processor
        self.precision, self.name = precision, name
        self.device = next(model.parameters()).device
        self.labels = model.config.class_names
        self.source: Path | None = None  # the checkpoint folder, when loaded from one
        self._full_precision: FusionForClassification | None = None
        self._full_precision_lock = threading.Lock()
        self.gallery: Gallery | None = None  # the last `index`

    @classmethod
    def from_pretrained(cls, path: str | Path, *, precision: str = "auto", device: str | torch.device | None = None) -> FusionPipeline:
        model, precision, _ = load_model(path, precision=precision, device=device)
        pipeline = cls(model, FusionProcessor.from_pretrained(path), precision=precision, name=Path(path).name)
        pipeline.source = Path(path)
        return pipeline

    def embed(self, items: list[dict] | None = None, *, image: Any = None, text: str | None = None,
              audio: Any = None) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """Unit vectors of the shared embedding space, {modality: (d,)}, for each given modality of one item
        (keywords) or of each item of a list; inputs of any modalities that mean the same lie close by cosine."""
        single = items is None
        if single:
            items = [{k: v for k, v in (("image", image), ("text", text), ("audio", audio)) if v is not None}]
        elif not isinstance(items, list) or not items:
            raise FusionInputError("items must be a non-empty list of dicts with image/text/audio keys")
        vectors = embed_items(self, [_drop_empty(item) for item in items])
        return vectors[0] if single else vectors

    def similarity(self, a: Any, b: Any) -> float:
        """Cosine similarity in the shared space of two inputs of any modalities: each a dict of one modality
        (`{"audio": "seven.wav"}`), or a path, `(rate, samples)`, image or text whose modality is plain."""
        first, second = as_item(a), as_item(b)
        (u,), (v,) = (vectors.values() for vectors in embed_items(self, [first, second]))
        return float(np.dot(u, v))

    def index(self, items: list[Any], labels: list[str | None] | None = None) -> Gallery:
        """A gallery of `items` to `search` (kept as this pipeline's gallery, and returned)."""
        if not isinstance(items, list) or not items:
            raise FusionInputError("index needs a non-empty list of items")
        self.gallery = build_gallery(self, items, labels)
        return self.gallery

    def search(self, query: Any, k: int = 5, *, modality: str, gallery: Gallery | None = None) -> list[Match]:
        """The `k` items of `modality` in `gallery` (default: the last `index`) nearest to `query` (any input of one
        modality), best first."""
        gallery = gallery if gallery is not None else self.gallery
        if gallery is None:
            raise FusionInputError("no gallery to search: call pipe.index(items) first")
        (vector,) = embed_items(self, [as_item(query)])[0].values()
        return gallery.search(vector, k, modality)

    def compare_precision(self, prediction: Prediction) -> dict[str, Any]:
        """The explained `prediction` redone with the fp32 weights of the same checkpoint on the CPU (loaded on the
        first call and kept): both probabilities of every class and the largest difference, and per map the rank
        correlation (Spearman) of the two heatmaps and the overlap of their top 10% cells. For an 8-bit model, it
        says how much quantisation changed the answer and its explanation."""
        explanation = prediction._explained()
        if self.source is None:
            raise ValueError("compare_precision needs a pipeline loaded with from_pretrained (it reloads the checkpoint in fp32)")
        with self._full_precision_lock:
            if self._full_precision is None:
                self._full_precision = load_model(self.source, precision="fp32", device="cpu")[0]
        reference = self._full_precision
        inputs = {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in explanation.inputs.items()}
        probs, other, _ = explain_item(reference, inputs, prediction.meta, method=explanation.method,
                                       target=self.labels.index(explanation.target),
                                       frame_seconds=self.processor.feature_extractor.frame_seconds)
        mine = np.array([prediction.probs[label] for label in self.labels])
        result: dict[str, Any] = {
            "precision": self.precision,
            "probs": {label: (round(float(a), 4), round(float(b), 4)) for label, a, b in zip(self.labels, mine, probs.numpy())},
            "largest_difference": round(float(np.abs(mine - probs.numpy()).max()), 4),
            "maps": {},
        }
        for name in explanation.input_heatmaps:
            a, b = explanation.input_heatmaps[name].ravel(), other.input_heatmaps[name].ravel()
            result["maps"][name] = {"rank_correlation": round(_spearman(a, b), 4), "top_overlap": round(_top_overlap(a, b), 4)}
        return result

    @property
    def description(self) -> str:
        """For example `fusion-digits · int8 · cuda:0`."""
        return f"{self.name} · {self.precision} · {self.device}"

    @overload
    def __call__(self, items: None = None, *, image: Any = None, text: str | None = None, audio: Any = None,
                 explain: bool = False, method: str = "relevance", target: str | None = None, layer: int | None = None,
                 head: int | None = None) -> Prediction: ...

    @overload
    def __call__(self, items: list[dict], *, image: Any = None, text: str | None = None, audio: Any = None,
                 explain: bool = False, method: str = "relevance", target: str | None = None, layer: int | None = None,
                 head: int | None = None) -> list[Prediction]: ...

    def __call__(
        self,
        items: list[dict] | None = None,
        *,
        image: Any = None,
        text: str | None = None,
        audio: Any = None,
        explain: bool = False,
        method: str = "relevance",
        target: str | None = None,
        layer: int | None = None,
        head: int | None = None,
    ) -> Prediction | list[Prediction]:
        """Answer one item (keywords) or a list of item dicts as one batch.

        With `explain=True` each prediction also carries an `Explanation` (heatmaps, modality shares,
        counterfactual subsets, Shapley values, attention) by `method` (relevance, rollout, attention), for
        the predicted class or `target`; `layer` and `head` (0-based) pick the raw attention map of the
        `attention` method, which otherwise averages them. Empty text (only whitespace) counts as no text. Raises
        `FusionInputError` for unusable input.
        """
        single = items is None
        if single:
            items = [{"image": image, "text": text, "audio": audio}]
        elif not isinstance(items, list) or not items:
            raise FusionInputError("items must be a non-empty list of dicts with image/text/audio keys")
        items = [_drop_empty(item) for item in items]
        started = time.perf_counter()
        batch = self.processor(items)
        preprocessed = time.perf_counter()
        if not explain:
            out = self.forward(batch)
            assert out.logits is not None  # a classification model always gives them
            probs = out.logits.float().softmax(dim=-1).cpu()
            timings = {"preprocess": preprocessed - started, "forward": time.perf_counter() - preprocessed}
            predictions = self._predictions(probs, batch["meta"], timings, out)
        else:
            # The explanation's own forward pass gives the probabilities: no separate plain pass.
            predictions = []
            for index, info in enumerate(batch["meta"]):
                row, explanation = self.explain(_item_batch(batch, index), method=method, target=target, layer=layer, head=head)
                timings = {"preprocess": preprocessed - started, "explain": explanation.seconds}
                predictions.append(self._prediction(row, info, timings))
                predictions[-1].explanation = explanation
        return predictions[0] if single else predictions

    def explain(self, batch: dict[str, Any], *, method: str = "relevance", target: str | None = None,
                layer: int | None = None, head: int | None = None) -> tuple[torch.Tensor, Explanation]:
        """Probabilities (K,) and explanation of the one item of a processed batch (see `fusion.explain`)."""
        if target is not None and target not in self.labels:
            raise FusionInputError(f"target {target!r} is not a label of this model; labels: {', '.join(self.labels)}")
        started = time.perf_counter()
        config = self.model.config
        if layer is not None and not 0 <= layer < config.num_hidden_layers:
            raise FusionInputError(f"layer must be in 0..{config.num_hidden_layers - 1}, got {layer}")
        if head is not None and not 0 <= head < config.num_attention_heads:
            raise FusionInputError(f"head must be in 0..{config.num_attention_heads - 1}, got {head}")
        info = batch["meta"][0]
        probs, explanation, output = explain_item(
            self.model, self.model_inputs(batch), info, method=method,
            target=None if target is None else self.labels.index(target), layer=layer, head=head,
            frame_seconds=self.processor.feature_extractor.frame_seconds,
        )
        if info.get("text_truncated") or info.get("text_characters_cut"):
            explanation.notes.append(f"the text was truncated to {self.processor.settings.text.max_tokens} tokens")
        if output.audio_scales is not None and "audio" in info["modalities"]:
            info["audio_scale"] = scale = float(output.audio_scales[0])
            if scale != 1.0:
                explanation.notes.append(
                    f"the voice was heard with every frequency × {scale:g} ({'lower' if scale < 1 else 'higher'}): of the "
                    "views the model hears a clip at, that one was surest of the class they agreed on")
        index = self.labels.index(explanation.target)
        explanation.counterfactuals, explanation.shapley, explanation.agreement = counterfactuals(
            self.model, output, info["modalities"], index, explanation.embeddings)
        explanation.seconds = time.perf_counter() - started
        return probs, explanation

    def trust(self, prediction: Prediction, *, fraction: float = 0.1, repeats: int = 3, seed: int = 0) -> dict[str, dict]:
        """How far to trust each map of an explained prediction: the explained class's probability after removing
        the map's top `fraction` of cells (pixels, spectrogram cells, text tokens) versus `repeats` random draws of
        as many, all in one batched pass. Removed pixels and cells take the input's lowest value (blank paper,
        the spectrogram's floor); removed tokens are masked out. Per modality: `top` and `random` (the mean
        probability drop of each), `faithful` (top lowers it more than random; None when every cell is removed, as
        for a one-word text, so the two cannot differ) and `cells` removed. Also kept in
        `prediction.explanation.trust`."""
        explanation = prediction._explained()
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        inputs, rng = explanation.inputs, np.random.default_rng(seed)
        variants, plan = [inputs], []
        changed: list[str | None] = [None]  # the modality each variant changes
        for name, heat in explanation.input_heatmaps.items():
            modality = REGISTRY[name]
            if modality.grid == "sequence":
                layout = explanation.layout
                assert layout is not None
                candidates = np.array([i for i, (s, e) in enumerate(layout.text_offsets) if e > s])
                scores = heat[candidates] if len(candidates) else heat[:0]
            else:
                candidates, scores = np.arange(heat.size), heat.ravel()
            if len(candidates) == 0:
                continue
            count = max(1, int(round(fraction * len(candidates))))
            order = candidates[np.lexsort((rng.random(len(candidates)), -scores))]
            draws = [order[:count]] + [rng.choice(candidates, count, replace=False) for _ in range(repeats)]
            variants += [_removed(inputs, modality.name, cells) for cells in draws]
            changed += [name] * len(draws)
            plan.append((name, count, count < len(candidates)))
        if not plan:
            return {}
        batch = {key: torch.cat([v[key] for v in variants]) for key in inputs}
        with torch.inference_mode():
            heard = _audio_encoded_once(self.model, batch, changed, scale=prediction.meta.get("audio_scale", 1.0))
            logits = self.model(**heard).logits
        assert logits is not None
        probs = logits.float().softmax(dim=-1)[:, self.labels.index(explanation.target)].cpu().numpy()
        result, row = {}, 1
        for name, count, comparable in plan:
            top, random_ = probs[0] - probs[row], probs[0] - probs[row + 1 : row + 1 + repeats].mean()
            result[name] = {"top": round(float(top), 4), "random": round(float(random_), 4),
                            "faithful": bool(top > random_) if comparable else None, "cells": count}
            row += 1 + repeats
        explanation.trust = result
        return result

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A processed batch's tensors on the model's device, floating ones in its dtype when it is half."""
        inputs = {k: v.to(self.device) for k, v in self.processor.model_inputs(batch).items()}
        if self.precision in HALF_PRECISIONS:
            dtype = next(self.model.parameters()).dtype
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        return inputs

    def forward(self, batch: dict[str, Any], *, output_attentions: bool = False) -> FusionOutput:
        with torch.inference_mode():
            return self.model(**self.model_inputs(batch), output_attentions=output_attentions)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits (B, K) of a processed batch, without gradients."""
        logits = self.forward(batch).logits
        assert logits is not None  # a classification model always gives them
        return logits

    def _predictions(self, probs: torch.Tensor, metas: list[dict[str, Any]], timings: dict[str, float],
                     out: FusionOutput) -> list[Prediction]:
        """A batch's predictions from its probabilities (B, K), each with the view its clip was heard at
        (`out.audio_scales`) as `meta["audio_scale"]`."""
        predictions = [self._prediction(row, info, timings) for row, info in zip(probs, metas)]
        for prediction, scale in zip(predictions, [] if out.audio_scales is None else out.audio_scales.tolist()):
            if "audio" in prediction.modalities:
                prediction.meta["audio_scale"] = scale
        return predictions

    def _prediction(self, row: torch.Tensor, info: dict[str, Any], timings: dict[str, float]) -> Prediction:
        probs = {label: float(p) for label, p in zip(self.labels, row.tolist())}
        label = self.labels[int(row.argmax())]
        return Prediction(label=label, probs=probs, modalities=info["modalities"], meta=info, timings=dict(timings))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    unique, inverse = np.unique(values, return_inverse=True)
    return np.bincount(inverse, ranks)[inverse] / np.bincount(inverse)[inverse] if len(unique) < len(values) else ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def _top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.1) -> float:
    """Share of the top `fraction` cells of `a` that are also in the top `fraction` of `b`."""
    count = max(1, int(round(fraction * len(a))))
    return len(set(np.argsort(-a, kind="stable")[:count]) & set(np.argsort(-b, kind="stable")[:count])) / count


def _audio_encoded_once(model: FusionForClassification, batch: dict[str, torch.Tensor],
                        changed: list[str | None], *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """`batch` (rows that are copies of row 0 except in the modality `changed` names) with the audio encoder's
    output in place of the spectrograms, computed once for row 0 and once per row whose audio was changed: of
    `trust`'s 13 rows for three modalities, 5 pass through Whisper instead of 13, the same numbers for about half
    the cost of the check. Audio only: it is the one modality whose encoder output the model takes in place of
    its input (`audio_encoder_states`), and the encoder that costs the most. Every clip is heard at `scale`, the
    view the explained answer heard row 0 at (`FusionConfig.audio_views`): the check tests the maps of that answer,
    and a clip with cells removed choosing a view of its own would mix the two. Unchanged where the item has no
    audio."""
    mask = batch.get("audio_mask")
    if "audio_values" not in batch or (mask is not None and not bool(mask[0])):
        return batch
    own = [0] + [row for row, name in enumerate(changed) if name == "audio"]  # rows with a spectrogram of their own
    slot = {row: index for index, row in enumerate(own)}
    heard = batch["audio_values"][own]
    heard = model.warp_audio(heard, scale)
    features, _ = model.fusion.encoder_of("audio").features(heard)  # (len(own), T, E)
    source = torch.tensor([slot[row] if name == "audio" else 0 for row, name in enumerate(changed)], device=features.device)
    out = {key: value for key, value in batch.items() if key != "audio_values"}
    out["audio_encoder_states"] = features[source]  # (B, T, E)
    return out


def _removed(inputs: dict[str, torch.Tensor], name: str, cells: np.ndarray) -> dict[str, torch.Tensor]:
    """A copy of a batch of one with `cells` of modality `name` removed: grid cells set to the input's lowest value
    (over every channel), sequence tokens masked out."""
    modality = REGISTRY[name]
    out = dict(inputs)
    index = torch.from_numpy(np.asarray(cells, dtype=np.int64)).to(inputs[modality.main_input].device)
    if modality.grid == "sequence":
        mask = inputs[modality.inputs[1]].clone()
        mask[0, index] = 0
        out[modality.inputs[1]] = mask
        return out
    values = inputs[modality.main_input]
    spatial = values.shape[-2] * values.shape[-1]
    flat = values.clone().reshape(-1, spatial)
    flat[:, index] = values.min()
    out[modality.main_input] = flat.reshape(values.shape)
    return out


def _drop_empty(item: Any) -> Any:
    """Blank text means no text (a Gradio text box sends ""); the processor checks everything else."""
    if isinstance(item, dict) and isinstance(item.get("text"), str) and not item["text"].strip():
        return {k: v for k, v in item.items() if k != "text"}
    return item


def _item_batch(batch: dict[str, Any], index: int) -> dict[str, Any]:
    """Row `index` of a processed batch, as a batch of one (text trimmed of padding)."""
    item = {k: v[index : index + 1] for k, v in batch.items() if k != "meta"}
    for modality in (REGISTRY[m] for m in MODALITIES):
        if modality.mask in item and not item[modality.mask].any():
            for key in modality.tensors:
                item.pop(key, None)
        elif len(modality.inputs) > 1 and modality.main_input in item:  # a padded sequence: cut to its length
            sequence, attention = modality.inputs[:2]
            length = max(1, int(item[attention].sum()))
            item[sequence], item[attention] = item[sequence][:, :length], item[attention][:, :length]
    item["meta"] = [batch["meta"][index]]
    return item
