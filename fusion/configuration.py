"""`FusionConfig`: one sub-config per modality plus the fusion Transformer's sizes and labels."""

from __future__ import annotations

from typing import cast

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from .modalities import MODALITIES, REGISTRY
from .modalities import modality as modality_entry


class FusionConfig(PretrainedConfig):
    """Configuration of a [`FusionModel`] and its heads: which encoder reads each modality and how they are fused.

    Each modality's encoder is any `transformers` encoder that `AutoModel` can build (a ResNet or ViT for images,
    a BERT-style model for text, an Audio Spectrogram Transformer or a ResNet over log-mel features for audio),
    so a pretrained encoder of the same family can replace it.

    Args:
        image_config, text_config, audio_config (`dict` or `PretrainedConfig`): the encoder of each modality (one
            `{name}_config` per entry of `fusion.modalities.REGISTRY`), by default the registry's: a small ResNet
            on 1×28×28, a 2-layer BERT, a small AST over the log-mel spectrogram.
        hidden_size (`int`): width of the fusion Transformer that every modality is projected to.
        num_hidden_layers (`int`): number of fusion layers (self-attention over all present modalities' tokens).
        num_attention_heads (`int`): heads per fusion layer; must divide `hidden_size`.
        intermediate_size (`int`): width of each fusion layer's MLP.
        hidden_dropout_prob (`float`): dropout after attention and MLP, in [0, 1).
        attention_dropout (`float`): dropout on attention weights, in [0, 1).
        layer_norm_eps (`float`): epsilon of the fusion layer norms.
        initializer_range (`float`): standard deviation of the fusion layers' initial weights.
        embedding_size (`int` or `None`): width of the shared embedding space (each modality alone, projected
            and normalised, so that inputs of any modalities compare by cosine); None: no embedding head.
        int8_skip_modules (`list[str]`): modules, named under the base model as `pruned` is (e.g.
            `"encoders.audio"`), whose layers stay in full precision when the model is loaded in 8-bit, for parts
            whose answers int8 weights move too far; None: every eligible linear layer becomes int8.
        pruned (`dict[str, int]`): blocks made smaller by `fusion.compress prune`: each block's module name under
            the base model and how many attention heads or MLP channels it kept; None: nothing pruned.
        audio_views (`list[float]`): besides the spectrogram as given, the frequency scales at which a clip is also
            heard (0.85: every frequency, formants and pitch, 15% lower, as a larger vocal tract would say it);
            each clip is answered at the scale that is surest of the class the scales agree on (see
            `FusionForClassification.audio_view`). None or empty: as given only.
        audio_views_below (`float` or `None`): only a clip whose answer as given has a top probability below this
            tries the views; a surer one is heard as given. None: every clip tries them.
        audio_views_pitch_above (`float` or `None`): with it, a clip whose voice pitch is known (the processor's
            `audio_pitch`) tries the views when that pitch is above this many Hz, and only then, whatever its
            answer's confidence; `audio_views_below` decides for clips without a known pitch.
        audio_views_frequencies (`list[float]` or `None`): the centre frequency in Hz of each mel bin of the
            spectrograms the model reads (`feature_extraction.mel_frequencies`); with it a view scales frequencies in
            Hz, as a pitch shift does, instead of stretching the mel axis.
        id2label (`dict[int, str]`): the classes; at least two.

    Example:
        ```python
        >>> config = FusionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                       id2label={i: str(i) for i in range(10)})
        >>> config.num_labels
        10
        ```
    """

    model_type = "fusion"
    # One `{name}_config` per registered modality, its default encoder from the registry. They are not declared as
    # fields, so that a new modality needs no change here: `__post_init__` takes them from the keyword arguments.
    sub_configs_defaults = {
        f"{m.name}_config": SubConfigSpec(config_class=AutoConfig, model_type=m.encoder["model_type"],
                                          init_kwargs={k: v for k, v in m.encoder.items() if k != "model_type"})
        for m in REGISTRY.values()
    }

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    embedding_size: int | None = None
    int8_skip_modules: list[str] | None = None
    pruned: dict[str, int] | None = None
    audio_views: list[float] | None = None
    audio_views_below: float | None = None
    audio_views_pitch_above: float | None = None
    audio_views_frequencies: list[float] | None = None

    def __post_init__(self, **kwargs):
        for key in self.sub_configs_defaults:  # read by the parent's sub-config step as attributes
            setattr(self, key, kwargs.pop(key, getattr(self, key, None)))
        super().__post_init__(**kwargs)
        self.validate_fusion()

    def validate_fusion(self) -> None:
        """Raise a `ValueError` that names the field, what it must be and what it is."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FusionConfig.{name} must be a positive integer, got {value!r}")
        if self.embedding_size is not None and (not isinstance(self.embedding_size, int) or isinstance(self.embedding_size, bool)
                                                or self.embedding_size < 1):
            raise ValueError(f"FusionConfig.embedding_size must be a positive integer or None, got {self.embedding_size!r}")
        skip = self.int8_skip_modules
        if skip is not None and not (isinstance(skip, list) and all(isinstance(name, str) and name for name in skip)):
            raise ValueError(f"FusionConfig.int8_skip_modules must be a list of module names, got {skip!r}")
        if self.pruned is not None and not (isinstance(self.pruned, dict) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in self.pruned.items())):
            raise ValueError(f"FusionConfig.pruned must map module names to positive unit counts, got {self.pruned!r}")
        views = self.audio_views
        if views is not None and not (isinstance(views, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0.5 <= v <= 2.0 and v != 1.0 for v in views)):
            raise ValueError("FusionConfig.audio_views must be a list of frequency scales in [0.5, 2] other than 1 "
                             f"(the clip as given is always heard), got {views!r}")
        below = self.audio_views_below
        if below is not None and (not isinstance(below, (int, float)) or isinstance(below, bool) or not 0 < below <= 1):
            raise ValueError(f"FusionConfig.audio_views_below must be a probability in (0, 1] or None, got {below!r}")
        above = self.audio_views_pitch_above
        if above is not None and (not isinstance(above, (int, float)) or isinstance(above, bool) or not 0 < above < 10_000):
            raise ValueError(f"FusionConfig.audio_views_pitch_above must be a pitch in Hz (0 to 10,000) or None, got {above!r}")
        frequencies = self.audio_views_frequencies
        if frequencies is not None and not (isinstance(frequencies, list) and len(frequencies) >= 2 and all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in frequencies)
                and all(a < b for a, b in zip(frequencies, frequencies[1:]))):
            raise ValueError("FusionConfig.audio_views_frequencies must list each mel bin's centre frequency in Hz, "
                             f"positive and rising, or be None; got {frequencies!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"FusionConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"FusionConfig.{name} must be in [0, 1), got {value!r}")
        if self.id2label is not None and len(self.id2label) < 2:
            raise ValueError(f"FusionConfig.id2label needs at least 2 classes, got {len(self.id2label)}")
        for modality in MODALITIES:
            sub = self.modality_config(modality)
            if sub.model_type not in MODEL_MAPPING_NAMES:
                raise ValueError(
                    f"FusionConfig.{modality}_config has model_type {sub.model_type!r}, which AutoModel cannot build; "
                    "use an encoder family such as 'bert', 'vit', 'resnet' or 'audio-spectrogram-transformer'"
                )

    @property
    def class_names(self) -> list[str]:
        """The classes' names in index order (`id2label` as a list)."""
        id2label = cast(dict[int, str], self.id2label or {})
        return [str(id2label[i]) for i in range(len(id2label))]

    def modality_config(self, modality: str) -> PretrainedConfig:
        """The encoder config of `modality` (one of `MODALITIES`)."""
        return getattr(self, f"{modality_entry(modality).name}_config")
