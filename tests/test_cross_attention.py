"""Token-level attention across modalities (`fusion.cross_attention`) against attention computed by hand from the
fusion layers' own weights, for every pair of modalities, layer, head and direction, in each precision."""

import math

import numpy as np
import pytest
import torch

from fusion import FusionPipeline, render
from fusion.explain import word_spans

TEXT = "the number is seven"


@pytest.fixture(scope="module", params=["fp32", "fp16", "bf16", "int8"])
def explained(request, tiny_checkpoint, sketch_array):
    """An explained three-modality prediction and, per fusion layer, the hidden states that entered it."""
    pipe = FusionPipeline.from_pretrained(tiny_checkpoint, precision=request.param, device="cpu")
    entering: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: entering.append(args[0].detach()))
             for layer in pipe.model.fusion.layers]
    try:
        prediction = pipe(image=sketch_array, text=TEXT, audio=clip(), explain=True)
    finally:
        for hook in hooks:
            hook.remove()
    return pipe, prediction, entering[: len(pipe.model.fusion.layers)]


def clip() -> tuple[int, np.ndarray]:
    """Half a second of a 440 Hz tone in a second of silence."""
    rate = 16000
    samples = np.zeros(rate, dtype=np.float32)
    samples[rate // 4 : 3 * rate // 4] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate)
    return rate, samples


@pytest.fixture(scope="module")
def sketch_array():
    image = np.full((120, 90), 255, dtype=np.uint8)
    image[20:100, 40:52] = 0
    return image


def by_hand(pipe, entering) -> np.ndarray:
    """(L, H, N, N): softmax(q kᵀ / √d) of each fusion layer from its normed input, as the layer defines it."""
    maps = []
    for layer, hidden in zip(pipe.model.fusion.layers, entering):
        attention = layer.attention
        with torch.no_grad():
            normed = layer.attention_norm(hidden)
            batch, length, _ = normed.shape

            def heads(x, attention=attention):
                return x.view(batch, length, attention.num_heads, attention.head_dim).transpose(1, 2)

            query, key = heads(attention.query(normed)).float(), heads(attention.key(normed)).float()
            scores = query @ key.transpose(-1, -2) / math.sqrt(attention.head_dim)
        maps.append(scores.softmax(dim=-1)[0].numpy())
    return np.stack(maps)


def test_cross_attention_equals_attention_computed_by_hand(explained):
    pipe, prediction, entering = explained
    hand = by_hand(pipe, entering)
    tolerance = 2e-3 if pipe.precision == "fp32" else 3e-2
    layout = prediction.explanation.layout
    places = {"image": (45, 60), "audio": 0.5, "text": 3}
    for layer in (None, *range(hand.shape[0])):
        for head in (None, *range(hand.shape[1])):
            chosen = hand if layer is None else hand[layer : layer + 1]
            chosen = (chosen if head is None else chosen[:, head : head + 1]).mean(axis=(0, 1))  # (N, N)
            for modality, at in places.items():
                rows = [layout.spans[modality][0] + t for t in layout.tokens_at(modality, at)]
                for direction in ("from", "to"):
                    result = prediction.cross_attention(modality, at, layer=layer, head=head, direction=direction)
                    for other, (s0, s1) in layout.spans.items():
                        if other == modality:
                            continue
                        block = chosen[rows, s0:s1].mean(axis=0) if direction == "from" else chosen[s0:s1][:, rows].sum(axis=1)
                        assert result.mass[other] == pytest.approx(block.sum(), abs=tolerance)
                        if other == "text":
                            seventh = word_spans(TEXT)[3]
                            tokens = [i for i, (s, e) in enumerate(layout.text_offsets) if e > s and s < seventh[1] and e > seventh[0]]
                            assert dict((p, v) for p, v in result.text if p.strip())["seven"] == pytest.approx(block[tokens].sum(), abs=tolerance)
                        if other in ("audio", "image"):  # each token's cells carry that token's weight
                            assert getattr(result, other).max() == pytest.approx(block.max(), abs=tolerance)
                for rows, columns in (("text", "image"), ("image", "audio"), ("audio", "text")):
                    (r0, r1), (c0, c1) = layout.spans[rows], layout.spans[columns]
                    matrix = prediction.token_attention(rows, columns, layer=layer, head=head)
                    np.testing.assert_allclose(matrix, chosen[r0:r1, c0:c1], atol=tolerance)


def test_places_map_to_the_tokens_under_them(explained):
    _, prediction, _ = explained
    layout = prediction.explanation.layout
    special, rows, columns = layout.grids["image"]
    top_left, bottom_right = layout.tokens_at("image", (0, 0)), layout.tokens_at("image", (89, 119))
    assert top_left[0] < bottom_right[0]
    early, late = layout.tokens_at("audio", 0.05), layout.tokens_at("audio", 0.95)
    assert len(early) == layout.grids["audio"][1] and early[0] < late[0]
    assert layout.tokens_at("text", 0) != layout.tokens_at("text", 3)
    for modality, at, message in (("image", (500, 5), "outside the image"), ("audio", 7.0, "outside the part"),
                                  ("text", 9, "word index"), ("image", "here", "pixel"), ("video", 1, "has no video")):
        with pytest.raises(ValueError, match=message):
            prediction.cross_attention(modality, at)
    with pytest.raises(ValueError, match="layer must be"):
        prediction.cross_attention("text", 0, layer=5)


def test_the_spectrogram_is_cut_to_the_clip(explained):
    """The tone is 1 s; a 0.3 s clip is padded to the model's second, and the padding is cut from the picture's
    frames: the kept times run from 0 s to the clip's end, within a frame."""
    pipe, _, _ = explained
    rate = 16000
    short = (rate, 0.5 * np.sin(2 * np.pi * 220 * np.arange(int(0.3 * rate)) / rate).astype(np.float32))
    explanation = pipe(audio=short, explain=True).explanation
    first, stop = explanation.audio_clip
    times = explanation.audio_times[first:stop]
    frame = times[1] - times[0]
    assert abs(times[0]) <= frame and abs(times[-1] + frame - 0.3) <= frame
    assert render.clip_view(explanation)[0].shape[-1] == stop - first
    # A 3 s recording: the model hears its loudest second; the picture still shows all of it, 0 s to 3 s.
    long = np.zeros(3 * rate, dtype=np.float32)
    long[int(1.8 * rate) : int(2.2 * rate)] = 0.5 * np.sin(2 * np.pi * 220 * np.arange(int(0.4 * rate)) / rate)
    explanation = pipe(audio=(rate, long), explain=True).explanation
    frames = render.clip_view(explanation)[0].shape[-1]
    assert abs(frames * frame - 3.0) <= frame
    picture = render.spectrogram_image(explanation)
    assert picture.shape[1] == min(render.MAX_SPECTROGRAM_WIDTH, picture.shape[1])
    width = picture.shape[1] - render.SCALE_WIDTH
    assert abs(render.spectrogram_x_to_time(explanation, 0)) <= frame
    assert abs(render.spectrogram_x_to_time(explanation, width - 1) - 3.0) <= 2 * frame
    heard = render.spectrogram_x_to_time(explanation, width * 2.0 / 3.0)  # 2 s: inside the window the model heard
    assert pipe_cross(explanation, heard)
    with pytest.raises(ValueError, match="outside the part of the clip the model heard"):
        pipe_cross(explanation, 0.1)


def pipe_cross(explanation, seconds):
    from fusion.cross_attention import cross_attention

    return cross_attention(explanation, "audio", seconds).tokens


def test_trust_compares_top_cells_with_random_ones(explained):
    pipe, prediction, _ = explained
    trust = pipe.trust(prediction)
    assert set(trust) == set(prediction.modalities)
    for figure in trust.values():
        assert set(figure) == {"top", "random", "faithful", "cells"} and figure["cells"] >= 1
    assert prediction.explanation.trust == trust
    with pytest.raises(ValueError, match="fraction"):
        pipe.trust(prediction, fraction=1.5)
    with pytest.raises(ValueError, match="not explained"):
        pipe.trust(pipe(text="seven"))


def test_trust_encodes_each_distinct_clip_once_and_answers_the_same(explained, monkeypatch):
    from fusion.pipeline import _audio_encoded_once, _removed

    pipe, prediction, _ = explained
    inputs = prediction.explanation.inputs
    variants = [inputs, _removed(inputs, "audio", np.arange(5)), _removed(inputs, "image", np.arange(5)),
                _removed(inputs, "text", np.arange(1)), _removed(inputs, "audio", np.arange(5, 10))]
    changed = [None, "audio", "image", "text", "audio"]
    batch = {key: torch.cat([v[key] for v in variants]) for key in inputs}
    encoder = pipe.model.fusion.encoder_of("audio")
    encoded_rows = []
    features = encoder.features
    monkeypatch.setattr(encoder, "features", lambda values, **kw: (encoded_rows.append(len(values)), features(values, **kw))[1])
    with torch.inference_mode():
        once = _audio_encoded_once(pipe.model, batch, changed)
        shared = pipe.model(**once).logits.float()
        assert encoded_rows == [3]  # row 0 and the two rows whose clip changed
        full = pipe.model(**batch).logits.float()
    assert "audio_values" not in once and once["audio_encoder_states"].shape[0] == len(variants)
    close = 1e-4 if pipe.precision == "fp32" else 3e-2  # half precision rounds a batch of 3 and of 5 apart
    torch.testing.assert_close(shared, full, atol=close, rtol=close)


def test_comparison_with_full_precision(explained):
    """fp32 against itself agrees exactly; int8 and bf16 come close (a random tiny model, so only loosely)."""
    pipe, prediction, _ = explained
    result = pipe.compare_precision(prediction)
    assert set(result["maps"]) == set(prediction.modalities) and set(result["probs"]) == set(pipe.labels)
    if pipe.precision == "fp32":
        assert result["largest_difference"] < 1e-5
        assert all(m["rank_correlation"] > 0.999 and m["top_overlap"] == 1.0 for m in result["maps"].values())
    else:
        assert result["largest_difference"] < 0.1
        assert all(m["rank_correlation"] > 0.5 for m in result["maps"].values())
