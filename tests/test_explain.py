import io

import numpy as np
import pytest
import torch
from PIL import Image

from fusion import FusionPipeline
from fusion.explain import (
    attention_matrix,
    chefer_relevance,
    rollout,
    shapley_values,
    text_pieces,
)
from fusion.render import colorize, overlay, png_bytes


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")


@pytest.fixture()
def inputs(tone):
    image = np.full((60, 44), 255, dtype=np.uint8)  # dark ink on white paper, taller than wide
    image[10:50, 20:25] = 0
    return {"image": image, "text": "Die Zahl ist  sieben, 七!", "audio": tone}


@pytest.mark.parametrize("method", ["relevance", "rollout", "attention"])
def test_every_field_has_its_shape_and_range(pipe, inputs, method):
    pred = pipe(**inputs, explain=True, method=method)
    assert pred.method == method and pred.target == pred.label
    assert pred.image_heatmap.shape == (60, 44)
    assert pred.image_heatmap.min() >= 0 and pred.image_heatmap.max() == pytest.approx(1.0)
    assert pred.audio_heatmap.shape == pred.audio_spectrogram.shape == (32, 100)
    assert 0 <= pred.audio_heatmap.min() and pred.audio_heatmap.max() <= 1
    assert pred.audio_times.shape == (100,) and np.all(np.diff(pred.audio_times) > 0)
    assert "".join(piece for piece, _ in pred.text_heatmap) == inputs["text"]
    assert all(0 <= score <= 1 for _, score in pred.text_heatmap)
    assert [p for p, _ in pred.text_heatmap if p.strip()] == ["Die", "Zahl", "ist", "sieben,", "七", "!"]
    assert set(pred.modality_shares) == {"image", "text", "audio"}
    assert sum(pred.modality_shares.values()) == pytest.approx(1.0)
    assert pred.attention_matrix.shape == (2, 4, 4, 4)
    assert pred.attention_matrix_mean.shape == (4, 4)
    np.testing.assert_allclose(pred.attention_matrix.sum(axis=-1)[:, :, 0], 1.0, rtol=1e-4)  # summary row
    assert len(pred.attentions) == 2 and pred.attentions[0].shape[0] == 4
    assert pred.timings["explain"] > 0


def test_image_heatmap_lies_on_the_ink(pipe, inputs):
    heat = pipe(image=inputs["image"], explain=True).image_heatmap
    ink = inputs["image"] < 128
    assert heat[~ink].max() <= heat[ink].max()
    assert heat[ink].mean() > heat[~ink].mean()


def test_counterfactuals_equal_separate_calls(pipe, inputs):
    pred = pipe(**inputs, explain=True)
    assert set(pred.counterfactuals) == {"image", "audio", "text", "image+audio", "image+text", "audio+text", "image+audio+text"}
    for key, (label, confidence) in pred.counterfactuals.items():
        alone = pipe(**{m: inputs[m] for m in key.split("+")})
        assert alone.label == label and alone.confidence == pytest.approx(confidence, abs=1e-5), key
    full = pred.counterfactuals["image+audio+text"]
    assert full == (pred.label, pytest.approx(pred.confidence, abs=1e-5))
    # efficiency: Shapley values add up to v(all) - v(empty)
    assert sum(pred.shapley.values()) == pytest.approx(pred.confidence - 1 / 10, abs=1e-5)
    singles = {m: pred.counterfactuals[m][0] for m in ("image", "audio", "text")}
    assert pred.agreement["labels"] == singles
    assert pred.agreement["agree"] == (len(set(singles.values())) == 1)


def test_single_modality_explanation(pipe, inputs):
    pred = pipe(text=inputs["text"], explain=True)
    assert pred.image_heatmap is None and pred.audio_heatmap is None
    assert pred.modality_shares == {"text": 1.0}
    assert list(pred.counterfactuals) == ["text"]
    assert pred.agreement["agree"]


def test_explaining_another_class_and_bad_target(pipe, inputs):
    assert pipe(**inputs, explain=True, target="3").target == "3"
    with pytest.raises(ValueError, match="target 'x' is not a label"):
        pipe(**inputs, explain=True, target="x")
    with pytest.raises(ValueError, match="method must be one of relevance, rollout, attention"):
        pipe(**inputs, explain=True, method="lime")


def test_without_explain_the_fields_say_how_to_get_them(pipe, inputs):
    with pytest.raises(AttributeError, match="explain=True"):
        pipe(text="one").image_heatmap


def test_int8_explanation_runs_on_cpu(tiny_checkpoint, inputs):
    pipe = FusionPipeline.from_pretrained(tiny_checkpoint, precision="int8", device="cpu")
    pred = pipe(**inputs, explain=True)
    assert pred.method in ("relevance", "rollout")
    assert pred.method == "relevance" or pred.notes  # a fallback always says why
    assert pred.image_heatmap.shape == (60, 44)
    assert sum(pred.modality_shares.values()) == pytest.approx(1.0)


def test_relevance_rules_on_known_matrices():
    attention = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])  # (H=1, 2, 2)
    gradient = torch.ones_like(attention)
    relevance = chefer_relevance([attention], [gradient])
    torch.testing.assert_close(relevance, torch.eye(2) + attention[0])
    negative = chefer_relevance([attention], [-gradient])
    torch.testing.assert_close(negative, torch.eye(2))  # negative evidence is clipped
    rolled = rollout([attention, attention])
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2))


def test_attention_matrix_groups():
    attention = torch.full((1, 4, 4), 0.25)
    spans = {"image": (1, 3), "text": (3, 4)}
    matrix = attention_matrix([attention], spans, torch.tensor([True, True, True, True]))
    np.testing.assert_allclose(matrix[0, 0, 0, :3], [0.25, 0.5, 0.25])
    assert matrix[0, 0, 3].sum() == 0  # no audio tokens


def test_shapley_of_an_additive_game():
    values = {frozenset(["a"]): 0.3, frozenset(["b"]): 0.5, frozenset(["a", "b"]): 0.8}
    assert shapley_values(values, ["a", "b"], empty=0.0) == pytest.approx({"a": 0.3, "b": 0.5})


def test_text_pieces_merge_subwords_and_keep_gaps():
    text = "  three plus  four "
    offsets = [(0, 0), (2, 5), (5, 7), (8, 12), (14, 18), (0, 0)]  # [CLS] thr ##ee plus four [SEP]
    pieces = text_pieces(text, offsets, np.array([9.0, 1.0, 1.0, 0.5, 4.0, 9.0]))
    assert "".join(p for p, _ in pieces) == text
    assert dict((p, s) for p, s in pieces if p.strip()) == pytest.approx({"three": 0.5, "plus": 0.125, "four": 1.0})


def test_overlay_and_colour_maps():
    heat = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    for cmap in ("viridis", "cividis"):
        colours = colorize(heat, cmap=cmap)
        assert colours.shape == (3, 4, 3) and colours.dtype == np.uint8
        assert not np.array_equal(colours[0, 0], colours[-1, -1])
    base = np.zeros((3, 4), dtype=np.uint8)
    blended = overlay(base, heat, alpha=0.5)
    assert blended.shape == (3, 4, 3) and blended[0, 0].sum() == 0  # zero relevance keeps the image
    with pytest.raises(ValueError, match="does not match"):
        overlay(base, heat[:2])
    with pytest.raises(ValueError, match="viridis or cividis"):
        colorize(heat, cmap="jet")


def test_raw_attention_of_one_layer_and_head(pipe, inputs):
    averaged = pipe(**inputs, explain=True, method="attention").modality_shares
    one = pipe(**inputs, explain=True, method="attention", layer=1, head=2).modality_shares
    assert sum(one.values()) == pytest.approx(1.0)
    assert one != pytest.approx(averaged)
    with pytest.raises(ValueError, match=r"layer must be in 0..1, got 5"):
        pipe(**inputs, explain=True, method="attention", layer=5)


def test_relevance_falls_back_to_rollout_when_gradients_fail(pipe, inputs, monkeypatch):
    def no_backward(*args, **kwargs):
        raise RuntimeError("no backward for this kernel")

    monkeypatch.setattr(torch.autograd, "grad", no_backward)
    pred = pipe(**inputs, explain=True)
    assert pred.method == "rollout"
    assert "fell back to rollout" in pred.notes[0] and "no backward for this kernel" in pred.notes[0]
    assert pred.image_heatmap.shape == (60, 44)


def test_present_gathers_what_a_page_shows(pipe, inputs):
    from fusion.render import base_image, present

    pred = pipe(text=inputs["text"], audio=inputs["audio"], explain=True)
    shown = present(pred, None, alpha=0.4, layer=0, head=1)
    assert list(shown.probs) == [label for label, _ in pred.top(len(pred.probs))]
    assert shown.probs[pred.label] == max(shown.probs.values())
    assert [row[0] for row in shown.shares] == ["text", "audio"]
    assert shown.subsets == [[k, label, round(p, 3)] for k, (label, p) in pred.counterfactuals.items()]
    assert shown.pictures["image_overlay.png"] is None  # no image given
    assert shown.pictures["audio_overlay.png"].startswith(b"\x89PNG") and shown.words == pred.text_heatmap
    assert f"from text + audio, explained by {pred.method}" in shown.notice
    with_image = pipe(**inputs, explain=True)
    assert present(with_image, base_image(inputs["image"])).pictures["image_overlay.png"].startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="present needs an explained prediction"):
        present(pipe(text="sieben"), None)


@pytest.mark.parametrize("shape", [(280, 344, 3), (1, 1, 3), (1, 57, 3), (33, 1, 3), (5, 7, 4), (6, 9)])
def test_png_bytes_decode_to_the_same_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    picture = rng.integers(0, 256, shape, dtype=np.uint8)
    picture[: shape[0] // 2] = 255  # flat rows beside noisy ones: the up filter's differences wrap around 0 and 255
    data = png_bytes(picture)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()  # a bad checksum or truncated stream fails here
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and np.array_equal(np.asarray(decoded), picture)
