"""Write the held-out evaluation folder of the digits task.

    python -m fusion.data.heldout --data ../shared/data --out heldout [--limit N]

It holds the MNIST images kept out of training, every clip of the held-out speaker and phrases from
validation-only templates, in the layout `python -m fusion.evaluate --data` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import shutil

from PIL import Image

from .sources import HELD_OUT_SPEAKER, list_fsdd, load_mnist, mnist_split, write_heldout

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


def write_examples(data: str | Path, out: str | Path) -> Path:
    """Example inputs for the app from held-out data: drawings (an MNIST digit scaled up, dark on light, as a
    person draws it), clips of the held-out speaker, and `examples.tsv` rows of image, text, audio."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_mnist(data)
    _, held = mnist_split(len(images))
    clips = [c for c in list_fsdd(data) if c.speaker == HELD_OUT_SPEAKER]
    rows = ["image\ttext\taudio"]
    for image_digit, text, audio_digit in EXAMPLE_ROWS:
        image_name = audio_name = ""
        if image_digit is not None:
            index = next(i for i in held if labels[i] == image_digit)
            image_name = f"digit-{image_digit}.png"
            drawing = Image.fromarray(255 - images[index]).resize((280, 280), Image.BICUBIC)
            drawing.save(out / image_name)
        if audio_digit is not None:
            clip = next(c for c in clips if c.label == audio_digit)
            audio_name = f"spoken-{audio_digit}.wav"
            shutil.copyfile(clip.path, out / audio_name)
        rows.append(f"{image_name}\t{text}\t{audio_name}")
    (out / "examples.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with mnist/ and fsdd/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per modality")
    parser.add_argument("--examples", default=None, help="also write the app's example inputs to this folder")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data!r} is not a folder")
    out = write_heldout(args.data, args.out, limit=args.limit)
    print(f"wrote {out} (held-out speaker: {HELD_OUT_SPEAKER})")
    if args.examples:
        print(f"wrote {write_examples(args.data, args.examples)}")


if __name__ == "__main__":
    main()
