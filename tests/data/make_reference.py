"""Writes reference_outputs.npz: the shipped checkpoint's fp32 answers and explanations on the app's examples.

Run once from the repository root (`python tests/data/make_reference.py`) when the checkpoint or an explanation
method changes on purpose; tests/test_reference.py checks that refactors leave these numbers unchanged.
"""

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("relevance", "rollout", "attention")


def example_items() -> list[dict]:
    """The app's example rows (assets/examples/examples.tsv) as pipeline items."""
    import app

    return [{"image": image, "text": text, "audio": audio} for image, text, audio in app.example_rows()]


def reference_outputs(pipe) -> dict[str, np.ndarray]:
    """Flat name -> array: probabilities, heatmaps, shares and attention matrices per example and method."""
    out = {}
    for index, item in enumerate(example_items()):
        out[f"{index}/probs"] = np.array(list(pipe(**item).probs.values()))
        for method in METHODS:
            pred = pipe(**item, explain=True, method=method)
            key = f"{index}/{method}"
            out[f"{key}/probs"] = np.array(list(pred.probs.values()))
            for name in ("image_heatmap", "audio_heatmap"):
                if getattr(pred, name) is not None:
                    out[f"{key}/{name}"] = getattr(pred, name).astype(np.float32)
            if pred.text_heatmap is not None:
                out[f"{key}/text_heatmap"] = np.array([score for _, score in pred.text_heatmap])
            out[f"{key}/modality_shares"] = np.array([pred.modality_shares[m] for m in pred.modalities])
            out[f"{key}/attention_matrix"] = pred.attention_matrix.astype(np.float32)
            out[f"{key}/counterfactuals"] = np.array([p for _, p in pred.counterfactuals.values()])
    return out


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(ROOT))
    from fusion import FusionPipeline

    pipe = FusionPipeline.from_pretrained(ROOT / "assets" / "fusion-digits", precision="fp32", device="cpu")
    np.savez_compressed(Path(__file__).with_name("reference_outputs.npz"), **reference_outputs(pipe))
