"""Waveform augmentations that make a few voices sound like many: pitch, speaking rate, vocal tract length,
rooms, microphones, background noise and silence around the word.

Each takes and returns mono float32 numpy samples at `rate`; randomness comes from the `random.Random` passed
in, so a clip's variants are the same on every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

RATE_GRID = 100  # Hz: resampling ratios on this grid keep torchaudio's kernels short


def resample_by(wave: np.ndarray, factor: float, rate: int) -> np.ndarray:
    """Play `wave` `factor` times faster (and higher): resampled as if recorded at `factor × rate`."""
    source = max(RATE_GRID, round(rate * factor / RATE_GRID) * RATE_GRID)
    return torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(wave)), source, rate).numpy()


def time_stretch(wave: np.ndarray, length: int, *, n_fft: int = 512) -> np.ndarray:
    """`wave` stretched or squeezed to `length` samples with a phase vocoder (pitch kept)."""
    hop = n_fft // 4
    window = torch.hann_window(n_fft)
    signal = torch.from_numpy(np.ascontiguousarray(wave))
    if len(signal) < n_fft:
        signal = torch.nn.functional.pad(signal, (0, n_fft - len(signal)))
    spectrum = torch.stft(signal, n_fft, hop, window=window, return_complex=True)  # (freq, frames)
    advance = torch.linspace(0, math.pi * hop, spectrum.shape[0])[..., None]
    stretched = torchaudio.functional.phase_vocoder(spectrum, len(signal) / max(length, 1), advance)
    return torch.istft(stretched, n_fft, hop, window=window, length=length).numpy().astype(np.float32)


def pitch_shift(wave: np.ndarray, semitones: float, rate: int) -> np.ndarray:
    """Raise (or lower) the pitch by `semitones`, keeping the duration. (torchaudio's own `pitch_shift` builds a
    resampling kernel for an arbitrary ratio, several seconds a call.)"""
    if abs(semitones) < 1e-3:
        return wave
    return time_stretch(resample_by(wave, 2 ** (semitones / 12), rate), len(wave))


RECORDING_RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000)


def bandwidth(wave: np.ndarray, rate: int, *, leak: float = 1e-3) -> float:
    """Half the lowest common recording rate whose band (plus 3% for the resampler's edge) holds all but `leak` of
    `wave`'s energy: 4000 Hz for an 8 kHz recording resampled to 16 kHz (those measured 1e-4 to 5e-4 above 4.1 kHz),
    `rate / 2` for a clip that fills its band."""
    power = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
    total = float(power.sum())
    if total <= 0:
        return rate / 2
    frequencies = np.fft.rfftfreq(len(wave), 1.0 / rate)
    for recorded in RECORDING_RATES:
        if recorded >= rate:
            break
        if float(power[frequencies > 1.03 * recorded / 2].sum()) < leak * total:
            return recorded / 2
    return rate / 2


def band_limit(wave: np.ndarray, rate: int, band: float) -> np.ndarray:
    """`wave` with everything above `band` Hz removed (a brick wall, as resampling to 2 × `band` would do)."""
    if band >= rate / 2:
        return wave
    spectrum = np.fft.rfft(wave)
    spectrum[np.fft.rfftfreq(len(wave), 1.0 / rate) > band] = 0
    return np.fft.irfft(spectrum, n=len(wave)).astype(np.float32)


def pink(noise: np.ndarray) -> np.ndarray:
    """White `noise` made pink: its power falling as 1/f (towards the low frequencies, as rooms and fans sound)."""
    return np.fft.irfft(np.fft.rfft(noise) / np.sqrt(np.arange(1, len(noise) // 2 + 2)), n=len(noise))


def add_noise(wave: np.ndarray, snr_db: float, rng: random.Random, *, colour: str = "white") -> np.ndarray:
    """Gaussian noise at `snr_db` below the clip's power, white or `pink`."""
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, len(wave))
    if colour == "pink":
        noise = pink(noise)
    power = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-10
    noise *= math.sqrt(power / 10 ** (snr_db / 10) / (float(np.mean(noise**2)) + 1e-12))
    return (wave + noise).astype(np.float32)


def reverberate(wave: np.ndarray, seconds: float, rng: random.Random, rate: int) -> np.ndarray:
    """Convolve with a synthetic room: exponentially decaying noise reaching -60 dB after `seconds` (RT60)."""
    length = max(1, int(seconds * rate))
    decay = np.exp(-6.9 * np.arange(length) / length)
    response = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, length) * decay
    response[0] = 1.0 / 0.3  # the direct sound dominates
    wet = np.convolve(wave, response)[: len(wave)]
    return (wet * (np.abs(wave).max() / (np.abs(wet).max() + 1e-9))).astype(np.float32)


def microphone(wave: np.ndarray, rng: random.Random, rate: int) -> np.ndarray:
    """A cheap or distant microphone: a high-pass at 100-400 Hz and a low-pass at 2.5-7 kHz (below Nyquist)."""
    signal = torch.from_numpy(np.ascontiguousarray(wave))
    signal = torchaudio.functional.highpass_biquad(signal, rate, rng.uniform(100, 400))
    signal = torchaudio.functional.lowpass_biquad(signal, rate, min(rng.uniform(2500, 7000), 0.45 * rate))
    return signal.numpy().astype(np.float32)


def surround(wave: np.ndarray, rng: random.Random, rate: int, *, snr_db: float) -> np.ndarray:
    """Up to a second of silence on each side, all under background noise: a microphone recording."""
    before, after = int(rng.uniform(0, 1.0) * rate), int(rng.uniform(0, 1.0) * rate)
    padded = np.concatenate([np.zeros(before, np.float32), wave, np.zeros(after, np.float32)])
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, len(padded))
    power = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-10
    return (padded + noise * math.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)


@dataclass
class VoiceAugment:
    """Probabilities and ranges of each waveform augmentation (0 disables one)."""

    pitch: float = 0.6
    pitch_range: tuple[float, float] = (-4.0, 8.0)  # semitones; up-shifts stand in for women's and children's voices
    speed: float = 0.5
    speed_range: tuple[float, float] = (0.85, 1.2)
    reverb: float = 0.25
    mic: float = 0.3
    noise: float = 0.5
    snr_range: tuple[float, float] = (5.0, 30.0)
    surround: float = 0.25
    mel_warp: float = 0.5  # vocal tract length: applied to the spectrogram (`fusion.data.examples.warp_mel`)
    mel_warp_range: tuple[float, float] = (0.88, 1.2)
    # True: the variant keeps the clip's bandwidth, as the same changes made at the rate it was recorded at would: an
    # 8 kHz recording raised in pitch stays below 4 kHz instead of gaining content up to 6 kHz, which it never had.
    # "voice": only the voice's changes (speed, pitch) keep it; the room, microphone and noise come after, over the
    # whole band, as they would where a person speaks into a microphone. Off in the shipped recipe: with True, 6
    # variants, pitch -3..+9 in 80% and Whisper's top layer tuned, validation heard high voices better but fused
    # audio+text worse (model card, "Tried, not kept").
    keep_band: bool | str = False

    def __post_init__(self):
        if self.keep_band not in (False, True, "voice"):
            raise ValueError(f"VoiceAugment.keep_band must be False, True or 'voice', got {self.keep_band!r}")

    def waveform(self, wave: np.ndarray, rng: random.Random, rate: int) -> np.ndarray:
        """One augmented variant of `wave`."""
        band = bandwidth(wave, rate) if self.keep_band else rate / 2
        wave = self._voice(wave, rng, rate)
        if self.keep_band == "voice":
            return self._surroundings(band_limit(wave, rate, band), rng, rate)
        wave = self._surroundings(wave, rng, rate)
        return band_limit(wave, rate, band) if self.keep_band else wave

    def _voice(self, wave: np.ndarray, rng: random.Random, rate: int) -> np.ndarray:
        if rng.random() < self.speed:
            wave = resample_by(wave, rng.uniform(*self.speed_range), rate)
        if rng.random() < self.pitch:
            wave = pitch_shift(wave, rng.uniform(*self.pitch_range), rate)
        return wave

    def _surroundings(self, wave: np.ndarray, rng: random.Random, rate: int) -> np.ndarray:
        if rng.random() < self.reverb:
            wave = reverberate(wave, rng.uniform(0.1, 0.5), rng, rate)
        if rng.random() < self.mic:
            wave = microphone(wave, rng, rate)
        if rng.random() < self.surround:
            wave = surround(wave, rng, rate, snr_db=rng.uniform(10, 35))
        elif rng.random() < self.noise:
            wave = add_noise(wave, rng.uniform(*self.snr_range), rng, colour=rng.choice(("white", "pink")))
        return wave
