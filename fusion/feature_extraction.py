"""`FusionFeatureExtractor`: audio (path, bytes or `(sampling_rate, samples)`) to the log-mel spectrogram the audio
encoder reads: decoded, resampled, trimmed to the speech, fitted to the model's window and levelled."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio
from torchaudio.functional.functional import (  # the filterbank's own mel scale
    _hz_to_mel,
    _mel_to_hz,
)

from .image_processing import stack_grids
from .input_errors import FusionInputError
from .input_errors import describe as _describe
from .input_errors import reason as _reason
from .processor_base import ModalityProcessor

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


@dataclass
class AudioSettings:
    """How a waveform becomes a log-mel spectrogram of fixed length."""

    sampling_rate: int = 8000
    duration: float = 1.0  # seconds the model sees; speech is trimmed to its loudest stretch or padded
    n_fft: int = 256
    hop_length: int = 80
    num_mel_bins: int = 32
    f_min: float = 20.0
    trim_db: float = 35.0  # frames quieter than the peak by more than this are trimmed from the ends
    target_rms: float = 0.05  # loudness every clip is brought to before features
    silence_peak: float = 1e-4  # a clip whose peak is below this is refused as silent
    max_seconds: float = 60.0  # longer clips are refused
    min_rate: int = 1000  # sampling rates accepted, in Hz
    max_rate: int = 768_000
    top_db: float = 50.0  # log-mel values are floored this far below the clip's peak (hides room noise)
    mel_scale: str = "htk"  # mel filterbank: "htk" or "slaney" (Whisper's, as librosa builds it)
    mel_norm: str | None = None  # "slaney": each filter normalised to unit area (Whisper's)
    # "per-clip": decibels floored at top_db below the peak, then zero mean and unit variance per clip.
    # "whisper": log10 floored 8 decades below the peak, then (x + 4) / 4, as Whisper was trained.
    normalization: str = "per-clip"

    def __post_init__(self):
        if self.normalization not in ("per-clip", "whisper"):
            raise FusionInputError(f"audio normalization must be 'per-clip' or 'whisper', got {self.normalization!r}")
        if self.mel_scale not in ("htk", "slaney") or self.mel_norm not in (None, "slaney"):
            raise FusionInputError(f"mel_scale must be 'htk' or 'slaney' and mel_norm None or 'slaney', "
                                   f"got {self.mel_scale!r} and {self.mel_norm!r}")

    @property
    def num_frames(self) -> int:
        return int(round(self.duration * self.sampling_rate)) // self.hop_length


def load_waveform(source: Any, settings: AudioSettings) -> tuple[np.ndarray, int]:
    """Decode a path, bytes or `(sampling_rate, samples)` into mono float32 samples and their rate."""
    if isinstance(source, tuple) and len(source) == 2:
        rate, samples = source
        if isinstance(rate, np.ndarray) and not isinstance(samples, np.ndarray):
            rate, samples = samples, rate  # (samples, rate) as some libraries return it
        samples = np.asarray(samples)
        if not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise FusionInputError(f"audio sampling rate must be a positive integer, got {rate!r}")
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise FusionInputError(f"audio file {str(source)!r} does not exist")
            if path.stat().st_size == 0:
                raise FusionInputError(f"audio file {path.name!r} is empty (0 bytes)")
        if isinstance(source, (bytes, bytearray)) and not source:
            raise FusionInputError("audio data is empty (0 bytes)")
        data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
        try:
            info = soundfile.info(data)
            if info.frames > settings.max_seconds * info.samplerate:
                raise FusionInputError(
                    f"audio is {info.frames / info.samplerate:.1f} s long; at most {settings.max_seconds:g} s are accepted"
                )
            if isinstance(data, io.BytesIO):
                data.seek(0)
            samples, rate = soundfile.read(data, dtype="float32", always_2d=True)
        except FusionInputError:
            raise
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
            raise FusionInputError(f"could not decode the audio ({_reason(error, source)}); accepted: WAV, FLAC, OGG, MP3") from None
    else:
        raise FusionInputError(
            f"audio must be a file path, bytes or (sampling_rate, samples), got {_describe(source)}"
        )
    return _mono_float(samples, rate, settings), int(rate)


def _mono_float(samples: np.ndarray, rate: int, settings: AudioSettings) -> np.ndarray:
    if samples.size == 0:
        raise FusionInputError("audio has no samples")
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2:
        raise FusionInputError(f"audio samples must be (samples,) or (samples, channels), got shape {samples.shape}")
    if samples.shape[0] < samples.shape[1] and samples.shape[0] <= 16:
        samples = samples.T  # (channels, samples) as torchaudio lays it out
    if samples.shape[0] > settings.max_seconds * rate:
        raise FusionInputError(
            f"audio is {samples.shape[0] / rate:.1f} s long; at most {settings.max_seconds:g} s are accepted"
        )
    if samples.dtype.kind in "iu":
        info = np.iinfo(samples.dtype)
        samples = (samples.astype(np.float64) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    elif samples.dtype.kind != "f":
        raise FusionInputError(f"audio samples must be integers or floats, got dtype {samples.dtype}")
    if not np.isfinite(samples).all():
        raise FusionInputError("audio contains NaN or infinite samples")
    return samples.astype(np.float32).mean(axis=1)


def prepare_waveform(samples: np.ndarray, rate: int, settings: AudioSettings) -> tuple[np.ndarray, float]:
    """Resample, trim to the speech, fit to the model's duration and level: returns samples and start time.

    The start time (seconds into the given audio where the model's window begins; negative when padded)
    lets explanations put the spectrogram on the clip's own time axis.
    """
    return fit_window(resample_to(samples, rate, settings), settings)


def resample_to(samples: np.ndarray, rate: int, settings: AudioSettings) -> np.ndarray:
    """Mono samples at `rate` resampled to the model's rate (checked: a supported rate, finite, not silent)."""
    if not settings.min_rate <= rate <= settings.max_rate:
        raise FusionInputError(
            f"audio sampling rate {rate} Hz is outside {settings.min_rate:,}–{settings.max_rate:,} Hz"
        )
    signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if rate != settings.sampling_rate:
        source = rate
        if rate // math.gcd(rate, settings.sampling_rate) > 1000:
            # A ratio like 399,999:8,000 makes torchaudio build a kernel of gigabytes; a rate rounded to
            # 50 Hz keeps it small and shifts pitch by well under 1%.
            source = max(50, round(rate / 50) * 50)
        signal = torchaudio.functional.resample(signal, source, settings.sampling_rate)
    wave = signal.numpy()
    if not np.isfinite(wave).all():
        raise FusionInputError("audio samples are too large to process (they overflow when resampled); is it really audio?")
    return wave


def fit_window(wave: np.ndarray, settings: AudioSettings) -> tuple[np.ndarray, float]:
    """Samples at the model's rate trimmed to the speech, fitted to the model's window and levelled, and the
    window's start in seconds (see `prepare_waveform`)."""
    peak = float(np.abs(wave).max(initial=0.0))
    if peak < settings.silence_peak:
        raise FusionInputError("audio is silent (no sample above 1e-4 of full scale); record again, closer to the microphone")
    if peak > 1.0:
        # Float audio beyond full scale: bring the peak to 1 so that energies cannot overflow (the clip is levelled
        # to `target_rms` below anyway).
        wave = wave / peak
    sr, length = settings.sampling_rate, int(round(settings.duration * settings.sampling_rate))
    # Trim quiet ends, judged on 20 ms frames against the loudest one.
    frame = max(1, sr // 50)
    count = math.ceil(len(wave) / frame)
    padded = np.pad(wave, (0, count * frame - len(wave)))
    energy_db = 10 * np.log10((padded.reshape(count, frame) ** 2).mean(axis=1) + 1e-12)
    active = np.nonzero(energy_db > energy_db.max() - settings.trim_db)[0]
    start, stop = active[0] * frame, min(len(wave), (active[-1] + 1) * frame)
    if stop - start > length:
        # Keep the loudest window of the model's duration.
        power = np.concatenate([[0.0], np.cumsum(wave[start:stop].astype(np.float64) ** 2)])
        window = power[length:] - power[:-length]
        start += int(np.argmax(window))
        stop = start + length
    speech = wave[start:stop]
    left = (length - len(speech)) // 2
    fitted = np.pad(speech, (left, length - len(speech) - left))
    rms = float(np.sqrt((fitted.astype(np.float64) ** 2).mean()))
    fitted = fitted * (settings.target_rms / max(rms, 1e-8))
    return np.clip(fitted, -1.0, 1.0).astype(np.float32), float((start - left) / sr)


def estimate_pitch(wave: np.ndarray, rate: int, *, f_min: float = 60.0, f_max: float = 500.0,
                   threshold: float = 0.2, loud_db: float = 25.0) -> float:
    """The voice's fundamental frequency (Hz): the median over the clip's voiced frames, or 0.0 when none is voiced.

    YIN (de Cheveigné and Kawahara, 2002) on 40 ms frames every 10 ms, vectorised: a frame within `loud_db` of the
    loudest one is voiced where its cumulative-mean-normalised difference dips below `threshold` at a lag between
    1/`f_max` and 1/`f_min`; the first such dip, followed to its minimum, is the period. About 2 ms for a second at
    16 kHz. `FusionForClassification.audio_view` uses it to tell a high voice from a man's (see
    `FusionConfig.audio_views_pitch_above`).
    """
    frame, hop = int(0.04 * rate), max(1, int(0.01 * rate))
    shortest, longest = max(1, int(rate / f_max)), int(rate / f_min)
    width = frame - longest  # samples compared at each lag
    if len(wave) < frame or width < 8:
        return 0.0
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(wave, dtype=np.float64), frame)[::hop]  # (F, frame)
    energy = (frames ** 2).mean(axis=1)
    frames = frames[energy > energy.max() * 10 ** (-loud_db / 10)]
    size = 1 << int(math.ceil(math.log2(frame + width)))
    spectrum = np.fft.rfft(frames, size)
    correlation = np.fft.irfft(np.conj(np.fft.rfft(frames[:, :width], size)) * spectrum, size)[:, : longest + 1]  # (F, L)
    squares = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    shifted = squares[:, width : width + longest + 1] - squares[:, : longest + 1]  # energy of each lagged window
    difference = np.maximum(shifted[:, :1] + shifted - 2 * correlation, 0.0)  # (F, L)
    normalised = np.ones_like(difference)
    lags = np.arange(1, longest + 1)
    normalised[:, 1:] = difference[:, 1:] * lags / np.maximum(np.cumsum(difference[:, 1:], axis=1), 1e-12)
    pitches = []
    for row in normalised:
        dips = np.flatnonzero(row[shortest:] < threshold)
        if not len(dips):
            continue
        lag = int(dips[0]) + shortest
        while lag < longest and row[lag + 1] < row[lag]:
            lag += 1
        pitches.append(rate / lag)
    return float(np.median(pitches)) if pitches else 0.0


def mel_frequencies(settings: AudioSettings) -> list[float]:
    """The centre frequency (Hz) of each mel bin of `settings`' spectrogram, lowest first (the filterbank's
    triangles peak there): what a view that scales frequencies needs (`FusionConfig.audio_views_frequencies`).
    torchaudio's own scale conversions, as `melscale_fbanks` (which `LogMel` builds on) places the triangles."""
    low, high = (_hz_to_mel(f, mel_scale=settings.mel_scale) for f in (settings.f_min, settings.sampling_rate / 2))
    points = torch.linspace(low, high, settings.num_mel_bins + 2, dtype=torch.float64)[1:-1]
    return [round(float(f), 3) for f in _mel_to_hz(points, mel_scale=settings.mel_scale)]


class LogMel:
    """Log-mel spectrogram with the checkpoint's settings, built once per processor."""

    def __init__(self, settings: AudioSettings):
        self.settings = settings
        self.transform = torchaudio.transforms.MelSpectrogram(
            sample_rate=settings.sampling_rate,
            n_fft=settings.n_fft,
            hop_length=settings.hop_length,
            n_mels=settings.num_mel_bins,
            f_min=settings.f_min,
            f_max=settings.sampling_rate / 2,
            power=2.0,
            norm=settings.mel_norm,
            mel_scale=settings.mel_scale,
        )

    def __call__(self, waves: torch.Tensor, *, whole: bool = False) -> torch.Tensor:
        """(B, samples) -> log-mel (B, mel, frames), normalised per clip as `settings.normalization` says: for
        "per-clip", floored at `top_db` below each clip's peak and brought to zero mean and unit variance, so
        microphones and rooms matter less than the words; for "whisper", exactly Whisper's own features. Cut to
        the model's window unless `whole` (a picture of a longer clip)."""
        mel = self.transform(waves)
        mel = mel if whole else mel[..., : self.settings.num_frames]
        if self.settings.normalization == "whisper":
            logs = torch.log10(mel.clamp_min(1e-10))  # (B, mel, frames)
            logs = torch.maximum(logs, logs.amax(dim=(-2, -1), keepdim=True) - 8.0)
            return (logs + 4.0) / 4.0
        decibels = 10 * torch.log10(mel.clamp_min(1e-10))  # (B, mel, frames)
        peak = decibels.amax(dim=(-2, -1), keepdim=True)
        decibels = torch.maximum(decibels, peak - self.settings.top_db)
        mean = decibels.mean(dim=(-2, -1), keepdim=True)
        std = decibels.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
        return (decibels - mean) / std


class FusionFeatureExtractor(ModalityProcessor):
    """Prepares audio for the audio encoder: a normalised log-mel spectrogram (mel, frames) of the model's window.

    Args:
        settings (`AudioSettings`): the checkpoint's audio constants.

    Example:
        ```python
        >>> features, start = FusionFeatureExtractor()("seven.wav")
        >>> features.shape  # (mel, frames)
        torch.Size([32, 100])
        ```
    """

    modality = "audio"
    Settings = AudioSettings

    def __init__(self, settings: AudioSettings | None = None):
        self.settings: AudioSettings = settings or AudioSettings()
        self.log_mel = LogMel(self.settings)

    def __call__(self, source: Any) -> tuple[torch.Tensor, float]:
        """(mel, frames) normalised log-mel, and the start of its window in the given clip (seconds)."""
        samples, rate = load_waveform(source, self.settings)
        wave, start = prepare_waveform(samples, rate, self.settings)
        return self.log_mel(torch.from_numpy(wave)[None])[0], start

    def prepare(self, source: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The spectrogram and the facts an explanation needs: `audio_start` (where the model's window begins) and
        `audio_duration` (the clip's length), in seconds of the clip as given; for a clip longer than the window,
        also `audio_clip_features`, the whole clip's log-mel (mel, frames from 0 s), for pictures of all of it."""
        samples, rate = load_waveform(source, self.settings)
        resampled = resample_to(samples, rate, self.settings)  # once, for the window and the whole clip
        wave, start = fit_window(resampled, self.settings)
        features = self.log_mel(torch.from_numpy(wave)[None])[0]
        facts: dict[str, Any] = {"audio_start": start, "audio_duration": len(samples) / rate,
                                 "audio_pitch": estimate_pitch(wave, self.settings.sampling_rate)}
        if len(resampled) > (self.settings.duration + self.frame_seconds) * self.settings.sampling_rate:
            whole = torch.from_numpy(resampled / max(float(np.abs(resampled).max()), 1e-8))
            facts["audio_clip_features"] = self.log_mel(whole[None], whole=True)[0].numpy()
        return features, facts

    @property
    def frame_seconds(self) -> float:
        """Seconds between spectrogram frames."""
        return self.settings.hop_length / self.settings.sampling_rate

    def stack(self, prepared: list[torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
        """`audio_values` (B, mel, frames), zero where an item has no audio, and `audio_mask` (B,)."""
        return stack_grids(prepared, "audio_values", "audio_mask"), {}

    def stack_facts(self, facts: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        """`audio_pitch` (B,): each clip's voice pitch in Hz as `prepare` measured it (0 where unknown or an item
        has no audio); nothing when no item's pitch is known (spectrograms given as they are)."""
        pitches = [float((f or {}).get("audio_pitch") or 0.0) for f in facts]
        return {"audio_pitch": torch.tensor(pitches)} if any(pitches) else {}
