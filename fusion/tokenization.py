"""The text side: a deterministic WordPiece tokenizer built from a corpus, and `FusionTextProcessor`, which
tokenises a batch of texts and keeps each token's character offsets for the word heatmap."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .input_errors import FusionInputError
from .input_errors import describe as _describe
from .processor_base import ModalityProcessor

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class TextSettings:
    max_tokens: int = 32  # longer text is truncated to this many tokens ([CLS] and [SEP] included)
    max_characters: int = 2000  # only this many characters are tokenised


def build_tokenizer(corpus, *, vocab_size: int = 1000, max_tokens: int = 32) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece tokenizer whose vocabulary is built deterministically from `corpus`.

    The vocabulary holds every character seen (alone and as a `##` continuation), so misspelt or unseen words
    fall apart into known pieces, and then the most frequent whole words (ties by spelling) up to
    `vocab_size`. CJK characters are split one per token. (The `tokenizers` WordPiece trainer breaks ties in
    a different order on every run, which would make training irreproducible.)
    """
    normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.BertNormalizer(handle_chinese_chars=True, strip_accents=False, lowercase=True)]
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in corpus:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({char for word in counts for char in word})
    vocabulary = SPECIAL_TOKENS + characters + [f"##{char}" for char in characters]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocabulary += words[: max(0, vocab_size - len(vocabulary))]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_tokens,
    )


class FusionTextProcessor(ModalityProcessor):
    """Tokenises text for the text encoder, keeping each token's character offsets.

    Args:
        tokenizer (`PreTrainedTokenizerFast`): the checkpoint's tokenizer.
        settings (`TextSettings`): the checkpoint's text limits.

    Example:
        ```python
        >>> text = FusionTextProcessor(tokenizer)
        >>> tensors, rows = text.stack(["sieben", None])
        >>> tensors["text_mask"], rows[0]["text_truncated"]
        (tensor([ True, False]), False)
        ```
    """

    modality = "text"
    Settings = TextSettings

    def __init__(self, tokenizer: PreTrainedTokenizerFast, settings: TextSettings | None = None):
        self.tokenizer = tokenizer
        self.settings: TextSettings = settings or TextSettings()

    @classmethod
    def from_settings(cls, settings: TextSettings, *, tokenizer: Any = None) -> FusionTextProcessor:
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(f"the text processor needs a fast tokenizer, got {type(tokenizer).__name__}")
        return cls(tokenizer, settings)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, settings: TextSettings) -> FusionTextProcessor:
        """The checkpoint's tokenizer (`tokenizer.json`) with these limits."""
        if not (Path(directory) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"checkpoint folder {str(directory)!r} lacks tokenizer.json")
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(f"{Path(directory) / 'tokenizer.json'} is not a fast tokenizer (got {type(tokenizer).__name__})")
        return cls(tokenizer, settings)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)

    def clean(self, text: Any) -> str:
        """The text as it will be tokenised (cut to `max_characters`), or a `FusionInputError`."""
        if not isinstance(text, str):
            raise FusionInputError(f"text must be a string, got {_describe(text)}")
        if not text.strip():
            raise FusionInputError("text is empty; type a word or phrase, or leave the text out")
        return text[: self.settings.max_characters]

    def prepare(self, text: Any) -> tuple[str, dict[str, Any]]:
        """The cleaned text and the facts an explanation needs: `text`, and `text_characters_cut` (characters past
        `max_characters` were dropped before tokenising)."""
        cleaned = self.clean(text)
        return cleaned, {"text": cleaned, "text_characters_cut": len(text) > len(cleaned)}

    def stack(self, prepared: list[str | None]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
        """`input_ids` and `attention_mask` (B, T) padded to the longest text, `text_mask` (B,); and per item with
        text, its tokens' character offsets and whether tokens were cut off (`text_truncated`)."""
        size = len(prepared)
        rows = [i for i, text in enumerate(prepared) if text is not None]
        texts = [prepared[i] for i in rows]
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.settings.max_tokens,
                                 return_offsets_mapping=True, return_tensors="pt")
        ids = torch.full((size, encoded["input_ids"].shape[1]), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        ids[rows], attention[rows] = encoded["input_ids"], encoded["attention_mask"]
        mask = torch.zeros(size, dtype=torch.bool)
        mask[rows] = True
        facts: dict[int, dict[str, Any]] = {}
        for row, (index, text) in enumerate(zip(rows, texts)):
            offsets = [tuple(o) for o in encoded["offset_mapping"][row].tolist()]
            # Cut off when the last token kept ends before the text's last non-space character.
            last_end = max((end for _, end in offsets), default=0)
            facts[index] = {"text_offsets": offsets, "text_truncated": last_end < len(str(text).rstrip())}
        return {"input_ids": ids, "attention_mask": attention, "text_mask": mask}, facts
