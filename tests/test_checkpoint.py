"""The shipped checkpoint on the shipped sample (held-out images, the held-out speaker, unseen phrasings)."""

from pathlib import Path

import pytest

from fusion import FusionPipeline
from fusion.data.sources import list_fsdd, load_mnist
from fusion.evaluate import evaluate
from fusion.explain import attribution_test, audio_deletion, image_deletion

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "assets" / "fusion-digits"
SAMPLE = ROOT / "assets" / "examples" / "sample"
# Floors a few points under what the shipped checkpoint measured on the 200/100/200-item sample (image 0.99,
# audio 0.73, text 0.985, image+audio 1.00, image+text 1.00, audio+text 0.98, all three 1.00); the model card
# gives the full held-out numbers.
FLOORS = {"image": 0.97, "audio": 0.70, "text": 0.95, "image+audio": 0.97, "image+text": 0.98,
          "audio+text": 0.95, "image+audio+text": 0.98}


@pytest.fixture(scope="module")
def fp32():
    return FusionPipeline.from_pretrained(CHECKPOINT, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def accuracy(fp32):
    return evaluate(fp32, SAMPLE)


def test_checkpoint_is_self_describing_and_small():
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"):
        assert (CHECKPOINT / name).is_file(), name
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 30 * 2**20
    assert not list(CHECKPOINT.glob("*.bin")) and not list(CHECKPOINT.glob("*.pt"))  # no pickles


@pytest.mark.parametrize("key", list(FLOORS))
def test_accuracy_floor_on_the_sample(accuracy, key):
    assert accuracy[key] >= FLOORS[key], (key, accuracy[key])


def test_garbage_modality_leaves_the_other_two(accuracy):
    for garbage in ("noise image", "noise audio", "no-number text"):
        assert accuracy[f"image+audio+text|{garbage}"] >= 0.95, garbage


def test_int8_stays_close_to_fp32(accuracy):
    int8 = FusionPipeline.from_pretrained(CHECKPOINT, precision="int8", device="cpu")
    quantized = evaluate(int8, SAMPLE, garbage=False)
    for key in FLOORS:
        assert abs(quantized[key] - accuracy[key]) <= 0.02, (key, quantized[key], accuracy[key])


def test_examples_answer_as_labelled(fp32):
    examples = ROOT / "assets" / "examples"
    assert fp32(image=str(examples / "digit-7.png")).label == "7"
    assert fp32(text="drei").label == "3"
    # The first "two" of the held-out speaker is heard as "zero" by the shipped checkpoint (its commonest audio
    # confusion, stated in the model card); it stays an example, so its answer is only held to the top two.
    spoken_two = fp32(audio=str(examples / "spoken-2.wav")).probs
    assert "2" in sorted(spoken_two, key=spoken_two.get)[-2:], spoken_two
    assert fp32(audio=str(examples / "spoken-7.wav")).label == "7"
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
    assert beats_random(audio, 2.0), audio
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
