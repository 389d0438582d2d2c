"""Synthetic spoken digits from espeak-ng and flite, to widen the voices beyond FSDD's five adult men.

The clips are made once into a cache folder and reused; without either program installed the list is empty
and training goes on with recorded speech only.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

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


def synthetic_clips(cache: str | Path) -> list[Clip]:
    """Make (or reuse) the synthetic clips under `cache`; speaker names start with `tts-`."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    clips = []
    if shutil.which("espeak-ng"):
        for voice, pitch, speed in itertools.product(ESPEAK_VOICES, ESPEAK_PITCHES, ESPEAK_SPEEDS):
            speaker = f"tts-espeak-{voice.replace('+', '-')}-{pitch}-{speed}"
            for digit, word in enumerate(DIGIT_WORDS):
                path = cache / f"{digit}_{speaker}.wav"
                if not path.is_file():
                    command = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(path), word]
                    subprocess.run(command, check=True, capture_output=True, timeout=30)
                    _store_at_rate(path)
                clips.append(Clip(path, digit, speaker))
    if shutil.which("flite"):
        for voice in FLITE_VOICES:
            speaker = f"tts-flite-{voice}"
            for digit, word in enumerate(DIGIT_WORDS):
                path = cache / f"{digit}_{speaker}.wav"
                if not path.is_file():
                    subprocess.run(["flite", "-voice", voice, "-t", word, "-o", str(path)], check=True, capture_output=True, timeout=30)
                    _store_at_rate(path)
                clips.append(Clip(path, digit, speaker))
    return clips


def _store_at_rate(path: Path) -> None:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(samples.mean(axis=1))
    soundfile.write(path, torchaudio.functional.resample(mono, rate, RATE).numpy(), RATE, subtype="PCM_16")
