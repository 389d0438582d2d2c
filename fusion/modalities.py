"""The one place that knows what a modality is: its name, the tensors that carry it, its slot in the fused
sequence, and how its encoder's tokens map back onto the input.

Adding a modality (video, tabular) is a new `Modality` entry here (its tensors, token grid, default encoder and
processor), its tensors in `FusionModel.forward`'s signatures, its picture in render.py and its component in
app.py, plus its processor; everything else (the config's sub-configs, the composed processor and its saved
settings, the model's loop over modalities, batching, masks, subset names, explanations' grids, a token's
place on its input) reads this registry. docs/adding-a-modality.md walks through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .feature_extraction import FusionFeatureExtractor
from .image_processing import FusionImageProcessor
from .processor_base import ModalityProcessor
from .tokenization import FusionTextProcessor


@dataclass(frozen=True)
class Modality:
    """One input modality.

    Args:
        name (`str`): `image`, `text`, `audio`; also the item key users pass and `{name}_config` in the config.
        inputs (`tuple[str, ...]`): the batch tensors that carry it, the encoder's main input first
            (`("input_ids", "attention_mask")` for text).
        grid (`str`): how its tokens map back onto the input: `spatial` (a 2-D grid over pixels or spectrogram
            cells, relevance also weighted by gradient × input) or `sequence` (one score per token, mapped to text
            pieces by their offsets).
        processor (`type`): its processor class: `Settings` (the dataclass of its constants, saved under its name in
            `processor_config.json`), `from_settings`, `from_pretrained`, `save_pretrained`, `prepare` and `stack`
            (see `FusionImageProcessor`).
        encoder (`Mapping[str, Any]`): the default encoder sub-config (`model_type` and its arguments) of a
            `FusionConfig` built without one.
        extras (`tuple[str, ...]`): batch tensors beside `inputs` that the model reads but the encoder does not,
            present when the processor measured them (the audio's `audio_pitch`).
    """

    name: str
    inputs: tuple[str, ...]
    grid: str
    processor: type[ModalityProcessor]
    encoder: Mapping[str, Any] = field(default_factory=dict, compare=False)
    extras: tuple[str, ...] = ()

    @property
    def main_input(self) -> str:
        return self.inputs[0]

    @property
    def mask(self) -> str:
        """The batch tensor (B,) bool saying which items carry this modality."""
        return f"{self.name}_mask"

    @property
    def embedding_index(self) -> int:
        """Its row of the model's modality embeddings (row 0 tags the summary token)."""
        return MODALITIES.index(self.name) + 1

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every batch tensor of this modality, presence mask included."""
        return (*self.inputs, *self.extras, self.mask)


# The fused sequence's order (summary, image, text, audio) and the rows of the modality embeddings: fixed by
# the checkpoints, so a new modality is appended.
REGISTRY: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("image", ("pixel_values",), grid="spatial", processor=FusionImageProcessor, encoder={
            # a small ResNet on 1×28×28
            "model_type": "resnet", "num_channels": 1, "embedding_size": 32, "hidden_sizes": [32, 64],
            "depths": [1, 1], "layer_type": "basic", "downsample_in_first_stage": False,
        }),
        Modality("text", ("input_ids", "attention_mask"), grid="sequence", processor=FusionTextProcessor, encoder={
            # a 2-layer BERT
            "model_type": "bert", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 64,
        }),
        Modality("audio", ("audio_values",), grid="spatial", processor=FusionFeatureExtractor, encoder={
            # a small Audio Spectrogram Transformer over 32 mel bins × 100 frames
            "model_type": "audio-spectrogram-transformer", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "num_mel_bins": 32, "max_length": 100,
            "patch_size": 8, "frequency_stride": 8, "time_stride": 8,
        }, extras=("audio_pitch",)),
    )
}
MODALITIES: tuple[str, ...] = tuple(REGISTRY)

# Names of subsets (`image+audio+text`, in evaluation reports, training logs and model cards) list modalities
# in this order, which predates the registry; it is kept so that those keys stay comparable. Modalities added later
# follow in registry order.
NAME_ORDER: tuple[str, ...] = ("image", "audio", "text")
NAME_ORDER += tuple(m for m in MODALITIES if m not in NAME_ORDER)

# Precisions a checkpoint loads in; `auto` is 8-bit on a CUDA GPU and fp32 on a CPU.
PRECISIONS: tuple[str, ...] = ("auto", "int8", "fp16", "bf16", "fp32")
HALF_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")


def modality(name: str) -> Modality:
    """The registry entry of `name`, or a `ValueError` naming the known modalities."""
    if name not in REGISTRY:
        raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}")
    return REGISTRY[name]


def subset_key(subset: Iterable[str]) -> str:
    """The name of a set of modalities, e.g. `image+audio+text`."""
    chosen = set(subset)
    return "+".join(m for m in NAME_ORDER if m in chosen)


def subsets(modalities: Iterable[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of `modalities`, smallest first, each in the order given."""
    ordered = list(modalities)
    return [s for r in range(1, len(ordered) + 1) for s in itertools.combinations(ordered, r)]


SUBSET_KEYS: list[str] = [subset_key(s) for s in subsets(NAME_ORDER)]
