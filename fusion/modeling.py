"""The fusion Transformer, top to bottom: attention, layer, modality encoders, the base `FusionModel` and its
classification head `FusionForClassification`.

Shape legend: B batch, N fused tokens, T tokens of one modality, H heads, D head width, C channels,
E an encoder's width, F fusion width (`config.hidden_size`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import ModelOutput

from .configuration import FusionConfig
from .modalities import MODALITIES, REGISTRY


class FusionAttention(nn.Module):
    """Multi-head self-attention with explicit `nn.Linear` projections, so bitsandbytes can swap them for 8-bit."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_dropout

    def forward(
        self, hidden: torch.Tensor, *, key_mask: torch.Tensor, output_attentions: bool, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every token attends to the allowed keys; with `queries`, only the first `queries` tokens ask (their
        outputs are all that is returned), which is all a last layer that feeds only the summary token needs."""
        batch, _, width = hidden.shape
        asking = hidden if queries is None else hidden[:, :queries]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

        query, key, value = heads(self.query(asking)), heads(self.key(hidden)), heads(self.value(hidden))
        allowed = key_mask[:, None, None, :]  # (B, 1, 1, N): True where a key may be attended to
        dropout = self.dropout if self.training else 0.0
        if output_attentions:
            # The explicit path: the weights are returned (and can carry gradients for relevance).
            scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, N, N)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = scores.float().softmax(dim=-1).to(query.dtype)
            context = F.dropout(weights, p=dropout, training=self.training) @ value  # (B, H, N, D)
        else:
            weights = None
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch, asking.shape[1], width)  # (B, N, F)
        return self.output(context), weights


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask, on the CPU, comes from 16 random bits per element: PyTorch's CPU dropout draws a
    Bernoulli per element and took 12 ms of a fusion layer's 80 ms forward in training here (64 items × 118 tokens
    × 128); this takes 4 ms. The drop chance is rounded to 1/65536; elsewhere it is `nn.Dropout`."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or hidden.device.type != "cpu":
            return super().forward(hidden)
        # int64 draws over the full range (the default range leaves the top bit 0), read as four int16 each.
        count = hidden.numel()
        bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.int16)[:count].view(hidden.shape) >= round(self.p * 65536) - 32768
        return hidden * keep * (1.0 / (1.0 - self.p))


class FusionMLP(nn.Module):
    def __init__(self, config: FusionConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(hidden))))


class FusionLayer(nn.Module):
    """Pre-norm Transformer layer over the concatenated tokens of all present modalities."""

    def __init__(self, config: FusionConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = FusionAttention(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FusionMLP(config)

    def forward(
        self, hidden: torch.Tensor, *, key_mask: torch.Tensor, output_attentions: bool, queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output for every token, or for the first `queries` tokens only (see `FusionAttention`)."""
        attended, weights = self.attention(self.attention_norm(hidden), key_mask=key_mask,
                                           output_attentions=output_attentions, queries=queries)
        hidden = (hidden if queries is None else hidden[:, :queries]) + self.dropout(attended)
        return hidden + self.mlp(self.mlp_norm(hidden)), weights


def encoder_width(config: PretrainedConfig) -> int:
    """Width of the token features an encoder built from `config` emits."""
    if getattr(config, "hidden_sizes", None):  # ResNet-style: channels of the last stage
        return config.hidden_sizes[-1]
    return config.hidden_size


def warp_frequencies(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Spectrograms (B, mel, frames) with their frequency axis stretched by `scale` (below 1: every frequency
    lower, as a longer vocal tract says it): bins beyond the top are dropped, missing ones repeat the top bin.
    Linear in `features`, so gradients (and relevance) flow back to the spectrogram as given."""
    batch, mel, frames = features.shape
    size = (max(1, round(mel * scale)), frames)
    warped = F.interpolate(features[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, mel', frames)
    if warped.shape[1] >= mel:
        return warped[:, :mel]
    return torch.cat([warped, warped[:, -1:].expand(batch, mel - warped.shape[1], frames)], dim=1)


def scale_frequencies(features: torch.Tensor, scale: float, frequencies: list[float]) -> torch.Tensor:
    """Spectrograms (B, mel, frames) whose mel bins are centred at `frequencies` (Hz), with every frequency scaled
    by `scale` in Hz, as a pitch shift scales them (below 1: content at f moves down to scale·f); each bin reads
    the spectrogram as given between its two nearest bins. Bins whose source lies beyond the top repeat the top bin,
    below the bottom the bottom one. Linear in `features`, so gradients (and relevance) flow back to the spectrogram
    as given."""
    centres = np.asarray(frequencies, dtype=np.float64)
    if features.shape[1] != len(centres):
        raise ValueError(f"the spectrograms have {features.shape[1]} mel bins but audio_views_frequencies names {len(centres)}")
    position = np.interp(centres / scale, centres, np.arange(len(centres)))  # fractional source bin of each bin
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(centres) - 1)
    weight = torch.tensor(position - low, dtype=features.dtype, device=features.device)[None, :, None]  # (1, mel, 1)
    low_t, high_t = (torch.from_numpy(i).to(features.device) for i in (low, high))
    return features[:, low_t] * (1 - weight) + features[:, high_t] * weight


# Families whose `AutoModel` is an encoder-decoder: only their encoder is built.
ENCODER_ONLY = {"whisper": WhisperEncoder}


class ModalityEncoder(nn.Module):
    """Any `AutoModel` encoder (or the encoder of an encoder-decoder family such as Whisper) plus a projection of
    its tokens to the fusion width.

    Convolutional encoders' feature maps become one token per spatial cell. Spectrograms arrive as
    (B, mel, frames) and are laid out as the encoder expects: (B, frames, mel) for an Audio Spectrogram
    Transformer, as they are for Whisper, a one-channel image (B, 1, mel, frames) for convolutional or vision
    encoders.
    """

    def __init__(self, config: PretrainedConfig, fusion_width: int):
        super().__init__()
        # Eager attention so that explanations can read (and differentiate) every encoder attention map;
        # these encoders are small, so the fused layers' SDPA path is where speed matters.
        self.encoder: PreTrainedModel
        if config.model_type in ENCODER_ONLY:
            self.encoder = ENCODER_ONLY[config.model_type]._from_config(config, attn_implementation="eager")
        else:
            self.encoder = AutoModel.from_config(config, attn_implementation="eager")
        pooler = getattr(self.encoder, "pooler", None)
        if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
            setattr(self.encoder, "pooler", None)  # unused, and unused parameters break distributed training
        self.projection = nn.Linear(encoder_width(config), fusion_width)

    def features(
        self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The encoder's token features (B, T, E) before the projection, and its attentions when asked and
        available. Spectrograms (B, mel, frames) are laid out as the encoder expects."""
        main_input = self.encoder.main_input_name
        kwargs: dict[str, torch.Tensor | bool | None] = {}
        if main_input == "input_ids":
            kwargs["attention_mask"] = attention_mask
        elif inputs.dim() == 3 and main_input == "input_values":
            inputs = inputs.transpose(1, 2)  # (B, frames, mel)
        elif inputs.dim() == 3 and main_input != "input_features":  # Whisper reads (B, mel, frames) as given
            inputs = inputs.unsqueeze(1)  # (B, 1, mel, frames)
        if output_attentions and self.encoder.config._attn_implementation == "eager":
            kwargs["output_attentions"] = True
        outputs = self.encoder(**{main_input: inputs}, **kwargs)
        features = outputs.last_hidden_state
        if features.dim() == 4:
            features = features.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        return features, getattr(outputs, "attentions", None)

    def forward(
        self, inputs: torch.Tensor, *, attention_mask: torch.Tensor | None, output_attentions: bool,
        precomputed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Returns tokens (B, T, F), their mask (B, T) and the encoder's attentions when asked and available.

        With `precomputed`, `inputs` are already `features(...)` of the input (B, T, E): training with a frozen
        encoder computes them once per clip instead of once per step, and evaluation once per clip.
        """
        features, attentions = (inputs, None) if precomputed else self.features(
            inputs, attention_mask=attention_mask, output_attentions=output_attentions)
        tokens = self.projection(features)  # (B, T, F)
        if attention_mask is None:
            attention_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, attention_mask.bool(), attentions


@dataclass
class FusionOutput(ModelOutput):
    """What [`FusionModel.forward`] and [`FusionForClassification.forward`] return, whatever was asked.

    Args:
        loss (`torch.FloatTensor` of shape `()`): cross-entropy, when a head was given `labels`.
        logits (`torch.FloatTensor` of shape `(B, num_labels)`): the classification head's, `None` from the base model.
        summary (`torch.FloatTensor` of shape `(B, F)`): the final summary token, what a head reads.
        modality_embeds (`dict[str, torch.FloatTensor]`): per modality, `(B, F)` the mean of its projected tokens
            before fusion (zeros for items without it): an embedding of each input on its own, for heads that
            compare modalities (retrieval).
        last_hidden_state (`torch.FloatTensor` of shape `(B, N, F)`): every fused token after the fusion layers.
        fusion_attentions (`tuple` of `(B, H, N, N)` tensors): one per fusion layer, with `output_attentions=True`.
        encoder_attentions (`dict[str, tuple]`): each attention encoder's own attentions (over the items that have
            the modality), with `output_attentions=True`.
        modality_spans (`dict[str, tuple[int, int]]`): `[start, end)` of each modality's tokens in the fused sequence;
            token 0 is the fusion summary token.
        token_mask (`torch.BoolTensor` of shape `(B, N)`): which fused tokens are real for each item.
        modality_mask (`dict[str, torch.BoolTensor]`): per modality, which items of the batch carried it.
        encoded (`torch.FloatTensor` of shape `(B, N, F)`): the fused sequence before the fusion layers (summary
            token and every modality's projected tokens), for `fuse` over a subset of them.
        audio_scales (`torch.FloatTensor` of shape `(B,)`): the frequency scale each item's audio was heard at
            (`config.audio_views`; 1 for the spectrogram as given and for items without audio); None when the
            model has no views or was given the audio encoder's states.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    summary: torch.Tensor | None = None
    modality_embeds: dict[str, torch.Tensor] | None = None
    last_hidden_state: torch.Tensor | None = None
    fusion_attentions: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: dict[str, tuple[torch.Tensor, ...]] | None = None
    modality_spans: dict[str, tuple[int, int]] | None = None
    token_mask: torch.Tensor | None = None
    modality_mask: dict[str, torch.Tensor] | None = None
    encoded: torch.Tensor | None = None
    audio_scales: torch.Tensor | None = None


class AudioView(NamedTuple):
    """How `FusionForClassification.audio_view` hears a batch of spectrograms.

    Args:
        values (`(B, mel, frames)`): each spectrogram at its chosen view.
        scales (`(B,)`): the frequency scale of each view (1: as given, and for items without audio).
        states (`(B, T, E)` or None): the audio encoder's output for `values` (zeros for items without audio), when
            the choice already computed it in the form the caller asked for (with gradients when they are on).
        attentions (`tuple` or None): the encoder's attentions over the items with audio, with `states`, when asked.
    """

    values: torch.Tensor
    scales: torch.Tensor
    states: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def flatten_8bit_inputs(model: nn.Module) -> None:
    """Let every bitsandbytes 8-bit linear layer take inputs of any rank.

    bitsandbytes 0.50 flattens 3-D inputs only, and its outlier path fails on the (B, H, W, C) inputs of
    ConvNeXt's pointwise layers. A wrapped layer sees them as (B·H·W, C). Each call keeps its shape in its own
    frame, so concurrent calls cannot mix shapes up.
    """
    for module in model.modules():
        if type(module).__name__ != "Linear8bitLt" or getattr(module, "_fusion_flattened", False):
            continue
        forward = module.forward

        def flat_forward(x: torch.Tensor, forward=forward) -> torch.Tensor:
            if x.dim() <= 3:
                return forward(x)
            return forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

        # A bitsandbytes layer found by name: set through setattr, as its class is not imported here.
        setattr(module, "forward", flat_forward)
        setattr(module, "_fusion_flattened", True)


@dataclass(frozen=True)
class PrunableBlock:
    """Units that can be removed together: an attention block's heads or an MLP's hidden channels.

    Args:
        path (`str`): the block's module name under the base [`FusionModel`]: the attention module for heads
            (`encoders.audio.encoder.layers.0.self_attn`), the layer or MLP that holds both linear layers for
            channels (`encoders.audio.encoder.layers.0`, `layers.0.mlp`).
        kind (`str`): `heads` or `width`.
        inputs (`tuple[str, ...]`): the linear layers (under `path`) whose output rows make the units.
        output (`str`): the linear layer whose input columns take them.
        unit (`int`): rows per unit (the head size; 1 for a channel).
        count (`int`): how many units the block has now.
    """

    path: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    unit: int
    count: int


# Layouts of the blocks that can be pruned, found by their layers' names: attention with q/k/v/out projections
# (Whisper, ViT, AST), BERT's self/output split, and MLPs as Whisper/ViT (fc1, fc2), BERT (intermediate, output),
# ConvNeXt (pwconv1, pwconv2) and the fusion layers (up, down) name them. The fusion layers' attention heads are
# not pruned: the app lets a person pick one, the same in every layer.
_LAYOUTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("heads", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    ("heads", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    ("heads", ("self.query", "self.key", "self.value"), "output.dense"),
    ("width", ("fc1",), "fc2"),
    ("width", ("intermediate.dense",), "output.dense"),
    ("width", ("pwconv1",), "pwconv2"),
    ("width", ("up",), "down"),
)


def _head_owner(module: nn.Module) -> nn.Module:
    """The module that holds the head count (BERT keeps it on its `self` part)."""
    return cast(nn.Module, getattr(module, "self", module))


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    try:
        found = module.get_submodule(name)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Linear) else None


def prunable_blocks(model: FusionModel) -> list[PrunableBlock]:
    """Every block of `model`'s encoders and fusion layers whose heads or channels can be removed (one per module:
    the first layout that fits it)."""
    blocks = []
    for path, module in model.named_modules():
        for kind, inputs, output in _LAYOUTS:
            first = _linear(module, inputs[0])
            if first is None or not all(_linear(module, name) for name in (*inputs[1:], output)):
                continue
            if kind == "heads":
                owner = _head_owner(module)
                heads = getattr(owner, "num_heads", None) or getattr(owner, "num_attention_heads")
                blocks.append(PrunableBlock(path, kind, inputs, output, first.out_features // heads, heads))
            else:
                blocks.append(PrunableBlock(path, kind, inputs, output, 1, first.out_features))
            break
    return blocks


def _sliced(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `layer` with only the rows (`dim` 0, outputs) or columns (`dim` 1, inputs) in `keep`."""
    weight = layer.weight.detach().index_select(dim, keep.to(layer.weight.device))
    sliced = nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(weight)
        if layer.bias is not None:
            bias = layer.bias.detach()
            cast(torch.Tensor, sliced.bias).copy_(bias.index_select(0, keep.to(bias.device)) if dim == 0 else bias)
    return sliced


def prune_block(model: FusionModel, block: PrunableBlock, keep: list[int]) -> None:
    """Keep only the units `keep` (indices into the block's current units) of `block`, in their order; the
    removed units' weights are gone, and `model.config.pruned` records the new count."""
    if not keep or len(set(keep)) != len(keep) or not all(0 <= k < block.count for k in keep):
        raise ValueError(f"{block.path}: keep must be distinct unit indices in 0..{block.count - 1}, got {keep}")
    module = model.get_submodule(block.path)
    rows = torch.tensor([k * block.unit + r for k in keep for r in range(block.unit)])
    for name, dim in [(name, 0) for name in block.inputs] + [(block.output, 1)]:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent)  # "" is the module itself
        setattr(owner, leaf, _sliced(cast(nn.Linear, owner.get_submodule(leaf)), rows, dim))
    if block.kind == "heads":
        heads = _head_owner(module)
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(heads, name):
                setattr(heads, name, len(keep))
        if hasattr(heads, "all_head_size"):
            setattr(heads, "all_head_size", len(keep) * block.unit)
    model.config.pruned = {**(model.config.pruned or {}), block.path: len(keep)}


def _apply_pruned_sizes(model: FusionModel) -> None:
    """Give the blocks that `config.pruned` names their kept sizes, so that a pruned checkpoint's weights fit."""
    wanted = dict(model.config.pruned or {})
    if not wanted:
        return
    blocks = {b.path: b for b in prunable_blocks(model)}
    unknown = sorted(set(wanted) - set(blocks))
    if unknown:
        raise ValueError(f"FusionConfig.pruned names blocks this model does not have: {unknown}")
    for path, count in wanted.items():
        if count != blocks[path].count:
            prune_block(model, blocks[path], list(range(count)))


class FusionPreTrainedModel(PreTrainedModel):
    config: FusionConfig
    config_class = FusionConfig
    base_model_prefix = "fusion"
    main_input_name = "input_ids"
    _no_split_modules = ["FusionLayer", "ModalityEncoder"]
    # Kept out of 8-bit replacement: the head is small and decides the answer.
    _keep_in_fp32_modules = ["classifier", "embedding_head"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, and in 8-bit the encoders' layers made to take any input rank.

        In 8-bit, the modules the checkpoint's `int8_skip_modules` names stay in full precision unless the
        caller's `BitsAndBytesConfig` sets `llm_int8_skip_modules` itself. Checkpoints of the base model and of
        any head load into each other: weights named without the `fusion.` prefix (checkpoints written before
        the heads were split off) are matched by transformers."""
        quantization = kwargs.get("quantization_config")
        if getattr(quantization, "load_in_8bit", False) and quantization.llm_int8_skip_modules is None and args:
            config = kwargs.get("config")
            if not isinstance(config, FusionConfig):
                config = kwargs["config"] = FusionConfig.from_pretrained(args[0])  # read once, passed on
            if config.int8_skip_modules:
                # The names are under the base model; a head model holds it as `fusion`.
                prefix = "" if issubclass(cls, FusionModel) else f"{cls.base_model_prefix}."
                quantization = copy.deepcopy(quantization)
                quantization.llm_int8_skip_modules = [prefix + name for name in config.int8_skip_modules]
                kwargs["quantization_config"] = quantization
        model = super().from_pretrained(*args, **kwargs)
        flatten_8bit_inputs(model)
        return model

    @classmethod
    def from_encoders(
        cls,
        *,
        image: str | None = None,
        text: str | None = None,
        audio: str | None = None,
        **config_kwargs,
    ):
        """Build a model whose encoders start from pretrained checkpoints (local folders or hub ids).

        Modalities not named get the default encoders of `FusionConfig`; `config_kwargs` set the fusion sizes
        and labels (`hidden_size=`, `id2label=`, ...).
        """
        sources = {"image": image, "text": text, "audio": audio}
        sub_configs = {f"{m}_config": AutoConfig.from_pretrained(src) for m, src in sources.items() if src}
        model = cls(FusionConfig(**sub_configs, **config_kwargs))
        for name, source in sources.items():
            if source:
                pretrained = AutoModel.from_pretrained(source)
                if model.config.modality_config(name).model_type in ENCODER_ONLY:
                    pretrained = pretrained.get_encoder()  # e.g. Whisper: the encoder of a speech recogniser
                encoder = cast(FusionModel, model.base_model).encoder_of(name).encoder
                missing, _ = encoder.load_state_dict(pretrained.state_dict(), strict=False)
                if missing:
                    raise ValueError(f"the {name} encoder at {source!r} lacks weights the model needs: {missing[:5]}")
        return model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FusionModel):
            nn.init.normal_(module.summary_token, std=self.config.initializer_range)


class FusionModel(FusionPreTrainedModel):
    """Fuses any non-empty subset of image, text and audio with self-attention over all their tokens; the base
    model that task heads sit on.

    Each present modality is encoded by its own encoder, projected to the fusion width and tagged with a
    learned modality embedding; a summary token is prepended and the fusion layers attend across everything.
    A modality an item lacks contributes no attendable token: its slots are masked out, and a modality no
    item of the batch carries has no slots at all. It returns the final summary token and each modality's
    pooled embedding; [`FusionForClassification`] puts a classifier on the summary.

    Args:
        config (`FusionConfig`): the encoders and fusion sizes.

    Example:
        ```python
        >>> model = FusionModel(FusionConfig(hidden_size=32, num_attention_heads=4))
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=images)
        >>> out.summary.shape, out.modality_embeds["image"].shape, out.modality_spans
        (torch.Size([B, 32]), torch.Size([B, 32]), {'image': (1, 17), 'text': (17, 17 + T)})
        ```
    """

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(config.modality_config(m), config.hidden_size) for m in MODALITIES}
        )
        self.modality_embeddings = nn.Embedding(len(MODALITIES) + 1, config.hidden_size)  # row 0: summary
        self.summary_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList([FusionLayer(config) for _ in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        _apply_pruned_sizes(self)
        self.post_init()

    def encoder_of(self, modality: str) -> ModalityEncoder:
        """The encoder (and projection) of `modality`."""
        return cast(ModalityEncoder, self.encoders[modality])

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        audio_encoder_states: torch.Tensor | None = None,
        audio_pitch: torch.Tensor | None = None,
    ) -> FusionOutput:
        """
        Args:
            pixel_values (`(B, C, height, width)`): images; rows of items without an image are ignored.
            input_ids (`(B, T)`) and attention_mask (`(B, T)`): tokenised text.
            audio_values (`(B, mel, frames)`): log-mel spectrograms.
            image_mask, text_mask, audio_mask (`(B,)` bool): which items carry that modality; when a modality's
                tensor is given without its mask, every item carries it.
            output_attentions (`bool`): use the explicit attention path and return every attention map.
            audio_encoder_states (`(B, T, E)`): the audio encoder's output, in place of `audio_values`, when it was
                computed beforehand (training with a frozen audio encoder caches it per clip).
            audio_pitch (`(B,)`): each clip's voice pitch, as the processor's batches carry it; only
                `FusionForClassification`'s audio views read it, so the base model hears every clip as given.
        """
        if audio_encoder_states is not None and audio_values is not None:
            raise ValueError("give audio_values or audio_encoder_states, not both")
        given = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                 "audio_values": audio_values if audio_encoder_states is None else audio_encoder_states,
                 "image_mask": image_mask, "text_mask": text_mask, "audio_mask": audio_mask}
        out = self.encode(given, output_attentions=output_attentions, precomputed={"audio": audio_encoder_states is not None})
        assert out.encoded is not None and out.token_mask is not None
        hidden, attentions = self.fuse(out.encoded, out.token_mask, output_attentions=output_attentions)
        out.last_hidden_state, out.summary = hidden, hidden[:, 0]
        out.fusion_attentions = tuple(attentions) if output_attentions else None
        return out

    def encode(
        self, given: dict[str, torch.Tensor | None], *, output_attentions: bool = False,
        precomputed: dict[str, bool] | None = None,
    ) -> FusionOutput:
        """Encode every present modality and lay the tokens out as one sequence: `encoded`, `token_mask`,
        `modality_spans`, `modality_mask`, `modality_embeds` and (when asked) `encoder_attentions` of the output.

        `given` maps the registry's tensor names to tensors (or None); `precomputed[m]` says that modality `m`'s main
        input already holds its encoder's output (B, T, E)."""
        batch = next((tensor.shape[0] for m in MODALITIES if (tensor := given.get(REGISTRY[m].main_input)) is not None),
                     None)
        if batch is None:
            names = ", ".join(REGISTRY[m].main_input for m in MODALITIES)
            raise ValueError(f"FusionModel needs at least one of {names}")
        device = self.summary_token.device

        pieces, masks, spans, item_masks, pooled, encoder_attentions = [], [], {}, {}, {}, {}
        length = 1
        for name in MODALITIES:
            modality = REGISTRY[name]
            values = given.get(modality.main_input)
            if values is None:
                continue
            present = given.get(modality.mask)
            present = torch.ones(batch, dtype=torch.bool, device=device) if present is None else present.to(device).bool()
            if not present.any():
                continue
            rows = present.nonzero(as_tuple=True)[0]
            token_attention = None
            if len(modality.inputs) > 1:  # a padded sequence and its attention mask (text)
                token_attention = given.get(modality.inputs[1])
                token_attention = torch.ones_like(values) if token_attention is None else token_attention
                token_attention = token_attention.to(device)[rows]
            tokens, token_mask, attentions = self.encoders[name](
                values.to(device)[rows], attention_mask=token_attention, output_attentions=output_attentions,
                precomputed=bool((precomputed or {}).get(name)),
            )
            # Each item's own embedding: the mean of its real tokens, before the modality tag and fusion.
            weights = token_mask.to(tokens.dtype)[..., None]  # (R, T, 1)
            item_pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (R, F)
            tokens = tokens + self.modality_embeddings.weight[modality.embedding_index]
            # Scatter the encoded items back into the batch; the other items' slots stay masked out.
            full = tokens.new_zeros(batch, tokens.shape[1], tokens.shape[2])  # (B, T, F)
            full[rows] = tokens
            full_mask = torch.zeros(batch, tokens.shape[1], dtype=torch.bool, device=device)
            full_mask[rows] = token_mask
            pooled[name] = item_pooled.new_zeros(batch, item_pooled.shape[1]).index_copy(0, rows, item_pooled)
            pieces.append(full)
            masks.append(full_mask)
            spans[name] = (length, length + tokens.shape[1])
            length += tokens.shape[1]
            item_masks[name] = present
            if attentions:
                encoder_attentions[name] = attentions

        if not pieces:
            raise ValueError("FusionModel got no item that carries any modality")
        summary = (self.summary_token + self.modality_embeddings.weight[0]).expand(batch, -1, -1)  # (B, 1, F)
        hidden = torch.cat([summary.to(pieces[0].dtype), *pieces], dim=1)  # (B, N, F)
        token_mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), *masks], dim=1)  # (B, N)
        if not token_mask[:, 1:].any(dim=1).all():
            empty = (~token_mask[:, 1:].any(dim=1)).nonzero(as_tuple=True)[0].tolist()
            raise ValueError(f"items {empty} of the batch carry no modality; each item needs at least one")
        return FusionOutput(
            encoded=hidden, token_mask=token_mask, modality_spans=spans, modality_mask=item_masks,
            modality_embeds=pooled, encoder_attentions=encoder_attentions if output_attentions else None,
        )

    def fuse(
        self, encoded: torch.Tensor, token_mask: torch.Tensor, *, output_attentions: bool = False,
        summary_only: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fusion layers over already encoded tokens (B, N, F) with their mask (B, N).

        Masking a modality's tokens here gives exactly the answer without that modality, since the encoders
        never see each other: explanations and training use this to score subsets of modalities cheaply.
        Returns the final-normed states (B, N, F), token 0 the summary, and the fusion attentions (when asked).
        `summary_only` returns (B, 1, F): the last layer then works out the summary token alone, since nothing after
        it reads the others (the same numbers; a training batch's fused passes, forward and backward, took 156 ms
        instead of 227).
        """
        hidden, attentions = encoded, []
        for index, layer in enumerate(self.layers):
            queries = 1 if summary_only and index == len(self.layers) - 1 else None
            hidden, weights = layer(hidden, key_mask=token_mask, output_attentions=output_attentions, queries=queries)
            if output_attentions:
                attentions.append(weights)
        return self.final_norm(hidden), attentions

    def subset_summaries(self, out: FusionOutput, requests: list[tuple[tuple[str, ...], torch.Tensor]]) -> list[torch.Tensor]:
        """For each request (modalities, row indices (R,)) on encoded tokens (`encode`'s output): the summary states
        (R, F) of those rows given only those modalities, from the fusion layers over the summary token and their
        tokens alone. That is exactly what the masked full pass computes for them (a masked token is never attended
        to), without spending work on tokens an item lacks; requests of the same modalities share one pass."""
        assert out.encoded is not None and out.token_mask is not None and out.modality_spans is not None
        device = out.encoded.device
        grouped: dict[tuple[str, ...], list[int]] = {}
        for index, (modalities, _) in enumerate(requests):
            grouped.setdefault(tuple(m for m in out.modality_spans if m in modalities), []).append(index)
        results: list[torch.Tensor | None] = [None] * len(requests)
        for modalities, indices in grouped.items():
            if not modalities:
                raise ValueError(f"no encoded tokens of {requests[indices[0]][0]} to fuse")
            keep = torch.cat([torch.zeros(1, dtype=torch.long)] + [torch.arange(*out.modality_spans[m]) for m in modalities])
            rows = torch.cat([requests[i][1] for i in indices]).to(device)
            keep = keep.to(device)
            hidden, _ = self.fuse(out.encoded[rows][:, keep], out.token_mask[rows][:, keep], summary_only=True)
            for i, summary in zip(indices, hidden[:, 0].split([len(requests[i][1]) for i in indices])):
                results[i] = summary
        return cast(list[torch.Tensor], results)  # every request belongs to one group


class FusionForClassification(FusionPreTrainedModel):
    """[`FusionModel`] with a linear classifier on the summary token: one label per item, from any subset of its
    modalities.

    Args:
        config (`FusionConfig`): the encoders, fusion sizes and `id2label`.

    Example:
        ```python
        >>> model = FusionForClassification(FusionConfig(id2label={0: "no", 1: "yes"}))
        >>> out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels)
        >>> out.logits.shape, out.loss.shape
        (torch.Size([B, 2]), torch.Size([]))
        ```
    """

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        self.fusion: FusionModel = FusionModel(config)
        self.classifier = nn.Linear(config.hidden_size, len(config.class_names))
        # The shared embedding space: each modality's answer alone (its summary state) projected and normalised.
        self.embedding_head = nn.Linear(config.hidden_size, config.embedding_size) if config.embedding_size else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        audio_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        audio_encoder_states: torch.Tensor | None = None,
        audio_pitch: torch.Tensor | None = None,
    ) -> FusionOutput:
        """The base model's arguments (see [`FusionModel.forward`]), `labels` (`(B,)` long), for the loss, and
        `audio_pitch` (`(B,)`, Hz; 0 where unknown), each clip's voice pitch as the processor measured it. With
        `config.audio_views`, each clip given as `audio_values` is first moved to its view (`audio_view`) in eval
        mode; training hears clips as given (its augmentation varies the voices already)."""
        view = None
        if audio_values is not None and self.config.audio_views and not self.training:
            view = self.audio_view(audio_values, audio_mask, audio_pitch=audio_pitch, output_attentions=output_attentions)
            audio_values = view.values
            if view.states is not None:  # the encoder's output for the chosen views, computed while choosing them
                audio_values, audio_encoder_states = None, view.states
        out = self.fusion(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, audio_values=audio_values,
            image_mask=image_mask, text_mask=text_mask, audio_mask=audio_mask, output_attentions=output_attentions,
            audio_encoder_states=audio_encoder_states,
        )
        assert out.summary is not None
        out.logits = self.head(out.summary)
        out.loss = F.cross_entropy(out.logits.float(), labels.to(out.logits.device)) if labels is not None else None
        if view is not None:
            out.audio_scales = view.scales
            if output_attentions and view.attentions:
                out.encoder_attentions = {**(out.encoder_attentions or {}), "audio": view.attentions}
        return out

    def audio_view(self, audio_values: torch.Tensor, audio_mask: torch.Tensor | None = None, *,
                   audio_pitch: torch.Tensor | None = None, output_attentions: bool = False) -> AudioView:
        """The view each spectrogram (B, mel, frames) is heard at (`AudioView`).

        A clip is first heard alone as given. It also tries the views when its voice is higher than
        `config.audio_views_pitch_above` (by `audio_pitch`, (B,) Hz) or, where that rule or the clip's pitch is
        unknown (0), when its top probability is below `config.audio_views_below` (every clip, if that is None).
        A clip that tries them is also heard at each scale of `config.audio_views` (`warp_audio`); the class with
        the highest mean probability over all its views is the one they agree on, and the clip is answered at the
        view that gives that class the highest probability. A voice higher than any the model trained on is then
        heard lower (see the model card). The choice itself carries no gradient; the chosen warp is linear, so
        relevance still reaches every cell of the spectrogram as given. Items without audio keep scale 1.

        The pass as given runs with gradients when they are on, so an answer at the view as given (the usual case)
        reuses its encoder output; the other views are heard without gradients, so an answer explained at one of
        them hears it again (`states` is then None).
        """
        scales = [1.0, *(self.config.audio_views or [])]
        batch = audio_values.shape[0]
        chosen = torch.ones(batch, device=audio_values.device)
        rows = (torch.ones(batch, dtype=torch.bool, device=audio_values.device) if audio_mask is None
                else audio_mask.to(audio_values.device).bool()).nonzero(as_tuple=True)[0]
        if len(scales) == 1 or not len(rows):
            return AudioView(audio_values, chosen)
        encoder = self.fusion.encoder_of("audio")

        def alone(features: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                summary = self.fusion(audio_encoder_states=features.detach()).summary
                assert summary is not None
                return self.head(summary).float().softmax(dim=-1)  # (R, K)

        first_features, attentions = encoder.features(audio_values[rows], output_attentions=output_attentions)
        heard = first_features.new_zeros(batch, *first_features.shape[1:]).index_copy(0, rows, first_features)  # (B, T, E)
        below, above = self.config.audio_views_below, self.config.audio_views_pitch_above
        pitch = (audio_pitch.to(rows.device)[rows].float() if above is not None and audio_pitch is not None
                 else torch.zeros(len(rows), device=rows.device))  # (R,) Hz, 0 where unknown
        unsure, unknown = pitch > (above or 0.0), pitch <= 0
        # A known pitch decides by itself; only a clip without one is judged by its answer as given, so a batch of
        # men's voices costs no answer alone.
        first = None
        if unknown.any():
            if below is None:
                unsure |= unknown
            else:
                first = alone(first_features)
                unsure |= unknown & (first.max(dim=-1).values < below)
        if not unsure.any():
            return AudioView(audio_values, chosen, heard, attentions)
        with torch.no_grad():
            unsure_rows, given = rows[unsure], audio_values[rows[unsure]].detach()
            other_features, _ = encoder.features(torch.cat([self.warp_audio(given, s) for s in scales[1:]]))
            as_given = first[unsure] if first is not None else alone(first_features[unsure])
            probs = torch.cat([as_given, alone(other_features)]).view(len(scales), len(unsure_rows), -1)  # (V, U, K)
            agreed = probs.mean(dim=0).argmax(dim=-1)  # (U,)
            best = probs[:, torch.arange(len(unsure_rows)), agreed].argmax(dim=0)  # (U,) index of the view
        if not bool(best.any()):  # every unsure clip is surest as given
            return AudioView(audio_values, chosen, heard, attentions)
        chosen[unsure_rows] = torch.tensor(scales, device=chosen.device)[best]
        values = torch.cat([audio_values[i : i + 1] if float(s) == 1.0 else self.warp_audio(audio_values[i : i + 1], float(s))
                            for i, s in enumerate(chosen.tolist())])
        if torch.is_grad_enabled() or output_attentions:
            return AudioView(values, chosen)  # the forward hears the chosen views again, with gradients and attentions
        views = torch.cat([first_features[unsure], other_features]).view(len(scales), len(unsure_rows), *heard.shape[1:])
        heard[unsure_rows] = views[best, torch.arange(len(unsure_rows))]  # (V, U, T, E) -> the chosen (U, T, E)
        return AudioView(values, chosen, heard)

    def warp_audio(self, audio_values: torch.Tensor, scale: float) -> torch.Tensor:
        """Spectrograms (B, mel, frames) at the view `scale` of `config.audio_views`: every frequency scaled in Hz
        (`scale_frequencies`) where the config names its mel bins' frequencies (`audio_views_frequencies`), else
        the mel axis stretched (`warp_frequencies`, as the checkpoints before those did)."""
        if scale == 1.0:
            return audio_values
        frequencies = self.config.audio_views_frequencies
        return warp_frequencies(audio_values, scale) if frequencies is None else scale_frequencies(audio_values, scale, frequencies)

    def head(self, summary: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) from summary states (B, F)."""
        return self.classifier(summary.to(self.classifier.weight.dtype))

    def alone_summaries(self, out: FusionOutput, rows: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per modality of a forward pass's output: (summary states (R, F), row indices (R,)) of the rows that carry
        it (or, with `rows`, of the rows its (B,) bool mask picks), each from the fusion layers over the summary token
        and that modality's tokens only: exactly what the model computes when given that modality alone."""
        assert out.modality_spans is not None and out.modality_mask is not None
        requests: list[tuple[tuple[str, ...], torch.Tensor]] = []
        for modality in out.modality_spans:
            chosen = (out.modality_mask if rows is None else rows)[modality].nonzero(as_tuple=True)[0]
            if len(chosen):
                requests.append(((modality,), chosen))
        summaries = self.fusion.subset_summaries(out, requests)
        return {modalities[0]: (summary, chosen) for (modalities, chosen), summary in zip(requests, summaries)}

    def embed(self, summary: torch.Tensor) -> torch.Tensor:
        """Unit vectors (R, embedding_size) of the shared space from summary states (R, F)."""
        if self.embedding_head is None:
            raise ValueError("this checkpoint has no embedding head (config.embedding_size is None); train one with "
                             "python -m fusion.embedding_head")
        return F.normalize(self.embedding_head(summary.to(self.embedding_head.weight.dtype)).float(), dim=-1)
