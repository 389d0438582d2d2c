import io
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from fusion.image_processing import prepare_image
from fusion.processing import FusionInputError, FusionProcessor


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_every_image_form_gives_the_same_pixels(processor, digit_image, tmp_path):
    reference, _ = processor.image_features(digit_image)
    assert reference.shape == (1, 28, 28)
    small_forms = {
        "PIL L": Image.fromarray(digit_image),
        "PIL RGB": Image.fromarray(digit_image).convert("RGB"),
        "PIL P": Image.fromarray(digit_image).convert("P"),
        "PIL RGBA": Image.fromarray(digit_image).convert("RGBA"),
        "array float": digit_image.astype(np.float32) / 255,
        "array RGB": np.repeat(digit_image[..., None], 3, axis=2),
        "array 16-bit": digit_image.astype(np.uint16) * 257,
    }
    for name, form in small_forms.items():
        torch.testing.assert_close(processor.image_features(form)[0], reference, msg=name)
    # A photo-sized drawing, dark on light: inverted, cropped to the ink, scaled down and centred.
    large = Image.fromarray(255 - digit_image).resize((280, 280), Image.NEAREST)
    path = tmp_path / "seven.png"
    large.save(path)
    large_reference, geometry = processor.image_features(large)
    assert geometry.inverted and (geometry.width, geometry.height) == (280, 280)
    for name, form in {"path": str(path), "bytes": path.read_bytes()}.items():
        torch.testing.assert_close(processor.image_features(form)[0], large_reference, msg=name)
    assert torch.corrcoef(torch.stack([large_reference.flatten(), reference.flatten()]))[0, 1] > 0.8


def test_exif_rotation_is_applied(processor, digit_image):
    image = Image.fromarray(digit_image).rotate(90, expand=True)  # stored on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": undoes the counter-clockwise turn above
    rotated = Image.open(io.BytesIO(png_bytes(image, exif=exif)))
    pixels, geometry = processor.image_features(rotated)
    reference, _ = processor.image_features(digit_image)
    assert (geometry.width, geometry.height) == (28, 28)
    assert torch.corrcoef(torch.stack([pixels.flatten(), reference.flatten()]))[0, 1] > 0.95


def test_image_geometry_maps_back_to_the_input(digit_image, processor):
    big = np.zeros((100, 60), dtype=np.uint8)
    big[20:48, 10:38] = digit_image
    square, geometry = prepare_image(big, processor.settings.image)
    assert (geometry.width, geometry.height) == (60, 100)
    left, top, right, bottom = geometry.box
    assert 10 <= left and right <= 38 and 20 <= top and bottom <= 48
    assert square.max() > 0.9 and square.shape == (28, 28)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"not an image", "could not decode the image"),
        (b"", "image data is empty"),
        ("/no/such/file.png", "does not exist"),
        (np.zeros((0, 4)), "image array is empty"),
        (np.zeros((4, 4, 7)), r"image array must be \(H, W\)"),
        (np.full((4, 4), np.nan), "NaN"),
        (42, "image must be a file path, bytes, PIL image or array, got int"),
        ({"background": None, "layers": []}, "image must be a file path, bytes, PIL image or array, got dict"),
    ],
)
def test_bad_images_raise_one_error_type(processor, bad, message):
    with pytest.raises(FusionInputError, match=message):
        processor.image_features(bad)


def test_truncated_png_is_refused(processor, digit_image):
    data = png_bytes(Image.fromarray(digit_image))
    with pytest.raises(FusionInputError, match="could not decode the image"):
        processor.image_features(data[: len(data) // 2])


def test_oversized_image_is_refused_before_decoding(processor):
    processor.settings.image.max_pixels, limit = 1000, processor.settings.image.max_pixels
    try:
        with pytest.raises(FusionInputError, match=r"image is 50×50 pixels; at most 1,000"):
            processor.image_features(png_bytes(Image.new("L", (50, 50))))
    finally:
        processor.settings.image.max_pixels = limit


def wav_bytes(rate, samples, subtype="PCM_16", format="WAV"):
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, subtype=subtype, format=format)
    return buffer.getvalue()


def test_every_audio_form_gives_the_same_features(processor, tone, tmp_path):
    rate, samples = tone
    reference, start = processor.audio_features((rate, samples))
    assert reference.shape == (32, 100)
    assert -0.1 < start < 0.3  # the window sits around the tone, which starts at 0.25 s
    path = tmp_path / "tone.flac"
    soundfile.write(path, samples, rate)
    stereo = np.stack([samples, samples], axis=1)
    forms = {
        "flac path": str(path),
        "wav bytes": wav_bytes(rate, samples),
        "ogg bytes": wav_bytes(rate, samples, subtype="VORBIS", format="OGG"),
        "mp3 bytes": wav_bytes(rate, samples, subtype="MPEG_LAYER_III", format="MP3"),
        "int16": (rate, (samples * 32767).astype(np.int16)),
        "stereo": (rate, stereo),
        "channels first": (rate, stereo.T.copy()),
        "other rate": (44100, np.interp(np.arange(44100) / 44100, np.arange(rate) / rate, samples).astype(np.float32)),
    }
    for name, form in forms.items():
        features, _ = processor.audio_features(form)
        assert torch.corrcoef(torch.stack([features.flatten(), reference.flatten()]))[0, 1] > 0.95, name


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"RIFF....not audio", "could not decode the audio"),
        (b"", "audio data is empty"),
        ("/no/such/clip.wav", "does not exist"),
        ((8000, np.zeros(0, dtype=np.float32)), "audio has no samples"),
        ((8000, np.zeros(8000, dtype=np.float32)), "audio is silent"),
        ((8000, np.array([0.1, np.nan] * 100, dtype=np.float32)), "NaN or infinite"),
        ((8000, np.zeros(8000 * 61, dtype=np.float32)), r"audio is 61.0 s long; at most 60 s"),
        ((-5, np.ones(10)), "sampling rate must be a positive integer"),
        ((8000, np.array(["a", "b"])), "integers or floats"),
        (3.5, "audio must be a file path, bytes or"),
    ],
)
def test_bad_audio_raises_one_error_type(processor, bad, message):
    with pytest.raises(FusionInputError, match=message):
        processor.audio_features(bad)


def test_batch_masks_and_text_truncation(processor, digit_image, tone):
    long_text = "seven " * 200
    batch = processor([{"image": digit_image, "text": "seven"}, {"audio": tone, "text": long_text}, {"audio": tone}])
    assert batch["pixel_values"].shape == (3, 1, 28, 28)
    assert batch["image_mask"].tolist() == [True, False, False]
    assert batch["audio_mask"].tolist() == [False, True, True]
    assert batch["text_mask"].tolist() == [True, True, False]
    assert batch["input_ids"].shape == (3, processor.settings.text.max_tokens)
    assert batch["meta"][1]["text_truncated"] and not batch["meta"][0]["text_truncated"]
    assert batch["meta"][0]["modalities"] == ["image", "text"]


@pytest.mark.parametrize(
    "items, message",
    [
        ({}, "no input given"),
        ([], "non-empty list"),
        ([{"picture": 1}], "unknown keys"),
        ({"text": "   "}, "text is empty"),
        ({"text": 7}, "text must be a string, got int"),
    ],
)
def test_bad_items(processor, items, message):
    with pytest.raises(FusionInputError, match=message):
        processor(items)


def test_processor_round_trip(processor, digit_image, tone, tmp_path):
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["audio"]["sampling_rate"] == 8000
    loaded = FusionProcessor.from_pretrained(tmp_path)
    item = {"image": digit_image, "text": "Der Wert ist sieben 七", "audio": tone}
    a, b = processor(item), loaded(item)
    for key in ("pixel_values", "input_ids", "attention_mask", "audio_values"):
        torch.testing.assert_close(a[key], b[key])


def test_damaged_processor_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks processor_config.json"):
        FusionProcessor.from_pretrained(tmp_path)
    # the text part loads its own files: a folder with the settings but no tokenizer names what is missing
    (tmp_path / "processor_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json"):
        FusionProcessor.from_pretrained(tmp_path)
