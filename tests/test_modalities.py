import pytest

from fusion import FusionConfig
from fusion.feature_extraction import AudioSettings
from fusion.modalities import (
    MODALITIES,
    NAME_ORDER,
    REGISTRY,
    SUBSET_KEYS,
    modality,
    subset_key,
    subsets,
)
from fusion.processing import FusionInputError, ProcessorSettings


def test_registry_names_every_tensor_of_each_modality():
    assert MODALITIES == ("image", "text", "audio")
    assert REGISTRY["text"].tensors == ("input_ids", "attention_mask", "text_mask")
    assert [REGISTRY[m].embedding_index for m in MODALITIES] == [1, 2, 3]  # row 0 tags the summary token
    with pytest.raises(ValueError, match="unknown modality 'video'; expected one of image, text, audio"):
        modality("video")


def test_subset_names_keep_their_reported_order():
    assert subset_key(["text", "audio", "image"]) == "image+audio+text"
    assert SUBSET_KEYS == ["image", "audio", "text", "image+audio", "image+text", "audio+text", "image+audio+text"]
    assert subsets(["text", "image"]) == [("text",), ("image",), ("text", "image")]  # in the order given


def test_each_entry_brings_its_processor_and_default_encoder():
    config = FusionConfig()
    for name, entry in REGISTRY.items():
        assert entry.processor.modality == name
        assert config.modality_config(name).model_type == entry.encoder["model_type"]
    assert config.modality_config("image").hidden_sizes == [32, 64]  # the registry's defaults, not the family's
    assert set(NAME_ORDER) == set(MODALITIES)


def test_processor_settings_are_keyed_by_modality_and_refuse_strangers(processor):
    settings = ProcessorSettings(audio=AudioSettings(sampling_rate=16000))
    assert settings.audio.sampling_rate == 16000 and settings.of("image").size == 28
    again = ProcessorSettings.from_dict(settings.to_dict())
    assert again.to_dict() == settings.to_dict() and set(again.to_dict()) == set(MODALITIES)
    with pytest.raises(ValueError, match=r"unknown modalities \['video'\]"):
        ProcessorSettings(video=object())
    with pytest.raises(FusionInputError, match=r"unknown AudioSettings keys \['rate'\]"):
        ProcessorSettings.from_dict({"audio": {"rate": 8000}})
    # the composed processor and its parts share one settings object per modality
    for name, part in processor.parts.items():
        assert processor.settings.of(name) is part.settings

