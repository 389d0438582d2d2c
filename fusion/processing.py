"""`FusionProcessor`: composes one processor per modality (`FusionImageProcessor`, `FusionFeatureExtractor`,
`FusionTextProcessor`) into the batches `FusionModel` reads, as `CLIPProcessor` composes an image processor and a
tokenizer.

Every preprocessing constant lives in the processor's settings, saved with the checkpoint
(`processor_config.json`), and every unusable input raises `FusionInputError` with what was wrong and
what is accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from .feature_extraction import AudioSettings, FusionFeatureExtractor
from .image_processing import FusionImageProcessor, ImageGeometry, ImageSettings
from .input_errors import FusionInputError
from .input_errors import describe as _describe
from .modalities import MODALITIES, REGISTRY
from .processor_base import ModalityProcessor
from .tokenization import FusionTextProcessor, TextSettings

__all__ = ["PROCESSOR_FILE", "FusionInputError", "FusionProcessor", "ProcessorSettings"]

PROCESSOR_FILE = "processor_config.json"
S = TypeVar("S")


class _Settings(Generic[S]):
    """An attribute of `ProcessorSettings` that reads and replaces one modality's entry of its `parts`."""

    def __init__(self, modality: str):
        self.modality = modality

    def __get__(self, owner: ProcessorSettings, kind: type | None = None) -> S:
        return owner.parts[self.modality]

    def __set__(self, owner: ProcessorSettings, value: S) -> None:
        owner.parts[self.modality] = value


class ProcessorSettings:
    """The constants of every modality's processor, keyed by modality (the registry's `Settings` of each), as
    `processor_config.json` keeps them: `{"image": {...}, "audio": {...}, "text": {...}}`.

    Args:
        **parts: settings objects by modality name; a modality left out gets its processor's defaults.

    Example:
        ```python
        >>> settings = ProcessorSettings(audio=AudioSettings(sampling_rate=16000))
        >>> settings.audio.sampling_rate, settings.of("image").size
        (16000, 28)
        ```
    """

    def __init__(self, **parts: Any):
        unknown = set(parts) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)} in processor settings; expected {', '.join(MODALITIES)}")
        self.parts: dict[str, Any] = {m: parts.get(m) or REGISTRY[m].processor.Settings() for m in MODALITIES}

    def of(self, modality: str) -> Any:
        """The settings of `modality`'s processor."""
        return self.parts[modality]

    # Typed shortcuts for the built-in modalities (read and replaced as attributes); generic code uses `of`.
    image: _Settings[ImageSettings] = _Settings("image")
    audio: _Settings[AudioSettings] = _Settings("audio")
    text: _Settings[TextSettings] = _Settings("text")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {m: asdict(settings) for m, settings in self.parts.items()}

    @classmethod
    def from_dict(cls, data: dict) -> ProcessorSettings:
        """Settings from `processor_config.json`'s contents; unknown keys are refused, missing ones take defaults."""
        parts = {}
        for name in MODALITIES:
            kind = REGISTRY[name].processor.Settings
            values = data.get(name, {})
            unknown = set(values) - {f.name for f in fields(kind)}
            if unknown:
                raise FusionInputError(f"{PROCESSOR_FILE} has unknown {kind.__name__} keys {sorted(unknown)}")
            parts[name] = kind(**values)
        return cls(**parts)


class FusionProcessor:
    """Turns any non-empty subset of image, text and audio into `FusionModel` inputs, through one processor per
    modality (`processor.parts`).

    Args:
        tokenizer (`PreTrainedTokenizerFast`): the text tokenizer saved with the checkpoint.
        settings (`ProcessorSettings`): image, audio and text preprocessing constants.

    Example:
        ```python
        >>> processor = FusionProcessor.from_pretrained("assets/fusion-digits")
        >>> batch = processor([{"image": "seven.png", "text": "seven"}, {"audio": (8000, samples)}])
        >>> batch["pixel_values"].shape, batch["image_mask"]
        (torch.Size([2, 1, 28, 28]), tensor([ True, False]))
        ```
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast | None = None, settings: ProcessorSettings | None = None, *,
                 parts: dict[str, ModalityProcessor] | None = None):
        self.settings = settings or ProcessorSettings()
        # Keyed by modality, in the fused order: what `__call__` runs for each modality an item carries. Parts not
        # given are built from their settings (the text's from `tokenizer`).
        given = parts or {}
        self.parts: dict[str, ModalityProcessor] = {
            m: given[m] if m in given else REGISTRY[m].processor.from_settings(self.settings.of(m), tokenizer=tokenizer)
            for m in MODALITIES
        }
        for name, part in self.parts.items():
            self.settings.parts[name] = part.settings  # one object, whichever side a caller changes

    # The built-in parts by their usual names (`CLIPProcessor` has `image_processor` and `tokenizer`).
    @property
    def image_processor(self) -> FusionImageProcessor:
        return cast(FusionImageProcessor, self.parts["image"])

    @property
    def feature_extractor(self) -> FusionFeatureExtractor:
        return cast(FusionFeatureExtractor, self.parts["audio"])

    @property
    def text_processor(self) -> FusionTextProcessor:
        return cast(FusionTextProcessor, self.parts["text"])

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.text_processor.tokenizer

    # -- persistence

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for part in self.parts.values():
            part.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(self.settings.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> FusionProcessor:
        directory = Path(directory)
        if not (directory / PROCESSOR_FILE).is_file():
            raise FileNotFoundError(f"checkpoint folder {str(directory)!r} lacks {PROCESSOR_FILE}")
        try:
            settings = ProcessorSettings.from_dict(json.loads((directory / PROCESSOR_FILE).read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{directory / PROCESSOR_FILE} is damaged: {error}") from None
        parts = {m: REGISTRY[m].processor.from_pretrained(directory, settings.of(m)) for m in MODALITIES}
        return cls(settings=settings, parts=parts)

    # -- one modality at a time (the parts' own calls, kept here for training and evaluation code)

    def image_features(self, source: Any) -> tuple[torch.Tensor, ImageGeometry]:
        """(1, size, size) normalised pixels, and where they came from."""
        return self.image_processor(source)

    def audio_features(self, source: Any) -> tuple[torch.Tensor, float]:
        """(mel, frames) normalised log-mel, and the start of its window in the given clip (seconds)."""
        return self.feature_extractor(source)

    def normalize_image(self, square: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A prepared (size, size) square in [0, 1] as normalised (1, size, size) pixels."""
        return self.image_processor.normalize(square)

    # -- batches

    def __call__(self, items: dict | list[dict] | None = None, **modalities: Any) -> dict[str, Any]:
        """Process one item (`image=`, `text=`, `audio=`) or a list of item dicts into one batch.

        Returns tensors for each modality any item carries (`pixel_values`, `input_ids` and `attention_mask`,
        `audio_values`), a `<modality>_mask` of the items carrying it, and `meta`: per item, the modalities it
        carries and what its parts report (image geometry, audio window start, the text as tokenised, its token
        offsets and whether it was truncated).
        """
        if items is None:
            items = [modalities]
        elif isinstance(items, dict):
            items = [items]
        elif modalities:
            raise FusionInputError("pass either a list of items or image=/text=/audio=, not both")
        if not isinstance(items, (list, tuple)) or not items:
            raise FusionInputError("expected an item dict or a non-empty list of item dicts")
        expected = ", ".join(MODALITIES)
        meta: list[dict[str, Any]] = []
        prepared: dict[str, list[Any]] = {m: [None] * len(items) for m in MODALITIES}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise FusionInputError(f"item {index} must be a dict with {expected} keys, got {_describe(item)}")
            unknown = set(item) - set(MODALITIES)
            if unknown:
                raise FusionInputError(f"item {index} has unknown keys {sorted(unknown)}; expected {expected}")
            given = {k: v for k, v in item.items() if v is not None}
            if not given:
                raise FusionInputError("no input given: provide at least one of an image, a text or an audio clip")
            info: dict[str, Any] = {"modalities": [m for m in MODALITIES if m in given]}
            for modality in info["modalities"]:
                prepared[modality][index], facts = self.parts[modality].prepare(given[modality])
                info.update(facts)
            meta.append(info)
        return self.stack(prepared, meta)

    def stack(self, prepared: dict[str, list[Any]], meta: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Batch items already prepared by the parts (`prepared[modality][i]`, None where item i lacks it): each
        modality's tensors have a row per item, zero and masked out where the item lacks it; `meta` (one dict per
        item) gains what the parts report while stacking (text offsets and truncation)."""
        size = len(next(iter(prepared.values())))
        meta = meta if meta is not None else [{} for _ in range(size)]
        batch: dict[str, Any] = {}
        for modality, values in prepared.items():
            if all(v is None for v in values):
                continue
            tensors, facts = self.parts[modality].stack(values)
            batch.update(tensors)
            batch.update(self.parts[modality].stack_facts([m if v is not None else None for v, m in zip(values, meta)]))
            for index, found in facts.items():
                meta[index].update(found)
        batch["meta"] = meta
        return batch

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The tensors of a processed batch, without `meta`, ready for `model(**inputs)`."""
        return {k: v for k, v in batch.items() if k != "meta"}
