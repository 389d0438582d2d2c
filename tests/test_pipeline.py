import shutil

import numpy as np
import pytest
import torch

from fusion import FusionPipeline
from fusion.processing import FusionInputError


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")


def test_prediction_has_label_and_probabilities(pipe, digit_image, tone):
    pred = pipe(image=digit_image, text="seven", audio=tone)
    assert pred.label in pipe.labels
    assert set(pred.probs) == {str(d) for d in range(10)}
    assert abs(sum(pred.probs.values()) - 1) < 1e-5
    assert pred.confidence == max(pred.probs.values())
    assert pred.modalities == ["image", "text", "audio"]
    assert pred.timings["forward"] > 0
    assert pipe.description.endswith("· fp32 · cpu")


def test_any_subset_and_empty_text_counts_as_absent(pipe, digit_image, tone):
    assert pipe(text="drei").modalities == ["text"]
    assert pipe(image=digit_image, text="  ").modalities == ["image"]
    assert pipe(audio=tone).modalities == ["audio"]
    with pytest.raises(FusionInputError, match="no input given"):
        pipe(text="")
    with pytest.raises(FusionInputError, match="no input given"):
        pipe()


def test_a_list_runs_as_one_batch_and_matches_single_calls(pipe, digit_image, tone):
    items = [{"image": digit_image}, {"text": "nine", "audio": tone}, {"image": digit_image, "text": "4"}]
    batched = pipe(items)
    assert [p.modalities for p in batched] == [["image"], ["text", "audio"], ["image", "text"]]
    for item, prediction in zip(items, batched):
        alone = pipe(**item)
        assert alone.label == prediction.label
        assert abs(alone.confidence - prediction.confidence) < 1e-5


def test_int8_pipeline_on_cpu_is_close_to_fp32(tiny_checkpoint, pipe, digit_image, tone):
    import bitsandbytes as bnb

    int8 = FusionPipeline.from_pretrained(tiny_checkpoint, precision="int8", device="cpu")
    assert int8.precision == "int8" and "int8" in int8.description
    assert isinstance(int8.model.fusion.layers[0].attention.key, bnb.nn.Linear8bitLt)
    a, b = pipe(image=digit_image, text="seven", audio=tone), int8(image=digit_image, text="seven", audio=tone)
    assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 0.05


def test_checkpoint_names_the_modules_kept_out_of_int8(tiny_checkpoint, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    from fusion import FusionConfig, FusionForClassification, FusionModel

    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    config = FusionConfig.from_pretrained(tmp_path)
    config.int8_skip_modules = ["encoders.text"]
    config.save_pretrained(tmp_path)
    asked = BitsAndBytesConfig(load_in_8bit=True)
    model = FusionForClassification.from_pretrained(tmp_path, quantization_config=asked)
    assert asked.llm_int8_skip_modules is None  # the caller's object is not changed
    text = [m for m in model.fusion.encoders["text"].modules() if isinstance(m, torch.nn.Linear)]
    assert text and not any(isinstance(m, bnb.nn.Linear8bitLt) for m in text)
    assert isinstance(model.fusion.layers[0].attention.key, bnb.nn.Linear8bitLt)
    # A skip list the caller gives wins over the checkpoint's.
    model = FusionForClassification.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[]))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.fusion.encoders["text"].modules())
    with pytest.raises(ValueError, match="int8_skip_modules must be a list of module names"):
        FusionConfig(int8_skip_modules="encoders.text")
    # The base model reads the same names (they are under it).
    base = FusionModel.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert not any(isinstance(m, bnb.nn.Linear8bitLt) for m in base.encoders["text"].modules())
    assert isinstance(base.layers[0].attention.key, bnb.nn.Linear8bitLt)


def test_auto_precision_is_fp32_on_cpu(tiny_checkpoint):
    assert FusionPipeline.from_pretrained(tiny_checkpoint, precision="auto", device="cpu").precision == "fp32"


def test_unknown_precision_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="precision must be one of auto, int8, fp16, bf16, fp32, got 'int4'"):
        FusionPipeline.from_pretrained(tiny_checkpoint, precision="int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the GPU test below runs instead")
def test_cuda_without_a_gpu_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        FusionPipeline.from_pretrained(tiny_checkpoint, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_precision_on_a_gpu_is_int8_and_close_to_fp32(tiny_checkpoint, pipe, digit_image, tone):
    gpu = FusionPipeline.from_pretrained(tiny_checkpoint, device="cuda")
    assert gpu.precision == "int8" and gpu.device.type == "cuda"
    a, b = pipe(image=digit_image, text="seven", audio=tone), gpu(image=digit_image, text="seven", audio=tone, explain=True)
    assert max(abs(a.probs[k] - b.probs[k]) for k in a.probs) < 0.05
    assert b.image_heatmap.shape == np.asarray(digit_image).shape[:2]


def test_missing_or_damaged_checkpoint_names_what_is_missing(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FusionPipeline.from_pretrained(tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, damaged)
    (damaged / "model.safetensors").unlink()
    (damaged / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors, tokenizer.json"):
        FusionPipeline.from_pretrained(damaged)


def test_a_model_with_audio_views_says_which_it_heard_and_checks_its_maps_there(tmp_path, tokenizer, processor):
    from .conftest import tiny_model

    tiny_model(tokenizer, audio_views=[0.5, 2.0], embedding_size=16).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pipe = FusionPipeline.from_pretrained(tmp_path, precision="fp32")
    rate, t = 16000, np.arange(8000) / 16000
    tones = [(rate, (0.5 * np.sin(2 * np.pi * f * t) * np.hanning(8000)).astype(np.float32)) for f in (150, 300, 600, 1200, 2000, 3500)]
    plain = pipe([{"audio": tone} for tone in tones])
    scales = [p.meta["audio_scale"] for p in plain]
    assert set(scales) <= {0.5, 1.0, 2.0} and len(set(scales)) > 1
    from fusion.predict import output_row
    from fusion.retrieval import predict_and_embed

    batched, vectors = predict_and_embed(pipe, [{"audio": tone} for tone in tones])  # fusion.predict's pass
    assert [p.meta["audio_scale"] for p in batched] == scales
    assert output_row(1, None, batched[0], vectors[0], {}, explain=False)["audio_scale"] == scales[0]
    for tone, answer in zip(tones, plain):
        explained = pipe(audio=tone, text="seven", explain=True)
        alone = pipe(audio=tone, explain=True)
        assert alone.meta["audio_scale"] == answer.meta["audio_scale"]  # a clip's view depends on the clip only
        assert alone.label == answer.label and alone.probs == pytest.approx(answer.probs, abs=1e-5)
        noted = [n for n in explained.explanation.notes if "heard with every frequency" in n]
        assert len(noted) == (explained.meta["audio_scale"] != 1.0)
        assert set(pipe.trust(explained)) == {"audio", "text"}
    assert "audio_scale" not in pipe(text="seven").meta
    # Evaluation caches each clip's encoder output once: as the model's forward hears the clip, view included.
    from fusion.evaluate import encode_audio

    features = [pipe.processor.audio_features(tone)[0] for tone in tones]
    states = torch.stack(encode_audio(pipe, {"audio": {0: features}})["audio"][0])
    with torch.inference_mode():
        cached = pipe.model(audio_encoder_states=states).logits
        direct = pipe.model(audio_values=torch.stack(features))
    torch.testing.assert_close(cached, direct.logits, atol=1e-5, rtol=1e-5)
    assert direct.audio_scales.tolist() == scales
