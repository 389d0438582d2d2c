"""Training examples: pools of prepared images, waveforms and phrases per label, paired into multimodal
examples with random subsets of modalities, augmentation and deliberate corruption.

Each example is made from its own seed, so an epoch is the same whatever the loader's order or workers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torchvision.transforms import v2

from ..feature_extraction import load_waveform, prepare_waveform
from ..image_processing import prepare_image
from ..modalities import MODALITIES, subsets
from ..modeling import warp_frequencies
from ..processing import FusionProcessor
from . import phrases

SUBSETS = subsets(MODALITIES)
# Modalities that `ExampleMaker` draws, augments and corrupts its own way; any other is drawn from `Pools.prepared`.
DRAWN = ("image", "audio", "text")
# Every modality of a multimodal example is also trained alone (`fusion.train.FusionObjective`), so single-modality
# examples need no extra weight; pairs and triples carry the garbage-modality cases.
SUBSET_WEIGHTS = {1: 1.0, 2: 1.5, 3: 1.5}  # by subset size; larger ones weigh as 3


@dataclass
class Pools:
    """Prepared inputs per label index: images (N, size, size) in [0, 1], raw mono waveforms at the model's
    rate, texts. `phrase_labels` marks labels whose phrases are generated (the digits task)."""

    labels: list[str]
    images: dict[int, list[np.ndarray]] = field(default_factory=dict)
    waves: dict[int, list[np.ndarray]] = field(default_factory=dict)  # recorded speech
    texts: dict[int, list[str]] = field(default_factory=dict)
    generate_phrases: bool = False
    synthetic_waves: dict[int, list[np.ndarray]] = field(default_factory=dict)  # synthetic voices, drawn apart
    # Any other modality's inputs per label, as its processor's `prepare` made them; drawn as they are.
    prepared: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)  # items each data source gave, for the training log

    def available(self, label: int) -> tuple[str, ...]:
        have = {
            "image": bool(self.images.get(label)),
            "text": bool(self.texts.get(label)) or self.generate_phrases,
            "audio": bool(self.waves.get(label)) or bool(self.synthetic_waves.get(label)),
        }
        return tuple(m for m in MODALITIES if have.get(m) or self.prepared.get(m, {}).get(label))


def image_pool(processor: FusionProcessor, images: list, labels: list[int]) -> dict[int, list[np.ndarray]]:
    pool: dict[int, list[np.ndarray]] = {}
    for image, label in zip(images, labels):
        pool.setdefault(int(label), []).append(prepare_image(image, processor.settings.image)[0].astype(np.float32))
    return pool


def wave_pool(processor: FusionProcessor, sources: list, labels: list[int]) -> dict[int, list[np.ndarray]]:
    """Decoded, mono, resampled to the model's rate; trimming and fitting happen per example."""
    settings = processor.settings.audio
    pool: dict[int, list[np.ndarray]] = {}
    for source, label in zip(sources, labels):
        samples, rate = load_waveform(source, settings)
        if rate != settings.sampling_rate:
            samples = torchaudio.functional.resample(torch.from_numpy(samples), rate, settings.sampling_rate).numpy()
        pool.setdefault(int(label), []).append(samples.astype(np.float32))
    return pool


@dataclass
class Augment:
    """Probabilities and strengths of augmentation and corruption (0 disables)."""

    image_affine: float = 0.8
    image_thickness: float = 0.3
    image_occlusion: float = 0.1
    audio_speed: float = 0.8
    audio_noise: float = 0.5
    audio_low_snr: float = 0.1
    audio_warp: float = 0.5  # stretch the mel axis: other speakers' vocal tracts move the formants
    spec_mask: float = 0.5
    garbage: float = 0.25  # chance that one modality of a multimodal example is replaced by garbage
    # Chance that one modality of a multimodal example (without garbage) says another label than the example's, as
    # an unseen voice heard wrong does: the fused answer then has to weigh the modalities rather than follow the one
    # that is right on the training voices. Off in the shipped recipe (model card, "Tried, not kept").
    conflict: float = 0.0
    # Chance that a clip comes from recorded speech rather than synthetic voices, where a label has both. Validated
    # on a held-out FSDD speaker: the more synthetic clips are drawn, the worse an unseen real voice is heard.
    real_share: float = 0.7


class ExampleMaker:
    """Builds example `index` of `epoch` as a dict of model-ready tensors and a label."""

    def __init__(self, pools: Pools, processor: FusionProcessor, *, seed: int, augment: Augment | None, phrase_split: str = "train",
                 audio_bank: dict[int, list[torch.Tensor]] | None = None, synthetic_bank: dict[int, list[torch.Tensor]] | None = None,
                 garbage_bank: list[torch.Tensor] | None = None):
        self.pools, self.processor, self.seed = pools, processor, seed
        self.augment = augment
        self.phrase_split = phrase_split
        # With a frozen audio encoder: its outputs per label and clip, (variants, T, E) each (`fusion.data.audio_bank`),
        # for recorded and synthetic speech.
        self.audio_bank, self.synthetic_bank, self.garbage_bank = audio_bank, synthetic_bank or {}, garbage_bank
        self.affine = v2.RandomAffine(degrees=12, translate=(0.08, 0.08), scale=(0.85, 1.15), shear=10)
        self.erase = v2.RandomErasing(p=1.0, scale=(0.05, 0.2), value=0.0)

    def __call__(self, epoch: int, index: int) -> dict:
        rng = random.Random(f"{self.seed}-{epoch}-{index}")
        torch.manual_seed(rng.getrandbits(32))
        label = rng.randrange(len(self.pools.labels))
        available = self.pools.available(label)
        subsets = [s for s in SUBSETS if set(s) <= set(available)]
        subset = rng.choices(subsets, weights=[SUBSET_WEIGHTS.get(len(s), 1.5) for s in subsets])[0]
        garbage = None
        corruptible = [m for m in subset if m in DRAWN]  # the modalities this maker has garbage for
        if self.augment and len(subset) > 1 and corruptible and rng.random() < self.augment.garbage:
            garbage = rng.choice(corruptible)
        conflict, said = None, {}
        # Drawn only when on, so that examples without it are the same as before it existed.
        if self.augment and self.augment.conflict and garbage is None and len(subset) > 1 and corruptible \
                and rng.random() < self.augment.conflict:
            conflict = rng.choice(corruptible)
            others = [other for other in range(len(self.pools.labels))
                      if other != label and conflict in self.pools.available(other)]
            if others:
                said[conflict] = rng.choice(others)
            else:
                conflict = None
        example: dict[str, Any] = {"label": label, "garbage": garbage, "conflict": conflict}
        if "image" in subset:
            example["image"] = self.image(said.get("image", label), rng, garbage == "image")
        if "audio" in subset:
            example["audio"] = self.audio(said.get("audio", label), rng, garbage == "audio")
        if "text" in subset:
            example["text"] = self.text(said.get("text", label), rng, garbage == "text")
        for modality in subset:
            if modality not in DRAWN:
                example[modality] = rng.choice(self.pools.prepared[modality][label])
        return example

    def image(self, label: int, rng: random.Random, garbage: bool) -> torch.Tensor:
        settings = self.processor.settings.image
        if garbage:
            kind = rng.choice(("uniform", "blobs", "blank-ish"))
            size = settings.size
            if kind == "uniform":
                square = torch.rand(1, size, size)
            elif kind == "blobs":
                square = F.interpolate(torch.rand(1, 1, 7, 7), size=(size, size), mode="bilinear")[0]
            else:
                square = torch.rand(1, size, size) * 0.3
        else:
            square = self.augment_image(torch.from_numpy(rng.choice(self.pools.images[label]))[None], rng)
        return self.processor.normalize_image(square)

    def augment_image(self, square: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """One image (1, size, size) in [0, 1] warped, thickened or thinned and occluded as `augment` says."""
        augment = self.augment
        if augment and rng.random() < augment.image_affine:
            square = self.affine(square)
        if augment and rng.random() < augment.image_thickness:
            if rng.random() < 0.7:
                square = F.max_pool2d(square[None], 3, stride=1, padding=1)[0]  # thicker strokes
            else:
                square = -F.max_pool2d(-square[None], 2, stride=1, padding=1)[0][:, 1:, 1:]  # thinner
        if augment and rng.random() < augment.image_occlusion:
            square = self.erase(square)
        return square

    def audio(self, label: int, rng: random.Random, garbage: bool) -> torch.Tensor:
        if self.audio_bank is not None:
            return self.audio_states(label, rng, garbage)
        settings = self.processor.settings.audio
        length = int(settings.duration * settings.sampling_rate)
        if garbage:
            wave = np.random.default_rng(rng.getrandbits(32)).normal(0, 0.1, length).astype(np.float32)
            if rng.random() < 0.5:  # coloured noise too, not only white
                wave = np.cumsum(wave).astype(np.float32)
                wave -= wave.mean()
        else:
            wave = rng.choice(self.source(self.pools.waves, self.pools.synthetic_waves, label, rng))
            augment = self.augment
            if augment and rng.random() < augment.audio_speed:
                # Rates on a 2.5% grid keep the resampling kernel short (a ratio like 6837/8000 would not).
                step = settings.sampling_rate // 40
                source_rate = step * rng.randint(34, 47)
                wave = torchaudio.functional.resample(torch.from_numpy(wave), source_rate, settings.sampling_rate).numpy()
            if augment and rng.random() < augment.audio_noise + augment.audio_low_snr:
                low = rng.random() < augment.audio_low_snr / max(augment.audio_noise + augment.audio_low_snr, 1e-9)
                snr = rng.uniform(-5, 5) if low else rng.uniform(8, 35)
                power = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-10
                noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 1, len(wave))
                wave = (wave + noise * np.sqrt(power / 10 ** (snr / 10))).astype(np.float32)
        fitted, _ = prepare_waveform(wave, settings.sampling_rate, settings)
        features = self.processor.feature_extractor.log_mel(torch.from_numpy(fitted)[None])[0]  # (mel, frames)
        if self.augment and not garbage and rng.random() < self.augment.audio_warp:
            features = warp_mel(features, rng.uniform(0.9, 1.1))
        if self.augment and rng.random() < self.augment.spec_mask:
            features = torchaudio.transforms.FrequencyMasking(6)(features[None])[0]
            features = torchaudio.transforms.TimeMasking(15)(features[None])[0]
        return features

    def audio_states(self, label: int, rng: random.Random, garbage: bool) -> torch.Tensor:
        """A cached encoder output (T, E): garbage, or a random variant of a random clip of `label` (the clip as
        recorded when augmentation is off)."""
        assert self.audio_bank is not None and self.garbage_bank is not None  # only called with banks
        if garbage:
            return rng.choice(self.garbage_bank)[0].float()
        variants = rng.choice(self.source(self.audio_bank, self.synthetic_bank, label, rng))
        return variants[rng.randrange(len(variants)) if self.augment else 0].float()

    def source(self, recorded: dict, synthetic: dict, label: int, rng: random.Random) -> list:
        """The clips of `label` to draw from: recorded speech with chance `real_share` where both kinds exist."""
        share = self.augment.real_share if self.augment else Augment.real_share
        if not synthetic.get(label) or (recorded.get(label) and rng.random() < share):
            return recorded[label]
        return synthetic[label]

    def text(self, label: int, rng: random.Random, garbage: bool) -> str:
        if garbage:
            return phrases.no_number_phrase(rng)
        texts = self.pools.texts.get(label)
        if self.pools.generate_phrases and (not texts or rng.random() < 0.8):
            return phrases.phrase(label, rng, split=self.phrase_split)
        if not texts:
            raise ValueError(f"no phrases of label {label} to draw from, and generated phrases are off")
        return rng.choice(texts)


def warp_mel(features: torch.Tensor, scale: float) -> torch.Tensor:
    """A (mel, frames) spectrogram with its frequency axis stretched by `scale` (vocal tract length
    perturbation; the warp of `audio_views` in checkpoints without `audio_views_frequencies`)."""
    return warp_frequencies(features[None], scale)[0]


def collate(examples: list[dict], processor: FusionProcessor) -> dict[str, torch.Tensor]:
    """Stack examples into the tensors `FusionModel.forward` takes (absent modalities masked), with labels."""
    batch = processor.model_inputs(processor.stack({m: [e.get(m) for e in examples] for m in MODALITIES}))
    batch["labels"] = torch.tensor([e["label"] for e in examples])
    return batch
