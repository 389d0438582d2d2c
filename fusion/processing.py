"""`FusionProcessor`: raw images, sketches, waveforms and text to the tensors `FusionModel` reads.

Every preprocessing constant lives in the processor's settings, saved with the checkpoint
(`processor_config.json`), and every unusable input raises `FusionInputError` with what was wrong and
what is accepted.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PROCESSOR_FILE = "processor_config.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class FusionInputError(ValueError):
    """An input the processor cannot use; the message says what arrived and what is accepted."""


@dataclass
class ImageSettings:
    """How an image becomes `pixel_values`; the digits model follows MNIST's own preparation."""

    size: int = 28  # side of the square the model sees
    ink_box: int = 20  # the ink is scaled to fit this box, then centred by mass (MNIST: 20 in 28)
    invert_light_background: bool = True  # model expects light ink on a dark background
    crop_to_ink: bool = True
    ink_threshold: float = 0.25  # fraction of the contrast range above which a pixel is ink
    mean: float = 0.1307
    std: float = 0.3081
    max_pixels: int = 40_000_000  # larger images are refused before decoding fully


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


@dataclass
class TextSettings:
    max_tokens: int = 32  # longer text is truncated to this many tokens ([CLS] and [SEP] included)
    max_characters: int = 2000  # only this many characters are tokenised


@dataclass
class ProcessorSettings:
    image: ImageSettings = field(default_factory=ImageSettings)
    audio: AudioSettings = field(default_factory=AudioSettings)
    text: TextSettings = field(default_factory=TextSettings)

    @classmethod
    def from_dict(cls, data: dict) -> ProcessorSettings:
        def build(kind, values):
            known = {f.name for f in fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise FusionInputError(f"{PROCESSOR_FILE} has unknown {kind.__name__} keys {sorted(unknown)}")
            return kind(**values)

        return cls(
            image=build(ImageSettings, data.get("image", {})),
            audio=build(AudioSettings, data.get("audio", {})),
            text=build(TextSettings, data.get("text", {})),
        )


def build_tokenizer(corpus, *, vocab_size: int = 1000, max_tokens: int = 32) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece tokenizer whose vocabulary is built deterministically from `corpus`.

    The vocabulary holds every character seen (alone and as a `##` continuation), so misspelt or unseen words
    fall apart into known pieces, and then the most frequent whole words (ties by spelling) up to
    `vocab_size`. CJK characters are split one per token. (The `tokenizers` WordPiece trainer breaks ties in
    a different order on every run, which would make training irreproducible.)
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.BertNormalizer(handle_chinese_chars=True, strip_accents=False, lowercase=True)]
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({char for word in counts for char in word})
    vocabulary = SPECIAL_TOKENS + characters + [f"##{char}" for char in characters]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocabulary += words[: max(0, vocab_size - len(vocabulary))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_tokens,
    )


# ----------------------------------------------------------------------------------------------- images


def _describe(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, (str, os.PathLike)) else repr(str(value))


def _reason(error: Exception, source: Any = None) -> str:
    """A decoder's complaint without the memory address of its buffer or the server's folders."""
    text = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>:?", "", str(error))
    if isinstance(source, (str, os.PathLike)):
        text = text.replace(str(source), Path(source).name)
    return text.strip() or type(error).__name__


def open_image(source: Any, settings: ImageSettings | None = None) -> Image.Image:
    """Decode a path, bytes, PIL image, array or Gradio sketch into a PIL image, refusing oversized ones."""
    settings = settings or ImageSettings()
    if isinstance(source, dict):
        return _composite_sketch(source, settings)
    if isinstance(source, np.ndarray):
        return _image_from_array(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
            raise FusionInputError(f"image file {str(source)!r} does not exist")
        if isinstance(source, (bytes, bytearray)) and not source:
            raise FusionInputError("image data is empty (0 bytes)")
        if isinstance(source, (str, os.PathLike)) and Path(source).stat().st_size == 0:
            raise FusionInputError(f"image file {Path(source).name!r} is empty (0 bytes)")
        data = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(data)
                width, height = image.size
                if width * height > settings.max_pixels:
                    raise FusionInputError(
                        f"image is {width}×{height} pixels; at most {settings.max_pixels:,} pixels are accepted"
                    )
                image.load()
        except FusionInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise FusionInputError(f"image refused as a decompression bomb: {error}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise FusionInputError(
                f"could not decode the image ({_reason(error, source)}); accepted: PNG, JPEG, GIF, BMP, WebP, TIFF"
            ) from None
    else:
        raise FusionInputError(
            f"image must be a file path, bytes, PIL image, array or sketch dict, got {_describe(source)}"
        )
    width, height = image.size
    if width < 1 or height < 1:
        raise FusionInputError(f"image has no pixels ({width}×{height})")
    if width * height > settings.max_pixels:
        raise FusionInputError(f"image is {width}×{height} pixels; at most {settings.max_pixels:,} pixels are accepted")
    getattr(image, "seek", lambda _: None)(0)  # animated: the first frame
    return ImageOps.exif_transpose(image)


def _image_from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise FusionInputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    if array.size == 0:
        raise FusionInputError(f"image array is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise FusionInputError("image array contains NaN or infinite values")
    if array.dtype.kind == "f":
        scale = 255.0 if array.max() <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        top = np.iinfo(array.dtype).max if array.dtype.kind in "ui" and array.max() > 255 else 255
        array = np.clip(array.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _composite_sketch(sketch: dict, settings: ImageSettings) -> Image.Image:
    """A Gradio ImageEditor value: the background and every layer, composited onto white."""
    parts = [sketch.get("background"), *(sketch.get("layers") or [])]
    parts = [p for p in parts if p is not None]
    if not parts and sketch.get("composite") is not None:
        parts = [sketch["composite"]]
    if not parts:
        raise FusionInputError("the sketch is empty: draw a digit or upload an image")
    images = [open_image(p, settings).convert("RGBA") for p in parts]
    canvas = Image.new("RGBA", images[0].size, (255, 255, 255, 255))
    for layer in images:
        if layer.size != canvas.size:
            layer = layer.resize(canvas.size)
        canvas = Image.alpha_composite(canvas, layer)
    return canvas


def _to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels in [0, 1] for any mode: transparency is composited onto white, 16-bit is rescaled."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


@dataclass
class ImageGeometry:
    """Where the model's square came from in the image as given, to map heatmaps back onto it."""

    width: int  # of the image as given (after EXIF rotation)
    height: int
    box: tuple[int, int, int, int]  # crop (left, top, right, bottom) in given pixels
    scale: float  # model pixels per given pixel
    offset: tuple[float, float]  # top-left of the scaled crop inside the model's square (x, y)
    inverted: bool


def prepare_image(source: Any, settings: ImageSettings) -> tuple[np.ndarray, ImageGeometry]:
    """Grey, light-on-dark, cropped to the ink and centred by mass: a (size, size) float array in [0, 1]."""
    image = open_image(source, settings)
    grey = _to_grey(image)
    height, width = grey.shape
    # Border brightness tells paper from blackboard; drawings and photos of paper are dark-on-light.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    inverted = bool(settings.invert_light_background and np.median(border) > 0.5)
    if inverted:
        grey = 1.0 - grey
    low, high = float(grey.min()), float(grey.max())
    box = (0, 0, width, height)
    if settings.crop_to_ink and high - low > 1e-3:
        rows, cols = np.nonzero(grey > low + settings.ink_threshold * (high - low))
        box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    crop = grey[box[1] : box[3], box[0] : box[2]]
    scale = settings.ink_box / max(crop.shape)
    new_w, new_h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    small = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.float64) / 255.0
    # Centre of mass at the centre of the square, as MNIST's preparation does.
    total = small.sum()
    if total > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    else:
        cy, cx = (new_h - 1) / 2, (new_w - 1) / 2
    size = settings.size
    off_x = int(round((size - 1) / 2 - cx))
    off_y = int(round((size - 1) / 2 - cy))
    off_x = min(max(off_x, 0), size - new_w)
    off_y = min(max(off_y, 0), size - new_h)
    square = np.zeros((size, size))
    square[off_y : off_y + new_h, off_x : off_x + new_w] = small
    geometry = ImageGeometry(width, height, box, new_w / crop.shape[1], (float(off_x), float(off_y)), inverted)
    return square, geometry


# ------------------------------------------------------------------------------------------------ audio


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

    def __call__(self, waves: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> log-mel (B, mel, frames), normalised per clip as `settings.normalization` says: for
        "per-clip", floored at `top_db` below each clip's peak and brought to zero mean and unit variance, so
        microphones and rooms matter less than the words; for "whisper", exactly Whisper's own features."""
        mel = self.transform(waves)[..., : self.settings.num_frames]
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


# ------------------------------------------------------------------------------------------- processor


class FusionProcessor:
    """Turns any non-empty subset of image, text and audio into `FusionModel` inputs.

    Args:
        tokenizer (`PreTrainedTokenizerFast`): the text tokenizer saved with the checkpoint.
        settings (`ProcessorSettings`): image, audio and text preprocessing constants.

    Example:
        ```python
        >>> processor = FusionProcessor.from_pretrained("assets/fusion-digits")
        >>> batch = processor([{"image": "seven.png", "text": "seven"}, {"audio": (8000, samples)}])
        >>> batch["pixel_values"].shape, batch["image_mask"]
        (torch.Size([2, 1, 28, 28]), tensor([ True, False]))
        ```
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, settings: ProcessorSettings | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or ProcessorSettings()
        self.log_mel = LogMel(self.settings.audio)

    # -- persistence

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FusionProcessor:
        directory = Path(directory)
        for name in (PROCESSOR_FILE, "tokenizer.json"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"checkpoint folder {str(directory)!r} lacks {name}")
        try:
            settings = ProcessorSettings.from_dict(json.loads((directory / PROCESSOR_FILE).read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{directory / PROCESSOR_FILE} is damaged: {error}") from None
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(f"{directory / 'tokenizer.json'} is not a fast tokenizer (got {type(tokenizer).__name__})")
        return cls(tokenizer, settings)

    # -- one modality at a time

    def image_features(self, source: Any) -> tuple[torch.Tensor, ImageGeometry]:
        """(1, size, size) normalised pixels, and where they came from."""
        square, geometry = prepare_image(source, self.settings.image)
        return self.normalize_image(square), geometry

    def audio_features(self, source: Any) -> tuple[torch.Tensor, float]:
        """(mel, frames) normalised log-mel, and the start of its window in the given clip (seconds)."""
        samples, rate = load_waveform(source, self.settings.audio)
        wave, start = prepare_waveform(samples, rate, self.settings.audio)
        return self.log_mel(torch.from_numpy(wave)[None])[0], start

    def clean_text(self, text: Any) -> str:
        if not isinstance(text, str):
            raise FusionInputError(f"text must be a string, got {_describe(text)}")
        if not text.strip():
            raise FusionInputError("text is empty; type a word or phrase, or leave the text out")
        return text[: self.settings.text.max_characters]

    # -- batches

    def __call__(self, items: dict | list[dict] | None = None, **modalities: Any) -> dict[str, Any]:
        """Process one item (`image=`, `text=`, `audio=`) or a list of item dicts into one batch.

        Returns tensors for each modality any item carries (`pixel_values`, `input_ids` and `attention_mask`,
        `audio_values`), a `<modality>_mask` of the items carrying it, and `meta`: per item, the image
        geometry, the audio window start, the text as tokenised and whether it was truncated.
        """
        if items is None:
            items = [modalities]
        elif isinstance(items, dict):
            items = [items]
        elif modalities:
            raise FusionInputError("pass either a list of items or image=/text=/audio=, not both")
        if not isinstance(items, (list, tuple)) or not items:
            raise FusionInputError("expected an item dict or a non-empty list of item dicts")
        meta: list[dict[str, Any]] = []
        features: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise FusionInputError(f"item {index} must be a dict with image/text/audio keys, got {_describe(item)}")
            unknown = set(item) - {"image", "text", "audio"}
            if unknown:
                raise FusionInputError(f"item {index} has unknown keys {sorted(unknown)}; expected image, text, audio")
            given = {k: v for k, v in item.items() if v is not None}
            if not given:
                raise FusionInputError("no input given: provide at least one of an image, a text or an audio clip")
            info: dict[str, Any] = {"modalities": [m for m in ("image", "text", "audio") if m in given]}
            prepared: dict[str, Any] = {}
            if "image" in given:
                prepared["image"], info["image_geometry"] = self.image_features(given["image"])
            if "text" in given:
                prepared["text"] = info["text"] = self.clean_text(given["text"])
            if "audio" in given:
                prepared["audio"], info["audio_start"] = self.audio_features(given["audio"])
            meta.append(info)
            features.append(prepared)
        batch, text_rows = self.stack(features)
        for index, (offsets, truncated) in text_rows.items():
            meta[index]["text_offsets"] = offsets
            meta[index]["text_truncated"] = truncated or len(items[index]["text"]) > len(meta[index]["text"])
        return {**batch, "meta": meta}

    def stack(self, features: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[int, tuple[list, bool]]]:
        """Batch already prepared items (`image` (1, size, size) and `audio` (mel, frames) tensors, `text`
        strings): each modality's tensor has a row per item, zero and masked out where the item lacks it.

        Returns the tensors and, per item with text, its token offsets and whether tokens were cut off.
        """
        size = len(features)
        batch: dict[str, torch.Tensor] = {}
        for modality, key in (("image", "pixel_values"), ("audio", "audio_values")):
            rows = [i for i, f in enumerate(features) if modality in f]
            if rows:
                values = torch.zeros((size, *features[rows[0]][modality].shape))
                mask = torch.zeros(size, dtype=torch.bool)
                for i in rows:
                    values[i], mask[i] = features[i][modality], True
                batch[key], batch[f"{modality}_mask"] = values, mask
        text_rows: dict[int, tuple[list, bool]] = {}
        rows = [i for i, f in enumerate(features) if "text" in f]
        if rows:
            limit = self.settings.text.max_tokens
            texts = [features[i]["text"] for i in rows]
            encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=limit,
                                     return_offsets_mapping=True, return_tensors="pt")
            ids = torch.full((size, encoded["input_ids"].shape[1]), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(ids)
            ids[rows], attention[rows] = encoded["input_ids"], encoded["attention_mask"]
            mask = torch.zeros(size, dtype=torch.bool)
            mask[rows] = True
            batch.update(input_ids=ids, attention_mask=attention, text_mask=mask)
            for row, (index, text) in enumerate(zip(rows, texts)):
                offsets = [tuple(o) for o in encoded["offset_mapping"][row].tolist()]
                # Cut off when the last token kept ends before the text's last non-space character.
                last_end = max((end for _, end in offsets), default=0)
                text_rows[index] = (offsets, last_end < len(text.rstrip()))
        return batch, text_rows

    def normalize_image(self, square: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A prepared (size, size) square in [0, 1] as normalised (1, size, size) pixels."""
        square = torch.as_tensor(square, dtype=torch.float32)
        return ((square - self.settings.image.mean) / self.settings.image.std).reshape(1, *square.shape[-2:])

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of a processed batch, without `meta`, ready for `model(**inputs)`."""
        return {k: v for k, v in batch.items() if k != "meta"}
