"""Synthetic spoken digits from espeak-ng, flite and festival, to widen the voices beyond FSDD's five adult men.

The clips are made once into a cache folder and reused; a program that is not installed is skipped, and without
any of them the list is empty and training goes on with recorded speech only.

Measured on a validation speaker of FSDD (nicolas; the evaluation speaker untouched), audio-only training on the
other three: no synthetic voices 59.2%, the fixed espeak-ng/flite grid 77.2%, plus the accent × voice draws and
festival 78.4%.
"""

from __future__ import annotations

import itertools
import random
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import soundfile
import torch
import torchaudio

from .sources import Clip

RATE = 8000  # stored at the digits model's rate: a third of the disk, and no resampling at training time

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


class Voice(NamedTuple):
    """One synthetic speaker: the program and its arguments before the word; `festival_voice` names the festival
    voice it needs (each is its own Debian package)."""

    speaker: str
    program: str
    arguments: list[str]
    festival_voice: str | None = None


def voices() -> list[Voice]:
    """Every synthetic voice, whether or not its program is installed."""
    out = []
    for voice, pitch, speed in itertools.product(ESPEAK_VOICES, ESPEAK_PITCHES, ESPEAK_SPEEDS):
        speaker = f"tts-espeak-{voice.replace('+', '-')}-{pitch}-{speed}"
        out.append(Voice(speaker, "espeak-ng", ["-v", voice, "-p", str(pitch), "-s", str(speed)]))
    draws = random.Random(0)
    for draw in range(ESPEAK_DRAWS):
        voice = f"{draws.choice(ESPEAK_ACCENTS)}+{draws.choice(ESPEAK_VARIANTS)}"
        pitch, speed = draws.randint(15, 95), draws.randint(100, 200)
        out.append(Voice(f"tts-espeak-draw{draw}", "espeak-ng", ["-v", voice, "-p", str(pitch), "-s", str(speed)]))
    out += [Voice(f"tts-flite-{voice}", "flite", ["-voice", voice, "-t"]) for voice in FLITE_VOICES]
    for voice, (pitches, stretches) in FESTIVAL_VOICES.items():
        for pitch, stretch in itertools.product(pitches, stretches):
            settings = [f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {stretch})"]
            if pitch:
                settings.append(f"(set! int_lr_params '((target_f0_mean {pitch}) (target_f0_std {pitch // 6}) "
                                "(model_f0_mean 170) (model_f0_std 34)))")
            speaker = f"tts-festival-{voice.split('_')[0]}-{pitch}-{stretch}"
            out.append(Voice(speaker, "text2wave", [a for e in settings for a in ("-eval", e)], voice))
    return out


def _speak(voice: Voice, word: str, path: Path) -> None:
    """Write `word` in `voice` to `path`, stored at the model's rate. Each program takes the word its own way."""
    if voice.program == "text2wave":
        command, text = [voice.program, "-o", str(path), *voice.arguments], word.encode()
    elif voice.program == "flite":
        command, text = [voice.program, *voice.arguments, word, "-o", str(path)], None
    else:
        command, text = [voice.program, *voice.arguments, "-w", str(path), word], None
    subprocess.run(command, input=text, check=True, capture_output=True, timeout=60)
    _store_at_rate(path)


def synthetic_clips(cache: str | Path) -> list[Clip]:
    """Make (or reuse) the synthetic clips under `cache` with the programs installed; speaker names start with
    `tts-`."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    candidates = voices()
    programs = {v.program for v in candidates if shutil.which(v.program)}
    festival = {p.name for p in Path(FESTIVAL_FOLDER).glob("*/*")}
    clips = []
    for voice in candidates:
        if voice.program not in programs or (voice.festival_voice and voice.festival_voice not in festival):
            continue
        for digit, word in enumerate(DIGIT_WORDS):
            path = cache / f"{digit}_{voice.speaker}.wav"
            if not path.is_file():
                _speak(voice, word, path)
            clips.append(Clip(path, digit, voice.speaker))
    return clips


def _store_at_rate(path: Path) -> None:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    soundfile.write(path, torchaudio.functional.resample(mono, rate, RATE).numpy(), RATE, subtype="PCM_16")
