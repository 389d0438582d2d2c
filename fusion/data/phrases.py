"""Number phrases for the digits task: words in five languages, numerals, arithmetic, sentences, typos.

Training and validation use disjoint sentence templates, so validation measures unseen phrasings.

    python -m fusion.data.phrases --split val --count 2000 --out text.tsv
"""

from __future__ import annotations

import argparse
import functools
import random
from pathlib import Path

WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "zh": ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
}
ROMAN = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
OPERATORS = {  # spelling -> function; words and symbols
    "plus": lambda a, b: a + b,
    "+": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "-": lambda a, b: a - b,
    "times": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "*": lambda a, b: a * b,
    "×": lambda a, b: a * b,
}
TEMPLATES = {
    "train": {
        "en": ["{}", "the number is {}", "it is {}", "number {}", "{} please", "the answer is {}", "show me {}"],
        "zh": ["{}", "我说的是{}", "答案是{}", "是{}"],
    },
    "val": {
        "en": ["{}", "my number is {}", "this is {}", "the digit {}", "that is {}"],
        "zh": ["{}", "这是{}", "数字{}"],
    },
}
NO_NUMBER = [
    "hello", "what is this", "blue sky", "nothing here", "good morning", "cat and dog", "random words",
    "你好", "天气很好", "bonjour", "hola amigo", "guten tag", "the quick brown fox", "no idea", "asdf qwer",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Filler for training phrases, so the model learns to ignore words it has never seen.
# Words of the validation-only templates (this, that, my, digit, 这, 数字) are never filler.
FILLER_WORDS = [
    "hello", "please", "okay", "well", "so", "and", "a", "it", "was", "what", "maybe", "think", "now", "here",
    "answer", "say", "said", "write", "wrote", "look", "see", "yes", "no", "just", "only", "also", "again",
    "picture", "sound", "word", "guess", "sure", "exactly", "ja", "oui", "si", "bitte", "merci", "gracias",
]
FILLER_CJK = "的了是我你他她们那个在有和说吗呢吧好很大小上下中来去看想要会能对"
FILLER_PUNCTUATION = [",", ".", "!", "?", ":", "...", "-"]


def _all_number_words() -> dict[str, int]:
    table = {}
    for words in WORDS.values():
        for digit, word in enumerate(words):
            table[word] = digit
    return table


NUMBER_WORDS = _all_number_words()


def misspell(word: str, rng: random.Random) -> str:
    """Change one letter of a word of four or more letters (replace, drop or insert), never into another
    digit's word."""
    if len(word) < 4 or not word.isalpha():
        return word
    for _ in range(20):
        i = rng.randrange(len(word))
        kind = rng.choice(("replace", "drop", "insert"))
        if kind == "replace":
            out = word[:i] + rng.choice(ALPHABET) + word[i + 1 :]
        elif kind == "drop":
            out = word[:i] + word[i + 1 :]
        else:
            out = word[:i] + rng.choice(ALPHABET) + word[i:]
        clash = NUMBER_WORDS.get(out.lower())
        if out.lower() != word.lower() and (clash is None or clash == NUMBER_WORDS.get(word.lower())):
            return out
    return word


def _case(text: str, rng: random.Random) -> str:
    return rng.choice((str.lower, str.upper, str.title, str.capitalize))(text)


def number_expression(digit: int, rng: random.Random, *, typo_rate: float = 0.15, arithmetic_weight: float = 2) -> tuple[str, str]:
    """A bare way of writing `digit`, and the language of the sentence it can sit in ("en" or "zh")."""
    kind = rng.choices(("numeral", "word", "roman", "arithmetic"), weights=(2, 6, 1, arithmetic_weight))[0]
    if kind == "roman" and digit == 0:
        kind = "word"
    if kind == "numeral":
        return str(digit), rng.choice(("en", "zh"))
    if kind == "roman":
        return ROMAN[digit], "en"
    if kind == "word":
        language = rng.choice(list(WORDS))
        word = WORDS[language][digit]
        if language != "zh":
            word = _case(word, rng)
            if rng.random() < typo_rate:
                word = misspell(word, rng)
        return word, "zh" if language == "zh" else "en"
    return _arithmetic(digit, rng), "en"


@functools.cache
def _sums(digit: int) -> tuple[tuple[int, str, int], ...]:
    """Every (a, operator, b) of single digits that makes `digit`, in a fixed order (computed once per digit:
    a training run draws 20,000 phrases: listing the sums for each one made that 1.24 s, once per digit 0.41 s)."""
    return tuple(
        (a, op, b)
        for op, fn in OPERATORS.items()
        for a in range(10)
        for b in range(10)
        if fn(a, b) == digit and not (op in ("times", "x", "*", "×") and (a < 1 or b < 1))
    )


def _arithmetic(digit: int, rng: random.Random) -> str:
    a, op, b = rng.choice(_sums(digit))
    words = rng.random() < 0.5

    def operand(n: int) -> str:
        return WORDS["en"][n] if words else str(n)

    spacing = " " if op.isalpha() or words or rng.random() < 0.5 else ""
    return _case(f"{operand(a)}{spacing}{op}{spacing}{operand(b)}", rng) if words else f"{a}{spacing}{op}{spacing}{b}"


def filler(rng: random.Random) -> str:
    """A random non-number word: letters, CJK characters or punctuation."""
    kind = rng.random()
    if kind < 0.35:
        return _case(rng.choice(FILLER_WORDS), rng)
    if kind < 0.65:
        word = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 8)))
        return word if word not in NUMBER_WORDS else "xyz"
    if kind < 0.85:
        return "".join(rng.choice(FILLER_CJK) for _ in range(rng.randint(1, 3)))
    return rng.choice(FILLER_PUNCTUATION)


def phrase(digit: int, rng: random.Random, *, split: str = "train", filler_rate: float = 0.5) -> str:
    """A phrase meaning `digit`, from the templates of `split` ("train" or "val"); training phrases also get
    random filler words around the number, with probability `filler_rate`."""
    # Training sees more arithmetic than validation: it is the hardest kind of phrase to learn.
    expression, language = number_expression(digit, rng, arithmetic_weight=4 if split == "train" else 2)
    template = rng.choice(TEMPLATES[split][language])
    text = template.format(expression)
    if language == "en" and template != "{}" and rng.random() < 0.3:
        text = _case(text, rng)
    if split == "train" and rng.random() < filler_rate:
        before = [filler(rng) for _ in range(rng.randint(0, 3))]
        after = [filler(rng) for _ in range(rng.randint(0 if before else 1, 2))]
        text = " ".join([*before, text, *after])
    return text


def no_number_phrase(rng: random.Random) -> str:
    """A phrase that names no digit: the text modality's garbage."""
    return _case(rng.choice(NO_NUMBER), rng)


def corpus(rng: random.Random, *, count: int) -> list[str]:
    """Training phrases (with filler), no-number phrases and every number word, to train the tokenizer on.
    Validation templates stay out, so their words are as new to the tokenizer as to the model."""
    texts = [phrase(rng.randrange(10), rng, split="train") for _ in range(count)]
    return texts + NO_NUMBER + [w for words in WORDS.values() for w in words] + ROMAN[1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("train", "val"), default="val")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="TSV file: phrase<TAB>digit per line")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    lines = []
    for i in range(args.count):
        digit = i % 10
        lines.append(f"{phrase(digit, rng, split=args.split)}\t{digit}")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
