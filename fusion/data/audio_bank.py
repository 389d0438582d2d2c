"""Outputs of a frozen audio encoder for every training clip, in several augmented variants, cached on disk.

A pretrained speech encoder that stays frozen gives the same output for the same input, so training computes it
once per (clip, variant) instead of once per step (with `tuned` top layers trained, what is cached is the input of
those layers, and `finish_states` runs them each step): variant 0 is the clip as recorded, the others pass through
`VoiceAugment` (pitch, rate, room, microphone, noise) and a vocal-tract warp of the spectrogram. Each clip's
variants are one float16 file named by a hash of the samples, the variant recipe and the encoder's weights, so
runs that share clips (another validation speaker, another seed) share the work.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..feature_extraction import prepare_waveform
from ..modeling import ModalityEncoder
from ..processing import FusionProcessor
from .examples import warp_mel
from .voice_augment import VoiceAugment, pink

# Bump when the code that makes variants changes, so old cache files are not reused (the augmentation's settings
# are part of each file's key already).
RECIPE_VERSION = 3


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """A short hash of all of an encoder's weights: two encoders that differ anywhere never share cache files."""
    digest = hashlib.sha1()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def spectrogram_variant(processor: FusionProcessor, wave: np.ndarray, rng: random.Random | None,
                        augment: VoiceAugment | None) -> torch.Tensor:
    """The (mel, frames) features of one variant of a waveform at the model's rate (`rng` None: as recorded)."""
    settings = processor.settings.audio
    if rng is not None and augment is not None:
        wave = augment.waveform(wave, rng, settings.sampling_rate)
    fitted, _ = prepare_waveform(wave, settings.sampling_rate, settings)
    features = processor.feature_extractor.log_mel(torch.from_numpy(fitted)[None])[0]
    if rng is not None and augment is not None:
        if rng.random() < augment.mel_warp:
            features = warp_mel(features, rng.uniform(*augment.mel_warp_range))
        if rng.random() < 0.3:
            features = spec_mask(features, rng, bins=8, frames=10)
    return features


def spec_mask(features: torch.Tensor, rng: random.Random, *, bins: int, frames: int) -> torch.Tensor:
    """SpecAugment: one band of up to `bins` mel bins and one stretch of up to `frames` frames set to the
    spectrogram's mean, drawn from `rng` (not torch's global generator, so a cached bank and a fresh one leave
    training's random draws alike)."""
    features = features.clone()
    mel, length = features.shape
    width, start = rng.randint(0, bins), rng.randint(0, mel - 1)
    features[start : start + width] = features.mean()
    width, start = rng.randint(0, frames), rng.randint(0, length - 1)
    features[:, start : start + width] = features.mean()
    return features


def garbage_waves(count: int, seconds: float, rate: int, *, seed: int = 0) -> list[np.ndarray]:
    """White, brown and pink noise clips: audio that names no class."""
    rng = np.random.default_rng(seed)
    waves = []
    for index in range(count):
        wave = rng.normal(0, 0.1, int(seconds * rate)).astype(np.float32)
        if index % 3 == 1:
            wave = np.cumsum(wave).astype(np.float32)
            wave -= wave.mean()
        elif index % 3 == 2:
            wave = pink(wave).astype(np.float32)
        waves.append(wave)
    return waves


def finish_states(encoder: ModalityEncoder, states: torch.Tensor, *, tuned: int) -> torch.Tensor:
    """A Whisper encoder's output (B, T, E) from the input of its top `tuned` layers (B, T, E): those layers and
    the final norm, as its own forward runs them."""
    whisper = encoder.encoder
    layers = cast(nn.ModuleList, whisper.layers)
    for layer in layers[len(layers) - tuned:]:
        states = layer(states, None)
    return cast(nn.Module, whisper.layer_norm)(states)


def _states_below(encoder: ModalityEncoder, features: torch.Tensor, tuned: int) -> torch.Tensor:
    """The audio encoder's features of (B, mel, frames) spectrograms, or with `tuned`, the input of its top `tuned`
    layers (all of them: the convolutions' output with positions added), read by a hook while the whole encoder
    runs."""
    if not tuned:
        return encoder.features(features)[0]
    layers = cast(nn.ModuleList, encoder.encoder.layers)
    if not 0 < tuned <= len(layers):
        raise ValueError(f"tuned must be in 1..{len(layers)} (the layers below stay frozen), got {tuned}")
    found: list[torch.Tensor] = []
    hook = layers[len(layers) - tuned].register_forward_pre_hook(lambda module, args: found.append(args[0]))
    try:
        encoder.features(features)
    finally:
        hook.remove()
    return found[0]


@torch.no_grad()
def encode_waves(encoder: ModalityEncoder, processor: FusionProcessor, waves: list[np.ndarray], *, variants: int,
                 augment: VoiceAugment, seed: int, cache: str | Path | None, batch_size: int = 64,
                 desc: str = "audio states", tuned: int = 0) -> list[torch.Tensor]:
    """Per waveform, a float16 tensor (variants, T, E) of the frozen audio `encoder`'s features (with `tuned`, of the
    input of its top `tuned` layers, which training then runs itself)."""
    # The augmentation's settings are part of the key: other settings make other variants of the same clip.
    fingerprint = (f"{encoder_fingerprint(encoder.encoder)}-{RECIPE_VERSION}-{variants}-{seed}-{augment!r}"
                   + (f"-below{tuned}" if tuned else ""))
    folder = Path(cache) / "audio-states" if cache is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    results: list[torch.Tensor | None] = [None] * len(waves)
    todo = []
    for index, wave in enumerate(waves):
        key = hashlib.sha1(np.ascontiguousarray(wave).tobytes() + fingerprint.encode()).hexdigest()
        path = folder / f"{key}.npy" if folder is not None else None
        if path is not None and path.is_file():
            results[index] = torch.from_numpy(np.load(path))
        else:
            todo.append((index, key, path))
    encoder.eval()
    device = next(encoder.parameters()).device
    for start in tqdm(range(0, len(todo), max(1, batch_size // variants)), desc=desc, leave=False, disable=not todo):
        chunk = todo[start : start + max(1, batch_size // variants)]
        features = []
        for index, key, _ in chunk:
            rng = random.Random(key)
            features += [spectrogram_variant(processor, waves[index], rng if v else None, augment) for v in range(variants)]
        states = _states_below(encoder, torch.stack(features).to(device), tuned).to(torch.float16).cpu()  # (n·V, T, E)
        for row, (index, key, path) in enumerate(chunk):
            variant_states = states[row * variants : (row + 1) * variants].clone()
            results[index] = variant_states
            if path is not None:
                np.save(path, variant_states.numpy())
    return results  # type: ignore[return-value]


def audio_bank(encoder: ModalityEncoder, processor: FusionProcessor, pool: dict[int, list[np.ndarray]], *,
               variants: int, augment: VoiceAugment, seed: int, cache: str | Path | None,
               tuned: int = 0) -> dict[int, list[torch.Tensor]]:
    """`pool` (label → waveforms at the model's rate) as label → per-clip (variants, T, E) encoder states."""
    labels = [label for label, waves in pool.items() for _ in waves]
    waves = [wave for label in pool for wave in pool[label]]
    states = encode_waves(encoder, processor, waves, variants=variants, augment=augment, seed=seed, cache=cache,
                          tuned=tuned)
    bank: dict[int, list[torch.Tensor]] = {}
    for label, state in zip(labels, states):
        bank.setdefault(label, []).append(state)
    return bank
