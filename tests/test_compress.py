"""Structured pruning on tiny random models: what is removed, what the pruned model computes, how it loads."""

import copy
import json
from pathlib import Path

import pytest
import torch

from fusion import FusionForClassification, FusionPipeline
from fusion.compress import choose, importance, main, prune
from fusion.modeling import prunable_blocks
from fusion.train import convnext_config, tiny_whisper_config

from .conftest import random_inputs, tiny_config, tiny_model

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "sample"


@pytest.fixture()
def speech_model():
    """Every prunable layout at once: ConvNeXt image MLPs, BERT heads and MLPs, Whisper heads and MLP, fusion MLPs."""
    torch.manual_seed(0)
    config = tiny_config(audio_config=tiny_whisper_config(), image_config=convnext_config((8, 16), depth=1))
    return FusionForClassification(config).eval()


def speech_inputs(batch: int = 3, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 1, 28, 28, generator=generator),
        "input_ids": torch.randint(5, 300, (batch, 7), generator=generator),
        "attention_mask": torch.ones(batch, 7, dtype=torch.long),
        "audio_values": torch.randn(batch, 80, 100, generator=generator),
    }


def test_every_layout_is_found(speech_model):
    kinds = {(b.path.split(".")[1] if b.path.startswith("encoders") else "fusion", b.kind) for b in prunable_blocks(speech_model.fusion)}
    assert kinds == {("image", "width"), ("text", "heads"), ("text", "width"), ("audio", "heads"), ("audio", "width"),
                     ("fusion", "width")}


def test_pruned_model_equals_the_original_with_the_units_masked(speech_model, tmp_path):
    blocks = prunable_blocks(speech_model.fusion)
    # Remove head 0 of every attention block and every odd channel of every MLP.
    plan = {b.path: list(range(1, b.count)) if b.kind == "heads" else list(range(0, b.count, 2)) for b in blocks}
    masked = copy.deepcopy(speech_model)
    for block in blocks:
        removed = [u for u in range(block.count) if u not in plan[block.path]]
        columns = [u * block.unit + r for u in removed for r in range(block.unit)]
        with torch.no_grad():
            masked.fusion.get_submodule(block.path).get_submodule(block.output).weight[:, columns] = 0
    pruned = copy.deepcopy(speech_model)
    prune(pruned, plan)

    inputs = speech_inputs()
    with torch.no_grad():
        expected, got = masked(**inputs).logits, pruned(**inputs).logits
        original = speech_model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert not torch.allclose(original, expected, atol=1e-3)  # the masking changed the answer: a real test

    attention = pruned.fusion.encoders["audio"].encoder.layers[0].self_attn
    assert attention.q_proj.out_features == attention.k_proj.out_features == 8 and attention.num_heads == 1
    assert attention.out_proj.in_features == 8
    bert = pruned.fusion.encoders["text"].encoder.encoder.layer[0].attention
    assert bert.self.query.out_features == 24 and bert.self.num_attention_heads == 3 and bert.self.all_head_size == 24
    assert pruned.fusion.layers[0].mlp.up.out_features == 32
    assert pruned.config.pruned == {b.path: len(plan[b.path]) for b in blocks}
    removed = 0
    for block in blocks:
        module = speech_model.fusion.get_submodule(block.path)
        per_row = sum(module.get_submodule(n).in_features + (module.get_submodule(n).bias is not None) for n in block.inputs)
        per_row += module.get_submodule(block.output).out_features
        removed += (block.count - len(plan[block.path])) * block.unit * per_row
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in speech_model.parameters()) - removed

    # The checkpoint rebuilds its own sizes, in fp32 and in 8-bit.
    pruned.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pruned"] == pruned.config.pruned
    reloaded = FusionForClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, got, atol=1e-6)
    from transformers import BitsAndBytesConfig

    int8 = FusionForClassification.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    with torch.no_grad():
        assert torch.allclose(int8(**inputs).logits.float(), got, atol=0.1)


def test_a_silenced_unit_scores_zero_and_is_the_first_to_go(speech_model):
    block = next(b for b in prunable_blocks(speech_model.fusion) if b.path.endswith("attention") and "text" in b.path)
    output = speech_model.fusion.get_submodule(block.path).get_submodule(block.output)
    with torch.no_grad():
        output.weight[:, block.unit : 2 * block.unit] = 0  # head 1 reaches nothing
    batches = [dict(speech_inputs(seed=s), labels=torch.tensor([1, 4, 7])) for s in range(2)]
    frozen = speech_model.fusion.encoders["audio"].requires_grad_(False)
    scores = importance(speech_model, batches, [block])[block.path]
    assert scores.shape == (4,) and scores[1] == 0 and (scores[[0, 2, 3]] > 0).all()
    assert not any(p.requires_grad for p in frozen.parameters())  # the flags come back
    plan = choose([block], {block.path: scores}, heads=3, width=None)
    assert plan == {block.path: [0, 2, 3]}
    with pytest.raises(ValueError, match="--width must be in"):
        choose([block], {block.path: scores}, heads=None, width=1.5)


def test_prune_command_fine_tunes_and_writes_a_checkpoint_that_answers_and_explains(tiny_checkpoint, tmp_path, tone):
    out = tmp_path / "pruned"
    report = main(["prune", "--model", str(tiny_checkpoint), "--out", str(out), "--data", str(SAMPLE),
                   "--heads", "2", "--width", "0.5", "--items", "40", "--json",
                   "--finetune-epochs", "1", "--train-data", str(SAMPLE),
                   "--examples-per-epoch", "64", "--batch-size", "32", "--no-synthetic-voices", "--eval-every", "0",
                   "--no-final-eval"])
    assert report["parameters"]["after"] < report["parameters"]["before"] and report["importance_items"] == 40
    assert len(report["finetune"]["losses"]) == 1 and (out / "training_log.json").is_file()
    assert json.loads((out / "pruning.json").read_text())["kept"] == report["kept"]
    assert report["kept"]["encoders.text.encoder.encoder.layer.0.attention"] == "2/4"
    pipe = FusionPipeline.from_pretrained(out, precision="fp32", device="cpu")
    prediction = pipe(text="seven", audio=tone, explain=True)
    assert prediction.label in pipe.labels and sum(prediction.modality_shares.values()) == pytest.approx(1.0)
    assert json.loads((out / "config.json").read_text())["pruned"]  # fine-tuning kept the pruned sizes
    rows = main(["table", "--model", str(tiny_checkpoint), str(out), "--data", str(SAMPLE), "--precision", "fp32",
                 "--repeats", "2", "--json"])["rows"]
    assert [row["parameters"] for row in rows] == [report["parameters"]["before"], report["parameters"]["after"]]
    assert all(set(row["accuracy"]) >= {"image", "audio", "text", "image+audio+text"} and row["explained_ms"] > 0 for row in rows)
    with pytest.raises(SystemExit, match="nothing to prune"):
        main(["prune", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "same"), "--data", str(SAMPLE), "--items", "8"])


def test_distillation_brings_the_student_closer_to_its_teacher(tiny_checkpoint, tmp_path):
    """The same student trained on the same examples, once from the labels alone and once from the teacher's answers
    alone: the distilled one ends nearer the teacher (KL on inputs it never saw)."""
    common = ["--data", str(SAMPLE), "--epochs", "2", "--examples-per-epoch", "128", "--size", "tiny",
              "--batch-size", "32", "--no-synthetic-voices", "--eval-every", "0", "--no-final-eval",
              "--audio-encoder", "convnext", "--lr", "3e-3"]
    for name, share in (("labels", "0"), ("taught", "1")):
        report = main(["distill", "--teacher", str(tiny_checkpoint), "--out", str(tmp_path / name), *common, "--distill", share])
        assert len(report["losses"]) == 2
    teacher = FusionForClassification.from_pretrained(tiny_checkpoint).eval()
    inputs = random_inputs(16, seed=3)
    divergence = {}
    with torch.no_grad():
        target = teacher(**inputs).logits.log_softmax(-1)
        for name in ("labels", "taught"):
            student = FusionForClassification.from_pretrained(tmp_path / name).eval()
            divergence[name] = float(torch.nn.functional.kl_div(student(**inputs).logits.log_softmax(-1), target,
                                                                log_target=True, reduction="batchmean"))
    assert divergence["taught"] < 0.5 * divergence["labels"], divergence
    with pytest.raises(SystemExit, match="--config must be small or a JSON object"):
        main(["distill", "--teacher", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *common, "--config", "huge"])


def test_a_fine_tuned_student_must_share_the_teachers_whisper(tokenizer, tmp_path):
    """The cached Whisper states feed teacher and student alike, so an --init student with other Whisper weights
    is refused before training."""
    from fusion.feature_extraction import AudioSettings
    from fusion.processing import FusionProcessor, ProcessorSettings
    from fusion.speech import WHISPER_AUDIO_SETTINGS
    from fusion.train import main as train

    settings = ProcessorSettings()
    settings.audio = AudioSettings(**WHISPER_AUDIO_SETTINGS)
    for name in ("teacher", "student"):
        model = tiny_model(tokenizer, audio_config=tiny_whisper_config())
        if name == "student":
            torch.nn.init.normal_(model.fusion.encoder_of("audio").encoder.conv1.weight)
        model.save_pretrained(tmp_path / name)
        FusionProcessor(tokenizer, settings).save_pretrained(tmp_path / name)
    with pytest.raises(SystemExit, match="must share their frozen Whisper encoder"):
        train(["--teacher", str(tmp_path / "teacher"), "--init", str(tmp_path / "student"), "--out", str(tmp_path / "out"),
               "--data", str(SAMPLE), "--epochs", "1", "--size", "tiny", "--no-synthetic-voices"])


def test_a_whisper_teacher_teaches_a_student_with_its_own_audio_encoder(tokenizer, tmp_path):
    """The student trains a ConvNeXt over the teacher's log-mel; the teacher hears the same raw clips."""
    from fusion.feature_extraction import AudioSettings
    from fusion.processing import FusionProcessor, ProcessorSettings
    from fusion.speech import WHISPER_AUDIO_SETTINGS

    teacher = tmp_path / "teacher"
    tiny_model(tokenizer, audio_config=tiny_whisper_config()).save_pretrained(teacher)
    settings = ProcessorSettings()
    settings.audio = AudioSettings(**WHISPER_AUDIO_SETTINGS)
    FusionProcessor(tokenizer, settings).save_pretrained(teacher)
    main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "student"), "--data", str(SAMPLE), "--epochs", "1",
          "--examples-per-epoch", "32", "--size", "tiny", "--batch-size", "32", "--no-synthetic-voices", "--eval-every", "0",
          "--no-final-eval", "--audio-encoder", "convnext"])
    student = FusionPipeline.from_pretrained(tmp_path / "student", precision="fp32", device="cpu")
    assert student.model.config.modality_config("audio").model_type == "convnext"
    assert student.processor.settings.audio.num_mel_bins == 80
    assert student(audio=str(SAMPLE / "fsdd" / sorted(p.name for p in (SAMPLE / "fsdd").iterdir())[0])).label in student.labels


def test_a_student_with_fewer_whisper_layers_learns_from_the_teachers_upper_layers(tokenizer, two_speakers, tmp_path):
    """A student keeps the teacher's first Whisper layer and tunes it; the cached input of that layer is also the
    input the teacher's two layers start from, so the teacher's answers are its own. The student's other sizes
    (fusion, text, ConvNeXt depth) are its own, and it starts from the teacher's weights where they fit."""
    from fusion.data.audio_bank import encode_waves, finish_states
    from fusion.data.voice_augment import VoiceAugment
    from fusion.feature_extraction import AudioSettings
    from fusion.processing import FusionProcessor, ProcessorSettings
    from fusion.speech import WHISPER_AUDIO_SETTINGS

    teacher_dir = tmp_path / "teacher"
    teacher = tiny_model(tokenizer, audio_config=tiny_whisper_config(layers=2))
    teacher.save_pretrained(teacher_dir)
    settings = ProcessorSettings()
    settings.audio = AudioSettings(**WHISPER_AUDIO_SETTINGS)
    processor = FusionProcessor(tokenizer, settings)
    processor.save_pretrained(teacher_dir)
    # The identity the training relies on: the teacher's layers run from the shallow encoder's cached input give
    # the teacher's own output.
    shallow = copy.deepcopy(teacher.fusion.encoder_of("audio"))
    del shallow.encoder.layers[1]
    rate = settings.audio.sampling_rate  # the bank reads waveforms at the model's rate
    wave = torch.sin(torch.arange(rate) * 2 * torch.pi * 220 / rate).numpy()
    below = encode_waves(shallow, processor, [wave], variants=1, augment=VoiceAugment(), seed=0, cache=None, tuned=1)[0]
    with torch.no_grad():
        full = teacher.fusion.encoder_of("audio").features(processor.audio_features((rate, wave))[0][None])[0]
        rebuilt = finish_states(teacher.fusion.encoder_of("audio"), below.float(), tuned=2)
    torch.testing.assert_close(rebuilt, full, rtol=0, atol=2e-2)  # the cache is float16

    common = ["--data", str(two_speakers), "--heldout-speaker", "nicolas", "--epochs", "1", "--examples-per-epoch", "96",
              "--size", "tiny", "--batch-size", "32", "--no-synthetic-voices", "--eval-every", "0", "--no-final-eval"]
    with pytest.raises(SystemExit, match="needs --tune-audio-layers"):
        main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "x"), *common, "--whisper-layers", "1"])
    with pytest.raises(SystemExit, match=r"--whisper-layers must be in 1..2"):
        main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "x"), *common, "--whisper-layers", "3",
              "--tune-audio-layers", "1"])
    main(["distill", "--teacher", str(teacher_dir), "--out", str(tmp_path / "student"), *common, "--whisper-layers", "1",
          "--tune-audio-layers", "1", "--distill-states", "1", "--teacher-init", "--config",
          json.dumps({"fusion_layers": 1, "text_layers": 1, "conv_depth": 1})])
    student = FusionPipeline.from_pretrained(tmp_path / "student", precision="fp32", device="cpu")
    config = student.model.config
    assert config.modality_config("audio").encoder_layers == 1 and config.num_hidden_layers == 1
    assert config.modality_config("text").num_hidden_layers == 1 and config.modality_config("image").depths == [1, 1]
    whisper, taught = student.model.fusion.encoder_of("audio").encoder, teacher.fusion.encoder_of("audio").encoder
    assert torch.equal(whisper.conv1.weight, taught.conv1.weight)  # frozen, below the tuned layer
    assert not torch.equal(whisper.layers[0].fc1.weight, taught.layers[0].fc1.weight)  # tuned (the first step's rate is 0)
    prediction = student(image=str(SAMPLE.parent / "digit-7.png"), text="three",
                         audio=str(SAMPLE / "fsdd" / sorted(p.name for p in (SAMPLE / "fsdd").iterdir())[0]), explain=True)
    assert prediction.label in student.labels and prediction.explanation.audio_heatmap is not None


def test_a_student_starts_from_the_teachers_tensors_that_fit(tokenizer):
    from fusion.train import start_from

    teacher = tiny_model(tokenizer, audio_config=tiny_whisper_config(layers=2))
    torch.manual_seed(1)
    student = FusionForClassification(tiny_config(text_config=teacher.config.text_config.to_dict(),
                                                  audio_config=tiny_whisper_config(layers=1), num_hidden_layers=1,
                                                  intermediate_size=48))
    copied = start_from(student, teacher)
    own, theirs = student.state_dict(), teacher.state_dict()
    assert 0 < copied < len(own)
    assert torch.equal(own["fusion.encoders.audio.encoder.layers.0.fc1.weight"], theirs["fusion.encoders.audio.encoder.layers.0.fc1.weight"])
    for name in ("fusion.layers.0.attention.query.weight", "classifier.weight", "fusion.summary_token"):
        assert torch.equal(own[name], theirs[name])
    assert own["fusion.layers.0.mlp.up.weight"].shape != theirs["fusion.layers.0.mlp.up.weight"].shape  # left as it was
    assert not any(k.startswith("fusion.layers.1.") for k in own)


def test_student_options_without_what_they_need_are_refused(tmp_path):
    from fusion.train import main as train

    common = ["--out", str(tmp_path / "x"), "--data", str(SAMPLE), "--size", "tiny", "--epochs", "1"]
    with pytest.raises(SystemExit, match="need --teacher"):
        train([*common, "--teacher-init"])
    with pytest.raises(SystemExit, match="need --teacher"):
        train([*common, "--distill-states", "1"])
    with pytest.raises(SystemExit, match="--distill-states needs --tune-audio-layers"):
        train([*common, "--teacher", str(tmp_path / "t"), "--distill-states", "1"])
