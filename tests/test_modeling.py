import pytest
import torch
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from fusion import FusionConfig, FusionForClassification, FusionModel
from fusion.modeling import FusionAttention

from .conftest import random_inputs, tiny_config


def test_config_validates_with_clear_messages():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match=r"hidden_dropout_prob must be in \[0, 1\), got 1.5"):
        tiny_config(hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        tiny_config(id2label={0: "only"})
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive integer"):
        tiny_config(num_hidden_layers=0)


def test_config_round_trip_and_auto_classes(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, FusionConfig)
    assert loaded.audio_config.model_type == "audio-spectrogram-transformer"
    assert loaded.text_config.hidden_size == 32
    assert loaded.id2label[7] == "7"
    assert isinstance(AutoModel.from_config(loaded), FusionModel)


def test_fused_length_and_spans(model):
    out = model(**random_inputs(3, text_length=7), output_attentions=True)
    # image: ResNet 28x28 -> 4x4 = 16 tokens; text: 7; audio: AST 4x12 patches + 2 = 50 tokens
    assert out.modality_spans == {"image": (1, 17), "text": (17, 24), "audio": (24, 74)}
    assert out.logits.shape == (3, 10)
    assert out.token_mask.shape == (3, 1 + 16 + 7 + 50)
    assert len(out.fusion_attentions) == 2
    assert out.fusion_attentions[0].shape == (3, 4, 74, 74)
    assert set(out.encoder_attentions) == {"text", "audio"}  # the ResNet has no attention
    assert out.encoder_attentions["audio"][0].shape == (3, 4, 50, 50)


def test_every_subset_gives_its_own_tokens_only(model):
    inputs = random_inputs(2)
    for keys, length in [({"pixel_values"}, 17), ({"input_ids", "attention_mask"}, 8), ({"audio_values"}, 51),
                         ({"pixel_values", "audio_values"}, 67)]:
        out = model(**{k: v for k, v in inputs.items() if k in keys})
        assert out.token_mask.shape == (2, length)
        assert torch.isfinite(out.logits).all()


def test_text_padding_does_not_change_logits(model):
    inputs = random_inputs(2, text_length=5)
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, model(**padded).logits, rtol=1e-5, atol=1e-5)


def test_mixed_subset_batch_equals_items_alone(model):
    inputs = random_inputs(3)
    masks = {"image_mask": torch.tensor([True, False, True]), "text_mask": torch.tensor([True, True, False]),
             "audio_mask": torch.tensor([False, True, True])}
    with torch.no_grad():
        batched = model(**inputs, **masks).logits
        for i in range(3):
            alone = {}
            if masks["image_mask"][i]:
                alone["pixel_values"] = inputs["pixel_values"][i : i + 1]
            if masks["text_mask"][i]:
                alone["input_ids"] = inputs["input_ids"][i : i + 1]
                alone["attention_mask"] = inputs["attention_mask"][i : i + 1]
            if masks["audio_mask"][i]:
                alone["audio_values"] = inputs["audio_values"][i : i + 1]
            torch.testing.assert_close(batched[i : i + 1], model(**alone).logits, rtol=1e-5, atol=1e-5)


def test_summaries_over_a_subset_equal_the_masked_full_pass(model):
    """Training fuses each item over the tokens it carries only; that must be the masked full pass's answer."""
    inputs = random_inputs(4)
    masks = {"image_mask": torch.tensor([True, False, True, True]), "text_mask": torch.tensor([True, True, False, True]),
             "audio_mask": torch.tensor([False, True, True, True])}
    with torch.no_grad():
        out = model(**inputs, **masks)
        requests = [(("image", "text"), torch.tensor([0])), (("audio", "text"), torch.tensor([1])),
                    (("image", "audio"), torch.tensor([2])), (("image", "text", "audio"), torch.tensor([3])),
                    (("text",), torch.tensor([0, 1, 3])), (("image",), torch.tensor([3]))]
        summaries = model.fusion.subset_summaries(out, requests)
        for row in range(4):
            torch.testing.assert_close(summaries[row], out.summary[row : row + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(summaries[4], model(**{k: v[[0, 1, 3]] for k, v in inputs.items() if k in
                                                          ("input_ids", "attention_mask")}).summary, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(summaries[5], model(pixel_values=inputs["pixel_values"][3:]).summary, rtol=1e-5, atol=1e-5)


def test_summary_only_fusion_equals_the_full_pass_at_the_summary(model):
    """Counterfactuals and training read only the summary token, so the last layer works out that token alone."""
    with torch.no_grad():
        out = model(**random_inputs(3))
        mask = out.token_mask.clone()
        mask[1, out.modality_spans["audio"][0] :] = False
        full, _ = model.fusion.fuse(out.encoded, mask)
        alone, _ = model.fusion.fuse(out.encoded, mask, summary_only=True)
    assert alone.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(alone[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)


def test_training_dropout_keeps_the_chance_and_the_expectation():
    from fusion.modeling import Dropout

    dropout = Dropout(0.1)
    ones = torch.ones(64, 118, 128)
    torch.manual_seed(0)
    first = dropout(ones)
    kept = (first > 0).float().mean().item()
    assert abs(kept - 0.9) < 0.002, kept
    assert torch.allclose(first[first > 0], torch.tensor(1 / 0.9))
    assert abs(first.mean().item() - 1) < 0.003
    torch.manual_seed(0)
    assert torch.equal(dropout(ones), first)  # seeded like every other draw
    assert not torch.equal(dropout(ones), first)
    assert torch.equal(dropout.eval()(ones), ones)


def test_absent_rows_are_never_read(model):
    inputs = random_inputs(2)
    mask = torch.tensor([True, False])
    changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    changed["pixel_values"][1] = 1e6  # row of an item without an image
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, image_mask=mask).logits, model(**changed, image_mask=mask).logits)


def test_item_without_any_modality_is_refused(model):
    inputs = random_inputs(2)
    with pytest.raises(ValueError, match=r"items \[1\] of the batch carry no modality"):
        model(pixel_values=inputs["pixel_values"], image_mask=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="needs at least one of"):
        model()


def test_fast_and_explicit_attention_agree():
    torch.manual_seed(0)
    attention = FusionAttention(tiny_config()).eval()
    hidden = torch.randn(2, 9, 32)
    key_mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    fast, none = attention(hidden, key_mask=key_mask, output_attentions=False)
    explicit, weights = attention(hidden, key_mask=key_mask, output_attentions=True)
    assert none is None
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 4, 9, 9)
    assert weights[1, :, :, 5:].abs().max() == 0  # masked keys get no weight
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_loss_with_labels(model):
    out = model(**random_inputs(3), labels=torch.tensor([1, 2, 3]))
    assert out.loss.shape == () and out.loss > 0
    out.loss.backward()
    assert model.classifier.weight.grad is not None


def test_save_and_load_give_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = FusionForClassification.from_pretrained(tmp_path).eval()
    inputs = random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits, rtol=0, atol=0)


def test_8bit_load_on_cpu(model, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    model.save_pretrained(tmp_path)
    quantized = FusionForClassification.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto", dtype=torch.float32
    ).eval()
    assert isinstance(quantized.fusion.layers[0].attention.query, bnb.nn.Linear8bitLt)
    assert isinstance(quantized.fusion.layers[1].mlp.down, bnb.nn.Linear8bitLt)
    assert isinstance(quantized.fusion.encoders["text"].encoder.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    assert isinstance(quantized.fusion.encoders["audio"].projection, bnb.nn.Linear8bitLt)
    assert type(quantized.classifier) is torch.nn.Linear
    assert quantized.classifier.weight.dtype == torch.float32
    assert quantized.fusion.final_norm.weight.dtype == torch.float32
    assert quantized.get_memory_footprint() < 0.7 * model.get_memory_footprint()
    inputs = random_inputs(4)
    with torch.no_grad():
        reference, approximate = model(**inputs).logits, quantized(**inputs).logits
    assert (reference - approximate).abs().max() < 0.05 * reference.abs().max() + 1e-3


def test_from_encoders_loads_pretrained_weights(tmp_path):
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=32))
    bert.save_pretrained(tmp_path / "text-encoder")
    model = FusionForClassification.from_encoders(text=str(tmp_path / "text-encoder"), hidden_size=32, num_attention_heads=4,
                                      id2label={0: "a", 1: "b"})
    assert model.config.text_config.vocab_size == 120
    loaded = model.fusion.encoders["text"].encoder.embeddings.word_embeddings.weight
    torch.testing.assert_close(loaded, bert.embeddings.word_embeddings.weight)
    out = model(input_ids=torch.randint(0, 120, (2, 6)))
    assert out.logits.shape == (2, 2)


def test_8bit_convnext_with_outlier_activations(tmp_path):
    """ConvNeXt's pointwise layers take (B, H, W, C); with activations above bitsandbytes' outlier threshold its
    own code fails on such inputs unless they are flattened (`flatten_8bit_inputs`)."""
    from transformers import BitsAndBytesConfig

    convnext = {"model_type": "convnext", "num_channels": 1, "patch_size": 4, "num_stages": 2,
                "hidden_sizes": [16, 32], "depths": [1, 1], "layer_scale_init_value": 0.0}
    torch.manual_seed(0)
    model = FusionForClassification(tiny_config(image_config=convnext)).eval()
    with torch.no_grad():
        model.fusion.encoders["image"].encoder.embeddings.layernorm.weight.mul_(20.0)  # activations well above 6
    model.save_pretrained(tmp_path)
    quantized = FusionForClassification.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="auto", dtype=torch.float32
    ).eval()
    pixels = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        reference, approximate = model(pixel_values=pixels).logits, quantized(pixel_values=pixels).logits
    assert approximate.shape == (2, 10)
    assert (reference - approximate).abs().max() < 0.1 * reference.abs().max() + 1e-2


def test_base_model_returns_summary_and_pooled_embeddings_and_the_head_reads_the_summary(model):
    inputs = random_inputs(3, text_length=7)
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        out = model(**inputs, audio_mask=mask)
        base = model.fusion(**inputs, audio_mask=mask)
    assert base.logits is None and base.loss is None
    assert base.summary.shape == (3, 32) and base.last_hidden_state.shape == (3, 74, 32)
    torch.testing.assert_close(out.logits, model.classifier(base.summary))
    assert set(base.modality_embeds) == {"image", "text", "audio"}
    assert all(e.shape == (3, 32) for e in base.modality_embeds.values())
    assert base.modality_embeds["audio"][1].abs().max() == 0  # the item without audio has no audio embedding
    # An item's embedding of one modality is its own: the same whatever else it (or its batch) carries.
    with torch.no_grad():
        alone = model.fusion(pixel_values=inputs["pixel_values"][:1])
    torch.testing.assert_close(alone.modality_embeds["image"][0], base.modality_embeds["image"][0], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_base_and_head_load_into_each_other(model, tmp_path):
    model.save_pretrained(tmp_path / "head")
    base = FusionModel.from_pretrained(tmp_path / "head").eval()
    assert torch.equal(base.summary_token, model.fusion.summary_token)
    base.save_pretrained(tmp_path / "base")
    head = FusionForClassification.from_pretrained(tmp_path / "base")
    assert torch.equal(head.fusion.layers[0].attention.query.weight, model.fusion.layers[0].attention.query.weight)


def test_a_checkpoint_written_before_the_head_split_loads_unchanged(model, tmp_path):
    """Earlier checkpoints (the shipped one among them) name the base model's weights without the `fusion.` prefix."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("fusion."): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    assert not any(k.startswith("fusion.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = FusionForClassification.from_pretrained(tmp_path).eval()
    inputs = random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits, rtol=0, atol=0)
