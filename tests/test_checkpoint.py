"""The shipped checkpoint on the shipped sample (held-out images, the held-out speaker, unseen phrasings)."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from fusion import FusionPipeline
from fusion.data.heldout import microphone_recording
from fusion.data.sources import folder_items, list_fsdd, load_mnist
from fusion.evaluate import attribution_test, audio_deletion, evaluate, image_deletion
from fusion.retrieval import embed_items

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "assets" / "fusion-digits"
SAMPLE = ROOT / "assets" / "examples" / "sample"
# Floors a few points under what the shipped checkpoint (c9) measured on the 200/100/200-item sample (image 0.985,
# audio 0.99, text 0.99, image+audio 1.00, image+text 1.00, audio+text 1.00, all three 1.00); the model card
# gives the full held-out numbers.
FLOORS = {"image": 0.97, "audio": 0.96, "text": 0.96, "image+audio": 0.97, "image+text": 0.98,
          "audio+text": 0.98, "image+audio+text": 0.98}


@pytest.fixture(scope="module")
def fp32():
    return FusionPipeline.from_pretrained(CHECKPOINT, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def accuracy(fp32):
    return evaluate(fp32, SAMPLE)


def test_checkpoint_is_self_describing_and_small():
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (CHECKPOINT / name).is_file(), name
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 60 * 2**20
    assert not list(CHECKPOINT.glob("*.bin")) and not list(CHECKPOINT.glob("*.pt"))  # no pickles


@pytest.mark.parametrize("key", list(FLOORS))
def test_accuracy_floor_on_the_sample(accuracy, key):
    assert accuracy[key] >= FLOORS[key], (key, accuracy[key])


def test_garbage_modality_leaves_the_other_two(accuracy):
    for garbage in ("noise image", "noise audio", "no-number text"):
        assert accuracy[f"image+audio+text|{garbage}"] >= 0.95, garbage


def test_microphone_recordings_are_heard_like_clean_clips(fp32, accuracy):
    """The sample's clips as a browser microphone delivers them (48 kHz, a second of quiet on each side, white
    noise 20 dB below the speech over all of it) are heard about as well as the clean 8 kHz clips."""
    clips = list_fsdd(SAMPLE)
    items = []
    for index, clip in enumerate(clips):
        samples, rate = soundfile.read(clip.path, dtype="float32")
        recording = microphone_recording(samples, rate, seed=index)
        assert len(recording) > 2 * 48000
        items.append({"audio": (48000, recording)})
    heard = sum(p.label == str(c.label) for p, c in zip(fp32(items), clips)) / len(clips)
    assert heard >= accuracy["audio"] - 0.05, (heard, accuracy["audio"])


def test_int8_stays_close_to_fp32(fp32, accuracy):
    import bitsandbytes as bnb

    int8 = FusionPipeline.from_pretrained(CHECKPOINT, precision="int8", device="cpu")
    quantized = evaluate(int8, SAMPLE, garbage=False)
    for key in FLOORS:
        assert abs(quantized[key] - accuracy[key]) <= 0.02, (key, quantized[key], accuracy[key])
    # The checkpoint keeps its audio and text encoders out of 8-bit (`int8_skip_modules`), so that similarities
    # stay within 0.01 of fp32 (on 300 sample items the largest difference measured 0.006).
    assert isinstance(int8.model.fusion.layers[0].attention.key, bnb.nn.Linear8bitLt)
    kept = [m for name in ("audio", "text") for m in int8.model.fusion.encoders[name].modules() if isinstance(m, torch.nn.Linear)]
    assert kept and not any(isinstance(m, bnb.nn.Linear8bitLt) for m in kept)
    items = [item for _, item, _ in folder_items(SAMPLE)]
    chosen = [item for modality in ("image", "audio", "text") for item in [i for i in items if modality in i][:10]]
    vectors = [np.stack([next(iter(e.values())) for e in embed_items(pipe, chosen)]) for pipe in (fp32, int8)]
    drift = np.abs(vectors[0] @ vectors[0].T - vectors[1] @ vectors[1].T)
    assert drift.max() <= 0.01, drift.max()


def test_examples_answer_as_labelled(fp32):
    examples = ROOT / "assets" / "examples"
    assert fp32(image=str(examples / "digit-7.png")).label == "7"
    assert fp32(text="drei").label == "3"
    assert fp32(audio=str(examples / "spoken-2.wav")).label == "2"
    assert fp32(audio=str(examples / "spoken-7.wav")).label == "7"
    # A woman's voice from an engine never trained on, fixed before the model heard it. As given, the shipped
    # weights hear this "four" as 1 (74%); her voice (about 176 Hz) is above the views' 160 Hz, so the clip tries
    # them and is answered 4 with every frequency × 0.8, as the examples' README says.
    woman = fp32(audio=str(examples / "spoken-4-woman.wav"))
    assert woman.meta["audio_pitch"] == pytest.approx(176, abs=5)
    assert (woman.label, woman.meta["audio_scale"]) == ("4", pytest.approx(0.8)), (woman.probs, woman.meta)
    views = fp32.model.config.audio_views
    try:
        fp32.model.config.audio_views = None
        assert fp32(audio=str(examples / "spoken-4-woman.wav")).label == "1"
    finally:
        fp32.model.config.audio_views = views
    assert fp32(image=str(examples / "digit-7.png"), text="sieben", audio=str(examples / "spoken-7.wav")).label == "7"


def beats_random(deletion: dict, ratio: float) -> bool:
    """Deleting the most relevant part lowers the true class clearly, and `ratio` times more than deleting a random
    part (whose drop may be nil or negative: then the ratio is undefined)."""
    if deletion["drop_relevant"] < 0.05:
        return False
    return deletion["ratio"] is None or deletion["ratio"] >= ratio


def test_heatmaps_are_faithful_on_the_sample(fp32):
    images, labels = load_mnist(SAMPLE)
    clips = list_fsdd(SAMPLE)[::5]
    label_index = {label: i for i, label in enumerate(fp32.labels)}
    deletion = image_deletion(fp32, list(images[:30]), [label_index[str(d)] for d in labels[:30]], steps=2)
    assert beats_random(deletion, 3.0), deletion
    audio = audio_deletion(fp32, [str(c.path) for c in clips], [label_index[str(c.label)] for c in clips], steps=2)
    # Whisper hears any masked frames: random frames already lower the true class by about 0.37 on this sample,
    # the most relevant ones by 0.44 (ratio 1.19; the ConvNeXt before it gave a clear margin). The model card
    # states it; a map no better than random sits near 1.0.
    assert beats_random(audio, 1.1), audio
    attribution = attribution_test(fp32, list(images[:20]), [str(c.path) for c in clips[:20]])
    assert attribution["audio_over_noise_image"] >= 0.95 and attribution["image_over_noise_audio"] >= 0.95, attribution


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_every_precision_answers_and_explains(precision):
    pipe = FusionPipeline.from_pretrained(CHECKPOINT, precision=precision, device="cpu")
    examples = ROOT / "assets" / "examples"
    pred = pipe(image=str(examples / "digit-7.png"), text="sieben", audio=str(examples / "spoken-7.wav"), explain=True)
    assert pred.label == "7" and pred.method == "relevance"
    assert sum(pred.modality_shares.values()) == pytest.approx(1.0)
    assert pred.image_heatmap.shape == (280, 280)


def test_the_trust_figure_finds_the_image_maps_faithful(fp32):
    """Ten sample images alone: removing each map's top 10% lowers the answer's probability more than removing a
    random 10% (on 100 held-out images this held for 98)."""
    images, _ = load_mnist(SAMPLE)
    figures = [fp32.trust(fp32(image=image, explain=True))["image"] for image in images[:10]]
    assert sum(f["faithful"] for f in figures) >= 8
    assert sum(f["top"] for f in figures) > 5 * sum(f["random"] for f in figures)
