"""`ModalityProcessor`: what every modality's processor offers `FusionProcessor`, which composes them.

A processor turns one input of its modality into what the model reads (`prepare`, then `stack` for a batch) and
reports the facts an explanation needs to map back onto the input. Its constants are a `Settings` dataclass,
saved with the checkpoint under the modality's name in `processor_config.json`; a processor that also owns
trained files (the text processor's tokenizer) saves and loads them itself.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar


class ModalityProcessor:
    """Base of the per-modality processors; the default methods suit one whose only state is its settings.

    Subclasses set `modality` (the registry name) and `Settings`, take `settings` in `__init__`, and implement
    `prepare(source) -> (prepared, facts)` and `stack(prepared list) -> (tensors, facts by item index)`.
    """

    modality: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, settings: Any = None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def from_settings(cls, settings: Any, *, tokenizer: Any = None) -> ModalityProcessor:
        """A processor with these constants; `tokenizer` is for processors that need one (the text's)."""
        return cls(settings)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, settings: Any) -> ModalityProcessor:
        """The processor saved in a checkpoint folder, its constants already read from `processor_config.json`."""
        return cls(settings)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the processor's own files (its settings are saved by `FusionProcessor`); none by default."""

    def prepare(self, source: Any) -> tuple[Any, dict[str, Any]]:
        """One input as its processor's prepared form, and the facts (`meta`) an explanation needs."""
        raise NotImplementedError

    def stack(self, prepared: list[Any]) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """Prepared inputs (None where an item lacks the modality) as the model's tensors, with its `<name>_mask`
        (B,), and facts found while stacking, by item index."""
        raise NotImplementedError

    def stack_facts(self, facts: list[dict[str, Any] | None]) -> dict[str, Any]:
        """More tensors for the model from what `prepare` reported (`facts[i]`, None where item i lacks the
        modality), for a part whose input says more than its main tensor (the audio's pitch); none by default."""
        return {}
