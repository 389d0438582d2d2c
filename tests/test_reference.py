"""The shipped checkpoint answers and explains the app's examples exactly as it did when the reference was saved
(tests/data/make_reference.py): refactors of the library must not move a probability or a heatmap."""

import numpy as np
import pytest

from fusion import FusionPipeline

from .data.make_reference import ROOT, reference_outputs

REFERENCE = ROOT / "tests" / "data" / "reference_outputs.npz"


@pytest.fixture(scope="module")
def outputs():
    pipe = FusionPipeline.from_pretrained(ROOT / "assets" / "fusion-digits", precision="fp32", device="cpu")
    return reference_outputs(pipe)


def test_the_same_outputs_are_produced(outputs):
    saved = np.load(REFERENCE)
    assert sorted(outputs) == sorted(saved.files)
    for name in saved.files:
        tolerance = 1e-5 if name.endswith("probs") or name.endswith("counterfactuals") else 1e-4
        assert outputs[name].shape == saved[name].shape, name
        assert np.abs(outputs[name] - saved[name]).max(initial=0.0) <= tolerance, name


def test_the_reference_covers_every_method_and_modality(outputs):
    names = set(outputs)
    for method in ("relevance", "rollout", "attention"):
        for kind in ("image_heatmap", "audio_heatmap", "text_heatmap"):
            assert any(n.endswith(f"{method}/{kind}") for n in names), (method, kind)
