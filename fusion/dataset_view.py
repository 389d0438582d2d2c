"""A whole dataset's predictions to inspect: a table to filter and page through, and a 2-D map of the embeddings.

Rows are what `python -m fusion.predict --explain` writes (one JSON object per item); `DatasetView.load` reads such
a file, and `DatasetView.predict` makes the rows from a manifest or a folder in the evaluate layout. Columns are
kept as numpy arrays, so filtering 10,000 rows is a few vectorised comparisons, and a page is built only for the
rows shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .modalities import MODALITIES, NAME_ORDER, subset_key

if TYPE_CHECKING:
    from .pipeline import FusionPipeline

PAGE_SIZE = 50
COLUMNS = ["line", "label", "prediction", "confidence", "correct", "modalities", "shares", "disagreeing", "input"]
# Ten distinguishable colours for labels (Okabe-Ito's eight and two more), cycled beyond ten labels.
PALETTE = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0), (120, 120, 120), (148, 103, 189)]


@dataclass
class DatasetView:
    """Predicted rows and their columns: `labels`, `predictions`, `confidence`, `correct` (None: no label),
    `subsets` (like `image+text`), `disagree` (the modalities alone disagree), `vectors` (one unit vector per row:
    the mean of its modalities' embeddings, or none)."""

    rows: list[dict[str, Any]]
    labels: np.ndarray = field(init=False)
    predictions: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)  # 1 right, 0 wrong, -1 unlabelled
    subsets: np.ndarray = field(init=False)
    disagree: np.ndarray = field(init=False)
    _projection: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        rows = self.rows
        self.labels = np.array([r.get("label") or "" for r in rows], dtype=object)
        self.predictions = np.array([r["prediction"] for r in rows], dtype=object)
        self.confidence = np.array([r["confidence"] for r in rows], dtype=np.float32)
        self.correct = np.array([-1 if r.get("correct") is None else int(r["correct"]) for r in rows], dtype=np.int8)
        self.subsets = np.array([subset_key(r["modalities"]) for r in rows], dtype=object)
        self.disagree = np.array([not (r.get("agreement") or {}).get("agree", True) for r in rows], dtype=bool)

    @classmethod
    def load(cls, path: str | Path) -> DatasetView:
        """Rows from a `fusion.predict` JSONL file; a `ValueError` names the first line that is not such a row."""
        rows = []
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict) or not {"prediction", "confidence", "modalities"} <= set(row):
                raise ValueError(f"{path}:{number}: not a row of python -m fusion.predict (prediction, confidence, modalities)")
            rows.append(row)
        if not rows:
            raise ValueError(f"{path} has no rows")
        return cls(rows)

    @classmethod
    def predict(cls, pipeline: FusionPipeline, source: str | Path, *, batch_size: int = 64) -> DatasetView:
        """Rows for a manifest (CSV/JSONL) or a folder in the evaluate layout (mnist/, fsdd/, text.tsv), explained
        (shares, agreement) and embedded; a folder's items are single-modality."""
        from .data.sources import folder_items
        from .predict import predict_rows, read_rows

        source = Path(source)
        if source.is_dir():
            rows = folder_items(source)
        else:
            rows, _ = read_rows(source)
        results, _ = predict_rows(pipeline, rows, explain=True, batch_size=batch_size, progress=False)
        if not results:
            raise ValueError(f"{source}: no item could be predicted")
        return cls(results)

    def __len__(self) -> int:
        return len(self.rows)

    def filter(self, *, errors: bool = False, disagreements: bool = False, label: str | None = None,
               subset: str | None = None) -> np.ndarray:
        """Indices of the rows that are wrong (`errors`), whose modalities disagree, whose true label (or, for
        unlabelled rows, prediction) is `label`, and whose modalities are exactly `subset`."""
        keep = np.ones(len(self.rows), dtype=bool)
        if errors:
            keep &= self.correct == 0
        if disagreements:
            keep &= self.disagree
        if label:
            keep &= np.where(self.correct >= 0, self.labels == label, self.predictions == label)
        if subset:
            keep &= self.subsets == subset
        return np.nonzero(keep)[0]

    def page(self, indices: np.ndarray, number: int = 0, size: int = PAGE_SIZE) -> list[list]:
        """Table rows (`COLUMNS`) of page `number` (0-based) of `indices`."""
        chosen = indices[number * size : (number + 1) * size]
        table = []
        for index in chosen.tolist():
            row = self.rows[index]
            shares = row.get("shares") or {}
            table.append([row.get("line", index + 1), row.get("label"), row["prediction"], round(float(row["confidence"]), 3),
                          None if row.get("correct") is None else bool(row["correct"]), self.subsets[index],
                          ", ".join(f"{m} {v:.2f}" for m, v in shares.items()),
                          ", ".join((row.get("agreement") or {}).get("disagreeing") or []),
                          describe(row["input"]) if isinstance(row.get("input"), dict) else ""])
        return table

    def pages(self, indices: np.ndarray, size: int = PAGE_SIZE) -> int:
        return max(1, -(-len(indices) // size))

    def projection(self) -> np.ndarray:
        """(N, 2): the rows' vectors projected on their first two principal components (NaN without vectors)."""
        if self._projection is None:
            found = [_row_vector(r) for r in self.rows]
            width = next((len(v) for v in found if v is not None), 0)
            points = np.full((len(self.rows), 2), np.nan, dtype=np.float32)
            if width:
                vectors = np.stack([v if v is not None else np.full(width, np.nan, np.float32) for v in found])
                have = ~np.isnan(vectors).any(axis=1)
                if have.sum() >= 2:
                    centred = vectors[have] - vectors[have].mean(axis=0)
                    _, _, axes = np.linalg.svd(centred, full_matrices=False)
                    points[have] = centred @ axes[:2].T
            self._projection = points
        return self._projection

    def map_image(self, indices: np.ndarray | None = None, *, size: int = 480) -> np.ndarray:
        """The projection as a picture: one dot per row coloured by its label (its prediction when unlabelled),
        wrong answers ringed in red; `indices` draws only those (a filter). (size, size + legend, 3) uint8."""
        points = self.projection()
        chosen = np.arange(len(self.rows)) if indices is None else np.asarray(indices)
        canvas = Image.new("RGB", (size + 90, size), "white")
        draw = ImageDraw.Draw(canvas)
        valid = chosen[~np.isnan(points[chosen]).any(axis=1)] if len(chosen) else chosen
        names = sorted({str(v) for v in np.where(self.correct >= 0, self.labels, self.predictions)})
        colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
        if len(valid):
            all_points = points[~np.isnan(points).any(axis=1)]
            low, high = all_points.min(axis=0), all_points.max(axis=0)
            scaled = (points[valid] - low) / np.maximum(high - low, 1e-6) * (size - 20) + 10
            shown = np.where(self.correct[valid] >= 0, self.labels[valid], self.predictions[valid])
            for (x, y), name, right in zip(scaled.tolist(), shown, self.correct[valid].tolist()):
                draw.ellipse((x - 2, size - y - 2, x + 2, size - y + 2), fill=colour[str(name)])
                if right == 0:
                    draw.ellipse((x - 5, size - y - 5, x + 5, size - y + 5), outline=(220, 0, 0), width=1)
        for i, name in enumerate(names):
            draw.rectangle((size + 10, 10 + 16 * i, size + 20, 20 + 16 * i), fill=colour[name])
            draw.text((size + 26, 9 + 16 * i), name, fill="black")
        draw.ellipse((size + 10, 14 + 16 * len(names), size + 20, 24 + 16 * len(names)), outline=(220, 0, 0))
        draw.text((size + 26, 13 + 16 * len(names)), "wrong", fill="black")
        return np.asarray(canvas)

    def item(self, index: int) -> dict[str, Any]:
        """The inputs of row `index` as the pipeline takes them (`input`, as fusion.predict writes it)."""
        found = self.rows[index].get("input")
        if not isinstance(found, dict) or not any(found.get(m) is not None for m in MODALITIES):
            raise ValueError(f"row {index + 1} has no inputs to explain")
        return {m: found[m] for m in MODALITIES if found.get(m) is not None}


def _row_vector(row: dict[str, Any]) -> np.ndarray | None:
    embeddings = row.get("embeddings") or {}
    if not embeddings:
        return None
    mean = np.mean([np.asarray(v, dtype=np.float32) for v in embeddings.values()], axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-8)


def describe(item: dict[str, Any]) -> str:
    """A short text for a table cell: file names and the phrase."""
    parts = []
    for modality in NAME_ORDER:
        value = item.get(modality)
        if value is None:
            continue
        if modality == "text":
            parts.append(f"“{value}”")
        elif isinstance(value, (str, Path)):
            parts.append(Path(value).name)
        else:
            parts.append(f"{modality} array")
    return " + ".join(parts)
