"""The error every unusable input raises, and how messages name what arrived."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


class FusionInputError(ValueError):
    """An input the processor cannot use; the message says what arrived and what is accepted."""


def describe(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, (str, os.PathLike)) else repr(str(value))


def reason(error: Exception, source: Any = None) -> str:
    """A decoder's complaint without the memory address of its buffer or the server's folders."""
    text = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>:?", "", str(error))
    if isinstance(source, (str, os.PathLike)):
        text = text.replace(str(source), Path(source).name)
    return text.strip() or type(error).__name__
