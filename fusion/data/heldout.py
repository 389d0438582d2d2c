"""Write the held-out evaluation folder of the digits task.

    python -m fusion.data.heldout --data ../shared/data --out heldout [--limit N]

It holds the MNIST images kept out of training, every clip of the held-out speaker and phrases from
validation-only templates, in the layout `python -m fusion.evaluate --data` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .sources import HELD_OUT_SPEAKER, write_heldout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with mnist/ and fsdd/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per modality")
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data!r} is not a folder")
    out = write_heldout(args.data, args.out, limit=args.limit)
    print(f"wrote {out} (held-out speaker: {HELD_OUT_SPEAKER})")


if __name__ == "__main__":
    main()
