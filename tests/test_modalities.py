import pytest

from fusion.modalities import (
    MODALITIES,
    REGISTRY,
    SUBSET_KEYS,
    modality,
    subset_key,
    subsets,
)


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
