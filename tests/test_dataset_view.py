"""The dataset view: 10,000 predicted rows open, filter and page quickly; filters select what they say."""

import json
import time

import numpy as np
import pytest

from fusion.dataset_view import PAGE_SIZE, DatasetView


def generated_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows as `fusion.predict --explain` writes them, with labels, some wrong, some disagreeing, 64-d embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (10, 64))
    subsets = [["image"], ["text"], ["audio"], ["image", "text"], ["image", "text", "audio"]]
    rows = []
    for line in range(1, count + 1):
        label = int(rng.integers(10))
        wrong = rng.random() < 0.05
        prediction = (label + 1) % 10 if wrong else label
        modalities = subsets[line % len(subsets)]
        vector = centres[label] + 0.3 * rng.normal(0, 1, 64)
        vector /= np.linalg.norm(vector)
        disagree = len(modalities) > 1 and rng.random() < 0.1
        rows.append({"line": line, "input": {m: f"item{line}.{m}" for m in modalities}, "label": str(label),
                     "prediction": str(prediction), "confidence": float(rng.uniform(0.5, 1)), "correct": not wrong,
                     "modalities": modalities, "embeddings": {m: vector.round(5).tolist() for m in modalities},
                     "shares": {m: 1 / len(modalities) for m in modalities},
                     "agreement": {"agree": not disagree, "disagreeing": modalities[:1] if disagree else []}})
    return rows


def test_ten_thousand_rows_open_in_five_seconds_and_filter_in_one(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in generated_rows(10_000)) + "\n")
    started = time.perf_counter()
    view = DatasetView.load(path)
    first = view.page(view.filter(), 0)
    picture = view.map_image()
    opened = time.perf_counter() - started
    assert len(view) == 10_000 and len(first) == PAGE_SIZE and picture.ndim == 3
    started = time.perf_counter()
    errors = view.filter(errors=True, label="3", subset="image+text")
    view.page(errors, 0)
    view.map_image(errors)
    filtered = time.perf_counter() - started
    assert opened <= 5.0, opened
    assert filtered <= 1.0, filtered
    rows = [view.rows[i] for i in errors]
    assert rows and all(not r["correct"] and r["label"] == "3" and r["modalities"] == ["image", "text"] for r in rows)
    disagreeing = view.filter(disagreements=True)
    assert all(not view.rows[i]["agreement"]["agree"] for i in disagreeing) and len(disagreeing) > 0
    assert view.pages(view.filter()) == 200 and view.page(view.filter(), 199)[-1][0] == 10_000
    assert view.item(0) == {"text": "item1.text"}


def test_the_projection_separates_labels():
    view = DatasetView(generated_rows(500))
    points = view.projection()
    assert points.shape == (500, 2) and not np.isnan(points).any()
    labels = view.labels.astype(int)
    centres = np.stack([points[labels == k].mean(axis=0) for k in range(10)])
    spread = np.mean([points[labels == k].std(axis=0).mean() for k in range(10)])
    assert np.linalg.norm(centres - centres.mean(axis=0), axis=1).mean() > spread


def test_files_that_are_not_predictions_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "1", "confidence": 0.9, "modalities": ["text"]}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        DatasetView.load(bad)
    bad.write_text('{"label": "1"}\n')
    with pytest.raises(ValueError, match="not a row of python -m fusion.predict"):
        DatasetView.load(bad)
    row = generated_rows(1)[0]
    row.pop("input")
    with pytest.raises(ValueError, match="no inputs to explain"):
        DatasetView([row]).item(0)
