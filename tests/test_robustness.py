"""Bad input of every kind gets a valid answer or the library's input error with a specific message."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusion import FusionInputError, FusionPipeline


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")


def answer_or_input_error(pipe, **item):
    """The only two acceptable outcomes; returns the prediction or the error message."""
    try:
        prediction = pipe(**item)
    except FusionInputError as error:
        assert str(error), "an input error must say what was wrong"
        return str(error)
    assert abs(sum(prediction.probs.values()) - 1) < 1e-4
    return prediction


def png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`×`height`: what a decompression bomb looks like before decoding."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = 8 + 8  # signature, then length and type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype=subtype, format="WAV")
    return buffer.getvalue()


def gif_animated() -> bytes:
    frames = [Image.new("L", (20, 20), 0), Image.new("L", (20, 20), 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


IMAGES = {
    "zero bytes": (b"", "image data is empty"),
    "random bytes": (bytes(range(256)) * 4, "could not decode the image"),
    "truncated": (png(Image.new("L", (64, 64), 128))[:40], "could not decode the image"),
    "1x1": (png(Image.new("L", (1, 1), 0)), None),
    "20000x20000": (png_claiming_size(20000, 20000), "decompression bomb|at most 40,000,000 pixels"),
    "10000x5000": (png_claiming_size(10000, 5000), r"image is 10000×5000 pixels; at most 40,000,000"),
    "decompression bomb": (png_claiming_size(100000, 100000), "decompression bomb|at most 40,000,000 pixels"),
    "animated": (gif_animated(), None),
    "16-bit": (png(Image.fromarray((np.arange(400).reshape(20, 20) * 100).astype(np.uint16))), None),
    "CMYK": (png(Image.new("CMYK", (30, 30), (0, 0, 0, 255)), format="JPEG"), None),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_image_table(pipe, name):
    data, message = IMAGES[name]
    outcome = answer_or_input_error(pipe, image=data)
    if message is None:
        assert not isinstance(outcome, str), outcome
    else:
        assert isinstance(outcome, str) and re.search(message, outcome), outcome


def test_exif_rotated_photo(pipe):
    exif = Image.Exif()
    exif[0x0112] = 6
    assert not isinstance(answer_or_input_error(pipe, image=png(Image.new("L", (40, 20), 255), exif=exif)), str)


RATE = 8000
t = np.arange(RATE) / RATE
SPEECHLIKE = (0.3 * np.sin(2 * np.pi * 300 * t) * (t > 0.3) * (t < 0.7)).astype(np.float32)
AUDIO = {
    "random bytes": (bytes(range(256)) * 8, "could not decode the audio"),
    "zero samples": ((RATE, np.zeros(0, dtype=np.float32)), "audio has no samples"),
    "one hour": (lambda: (RATE, np.zeros(RATE * 3600, dtype=np.int16)), r"3600.0 s long; at most 60 s"),
    "8 channels": ((RATE, np.tile(SPEECHLIKE[:, None], (1, 8))), None),
    "192 kHz": ((192000, np.repeat(SPEECHLIKE, 24)), None),
    "NaN": ((RATE, np.where(t > 0.5, np.nan, SPEECHLIKE).astype(np.float32)), "NaN or infinite"),
    "Inf": ((RATE, np.where(t > 0.5, np.inf, SPEECHLIKE).astype(np.float32)), "NaN or infinite"),
    "silence": ((RATE, np.zeros(RATE, dtype=np.float32)), "audio is silent"),
    "clipped": ((RATE, np.clip(SPEECHLIKE * 100, -1, 1)), None),
    "far beyond full scale": ((RATE, SPEECHLIKE * 3e37), None),  # squares overflow float32 unless scaled first
    "one huge sample at 1 kHz": ((1000, np.array([9.2e18], dtype=np.float32)), None),  # found by hypothesis
    "wav file of one hour": (lambda: wav(np.zeros(RATE * 3600, dtype=np.int16), RATE), r"at most 60 s"),
}


@pytest.mark.parametrize("name", list(AUDIO))
def test_audio_table(pipe, name):
    data, message = AUDIO[name]
    data = data() if callable(data) else data  # the hour-long inputs are built only when their test runs
    outcome = answer_or_input_error(pipe, audio=data)
    if message is None:
        assert not isinstance(outcome, str), outcome
    else:
        assert isinstance(outcome, str) and re.search(message, outcome), outcome


@pytest.mark.parametrize("text", ["x" * 100_000, "seven\x00\x07\x1b[31m", "😀 7️⃣ 🔢", "العدد سبعة", "מספר שבע", "七" * 5000])
def test_text_table(pipe, text):
    prediction = answer_or_input_error(pipe, text=text)
    assert not isinstance(prediction, str), prediction


def test_all_empty(pipe):
    assert "no input given" in answer_or_input_error(pipe, image=None, text="", audio=None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000))
def test_any_bytes_as_an_image_or_a_clip(pipe, data):
    answer_or_input_error(pipe, image=data)
    answer_or_input_error(pipe, audio=data)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_text(pipe, text):
    answer_or_input_error(pipe, text=text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rate=st.integers(min_value=1, max_value=400_000),
    samples=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=2000),
    channels=st.integers(min_value=1, max_value=3),
)
def test_any_waveform(pipe, rate, samples, channels):
    array = np.asarray(samples, dtype=np.float32)
    array = np.repeat(array[:, None], channels, axis=1) if channels > 1 else array
    answer_or_input_error(pipe, audio=(rate, array))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(1, 300), width=st.integers(1, 300), seed=st.integers(0, 2**16), channels=st.sampled_from([1, 3, 4]))
def test_any_array_image(pipe, height, width, seed, channels):
    shape = (height, width) if channels == 1 else (height, width, channels)
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    answer_or_input_error(pipe, image=array)


@pytest.mark.parametrize("rate", [399_999, 176_401, 96_001])
def test_awkward_sampling_rates_resample_in_little_memory(pipe, rate):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    samples = np.interp(np.arange(rate) / rate, t, SPEECHLIKE).astype(np.float32)
    assert not isinstance(answer_or_input_error(pipe, audio=(rate, samples)), str)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024  # KiB: under 500 MB more


@pytest.mark.parametrize("rate, message", [(3, "3 Hz is outside 1,000–768,000 Hz"), (2_000_000, "outside")])
def test_sampling_rates_out_of_range(pipe, rate, message):
    assert message in answer_or_input_error(pipe, audio=(rate, np.ones(100, dtype=np.float32)))
