"""The shared embedding space: embeddings of any modality, their cosine similarity, and galleries to search.

Each modality's embedding is the model's answer from that modality alone (the summary state of the fusion layers
over the summary token and that modality's tokens) through the checkpoint's embedding head, normalised: inputs of
different modalities that mean the same thing lie close together. A gallery keeps the embeddings of many items
per modality and answers nearest-neighbour queries by cosine, with numpy (or FAISS when it is installed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .feature_extraction import AUDIO_SUFFIXES
from .input_errors import FusionInputError
from .modalities import MODALITIES

if TYPE_CHECKING:
    from .modeling import FusionOutput
    from .pipeline import FusionPipeline, Prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def as_item(value: Any) -> dict[str, Any]:
    """An input as an item dict of one modality: a dict is kept; a path ending like audio or an image, a
    `(rate, samples)` pair, an array or a PIL image is that modality; any other string is text."""
    if isinstance(value, dict):
        given = [m for m in MODALITIES if value.get(m) is not None]
        if len(given) != 1:
            raise FusionInputError(f"an input to compare needs exactly one of {', '.join(MODALITIES)}, got {given or 'none'}")
        return {given[0]: value[given[0]]}
    if isinstance(value, tuple) and len(value) == 2:
        return {"audio": value}
    if isinstance(value, (str, Path)):
        suffix = Path(str(value)).suffix.lower()
        if suffix in AUDIO_SUFFIXES and Path(value).is_file():
            return {"audio": str(value)}
        if suffix in IMAGE_SUFFIXES and Path(value).is_file():
            return {"image": str(value)}
        if isinstance(value, str):
            return {"text": value}
    if isinstance(value, np.ndarray) or hasattr(value, "convert"):
        return {"image": value}
    raise FusionInputError(f"cannot tell which modality {type(value).__name__} is; pass a dict such as {{'audio': ...}}")


def embed_items(pipeline: FusionPipeline, items: list[dict], *, batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """Per item, {modality: unit vector (d,)} for each modality it has."""
    return predict_and_embed(pipeline, items, batch_size=batch_size)[1]


def alone_passes(pipeline: FusionPipeline, items: list[dict], *, batch_size: int = 64) -> Iterator[tuple[int, dict, FusionOutput, dict]]:
    """Per batch of `items`: its first index, the processed batch, the model's output and each modality's summary
    alone (`FusionForClassification.alone_summaries`), computed in inference mode (use them there too)."""
    for start in range(0, len(items), batch_size):
        batch = pipeline.processor(items[start : start + batch_size])
        with torch.inference_mode():
            out = pipeline.model(**pipeline.model_inputs(batch))
            alone = pipeline.model.alone_summaries(out)
        yield start, batch, out, alone


def predict_and_embed(pipeline: FusionPipeline, items: list[dict], *, batch_size: int = 64
                      ) -> tuple[list[Prediction], list[dict[str, np.ndarray]]]:
    """Plain predictions and embeddings of `items` from one forward pass per batch (the embeddings' single-modality
    passes reuse its encoded tokens)."""
    model = pipeline.model
    if model.embedding_head is None:
        raise FusionInputError("this checkpoint has no embedding head (config.embedding_size is None); "
                               "train one with python -m fusion.embedding_head")
    predictions: list[Prediction] = []
    results: list[dict[str, np.ndarray]] = [{} for _ in items]
    started = time.perf_counter()
    for start, batch, out, alone in alone_passes(pipeline, items, batch_size=batch_size):
        for modality, (summary, rows) in alone.items():
            with torch.inference_mode():
                vectors = model.embed(summary).cpu().numpy()
            for row, vector in zip(rows.tolist(), vectors):
                results[start + row][modality] = vector
        assert out.logits is not None
        probs = out.logits.float().softmax(dim=-1).cpu()
        timings = {"forward": time.perf_counter() - started}
        predictions += pipeline._predictions(probs, batch["meta"], timings, out)
        started = time.perf_counter()
    return predictions, results


def supervised_contrastive(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss that trains the shared space: mean over anchors of -log(Σ same-label exp(cos/τ) / Σ all exp(cos/τ)),
    the anchor itself left out of both sums, over (N, d) unit vectors; anchors without another item of their label
    are skipped (0 when none has one)."""
    scores = vectors.float() @ vectors.float().T / temperature
    self_mask = torch.eye(len(vectors), dtype=torch.bool, device=vectors.device)
    scores = scores.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    anchors = positives.any(dim=1)
    if not anchors.any():
        return scores.new_zeros(())
    log_all = torch.logsumexp(scores[anchors], dim=1)
    log_positive = torch.logsumexp(scores[anchors].masked_fill(~positives[anchors], float("-inf")), dim=1)
    return (log_all - log_positive).mean()


@dataclass
class Match:
    """One search result: the gallery item, its modality, label (if the gallery had labels), position, cosine."""

    item: Any
    modality: str
    score: float
    index: int
    label: str | None = None


@dataclass
class Gallery:
    """Embeddings of many items per modality (`vectors[m]`: (n, d) unit rows), the items and their labels."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    items: dict[str, list[Any]] = field(default_factory=dict)
    labels: dict[str, list[str | None]] = field(default_factory=dict)
    _faiss: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    @classmethod
    def of(cls, entries: Iterable[tuple[str, np.ndarray, Any, str | None]]) -> Gallery:
        """A gallery of (modality, unit vector, item, label) entries."""
        gallery, rows = cls(), dict[str, list[np.ndarray]]()
        for modality, vector, item, label in entries:
            rows.setdefault(modality, []).append(np.asarray(vector, dtype=np.float32))
            gallery.items.setdefault(modality, []).append(item)
            gallery.labels.setdefault(modality, []).append(label)
        gallery.vectors = {m: np.stack(v) for m, v in rows.items()}
        return gallery

    def search(self, query: np.ndarray, k: int, modality: str) -> list[Match]:
        """The `k` items of `modality` nearest to the unit vector `query` by cosine, best first."""
        if modality not in self.vectors or not len(self.vectors[modality]):
            raise FusionInputError(f"the gallery has no {modality}; it has {', '.join(self.vectors) or 'nothing'}")
        if k < 1:
            raise FusionInputError(f"k must be at least 1, got {k}")
        vectors = self.vectors[modality]
        k = min(k, len(vectors))
        index = self._faiss_index(modality)
        if index is not None:
            scores, order = index.search(query[None].astype(np.float32), k)
            pairs = list(zip(order[0].tolist(), scores[0].tolist()))
        else:
            scores = vectors @ query
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top], kind="stable")]
            pairs = [(int(i), float(scores[i])) for i in top]
        return [Match(item=self.items[modality][i], modality=modality, score=s, index=i, label=self.labels[modality][i])
                for i, s in pairs]

    def _faiss_index(self, modality: str) -> Any:
        """An exact inner-product FAISS index when faiss is installed (optional), else None."""
        if modality in self._faiss:
            return self._faiss[modality]
        try:
            import faiss
        except ImportError:
            self._faiss[modality] = None
            return None
        vectors = np.ascontiguousarray(self.vectors[modality], dtype=np.float32)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        self._faiss[modality] = index
        return index


def build_gallery(pipeline: FusionPipeline, items: list[Any], labels: list[str | None] | None = None) -> Gallery:
    """A gallery of `items` (each of one or more modalities; a modality of an item is one entry)."""
    if labels is not None and len(labels) != len(items):
        raise FusionInputError(f"{len(labels)} labels for {len(items)} items")
    prepared = [as_item(item) if not isinstance(item, dict) else {m: v for m, v in item.items() if m in MODALITIES and v is not None}
                for item in items]
    embedded = embed_items(pipeline, prepared)
    return Gallery.of((modality, vector, item[modality], None if labels is None else labels[position])
                      for position, (item, vectors) in enumerate(zip(prepared, embedded)) for modality, vector in vectors.items())


def recall_at(queries: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
              ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """R@k: the share of queries with an item of their own label among their k nearest gallery items."""
    scores = queries @ gallery.T  # (Q, G)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    hits = gallery_labels[order] == query_labels[:, None]
    return {f"R@{k}": round(float(hits[:, :k].any(axis=1).mean()), 4) for k in ks}


def pairwise_recall(vectors: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """R@1 and R@5 for every ordered pair of modalities (query → gallery), keys like `image→audio`."""
    return {f"{a}→{b}": recall_at(vectors[a], labels[a], vectors[b], labels[b])
            for a in vectors for b in vectors if a != b}
