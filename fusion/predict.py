"""Predict a whole manifest: one output row per input row, with probabilities, embeddings and (optionally) shares.

    python -m fusion.predict --model DIR --manifest FILE.csv|.jsonl --out FILE.jsonl|.parquet [--explain]
    accelerate launch --cpu --num_processes 2 -m fusion.predict --model DIR --manifest FILE --out FILE.jsonl

The manifest is the one training reads (columns `image`, `audio`, `text`, any may be empty, paths relative to
the manifest; `label` is optional here). Each output row has `line` (the manifest's line number), `input` (the
row's inputs, paths made absolute), `label` (if
given), `prediction`, `confidence`, `correct` (with a label), `probs`, `modalities`, `embeddings` (per modality,
where the checkpoint has an embedding head), `audio_scale` (the view a clip was heard at, where the checkpoint has
audio views) and, with `--explain`, `shares`, `agreement` and `alone`. A row that
cannot be read or predicted is reported on stderr with its line number and skipped; the run goes on. Under
`accelerate launch` the rows are split between the processes and gathered in the manifest's order, so the output
is the same as from one process. `.parquet` needs pyarrow (not a dependency); `.jsonl` needs nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .input_errors import FusionInputError
from .modalities import MODALITIES, PRECISIONS
from .pipeline import FusionPipeline, Prediction
from .retrieval import predict_and_embed


def read_rows(path: str | Path) -> tuple[list[tuple[int, dict[str, Any], str | None]], list[str]]:
    """(line number, item, label or None) of every usable row of a CSV or JSONL manifest, and a message per row
    that is not (no modality, a missing file, not JSON)."""
    path = Path(path)
    records: list[tuple[int, Any]] = []
    problems: list[str] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    problems.append(f"{path}:{number}: not JSON ({error.msg})")
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            records = [(reader.line_num, record) for record in reader]
    else:
        raise SystemExit(f"manifest {path} must end in .csv or .jsonl")
    rows = []
    for number, record in records:
        if not isinstance(record, dict):
            problems.append(f"{path}:{number}: not an object with image/audio/text columns")
            continue
        item, missing = {}, None
        for key in MODALITIES:
            value = record.get(key)
            if value in (None, ""):
                continue
            value = str(value).strip()
            if key in ("image", "audio"):
                file = Path(value) if Path(value).is_absolute() else path.parent / value
                if not file.is_file():
                    missing = f"{path}:{number}: {key} file {str(file)!r} does not exist"
                    break
                value = str(file)
            item[key] = value
        if missing:
            problems.append(missing)
        elif not item:
            problems.append(f"{path}:{number}: none of image, audio, text")
        else:
            label = record.get("label")
            rows.append((number, item, None if label in (None, "") else str(label).strip()))
    return rows, sorted(problems, key=_line)


def _line(message: str) -> int:
    """The line number of a `path:line: ...` message."""
    return int(message.split(": ", 1)[0].rsplit(":", 1)[1])


def output_row(number: int, label: str | None, prediction: Prediction, embeddings: dict[str, Any],
               item: dict[str, Any], *, explain: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"line": number, "input": item, "label": label, "prediction": prediction.label,
                           "confidence": round(prediction.confidence, 6),
                           "correct": None if label is None else prediction.label == label,
                           "probs": {k: round(v, 6) for k, v in prediction.probs.items()},
                           "modalities": prediction.modalities,
                           "embeddings": {m: [round(float(x), 6) for x in v] for m, v in embeddings.items()}}
    if "audio_scale" in prediction.meta:  # the view the clip was heard at (FusionConfig.audio_views)
        row["audio_scale"] = round(prediction.meta["audio_scale"], 6)
    explanation = prediction.explanation
    if explanation is not None:
        row["shares"] = {m: round(v, 6) for m, v in explanation.modality_shares.items()}
        row["agreement"] = explanation.agreement
        row["alone"] = {m: explanation.counterfactuals[m][0] for m in prediction.modalities}
    elif explain:  # one modality: it carries the whole answer and agrees with itself
        (modality,) = prediction.modalities
        row["shares"] = {modality: 1.0}
        row["agreement"] = {"agree": True, "labels": {modality: prediction.label}, "disagreeing": []}
        row["alone"] = {modality: prediction.label}
    return row


def _answer(pipeline: FusionPipeline, chunk: list[tuple[int, dict, str | None]], *, explain: bool, embed: bool) -> list[dict]:
    """Output rows of a chunk. Items answered plainly (all, or with `explain` the single-modality ones, whose shares
    and agreement are known without it) take one forward pass that also gives their embeddings; with `explain`,
    multimodal items are explained, and their explanation carries the embeddings."""
    items = [item for _, item, _ in chunk]
    several = {i for i, item in enumerate(items) if len(item) > 1} if explain else set()
    answers: list[tuple[Prediction, dict[str, Any]] | None] = [None] * len(items)
    plain = [i for i in range(len(items)) if i not in several]
    if plain:
        chosen = [items[i] for i in plain]
        if embed:
            predictions, embeddings = predict_and_embed(pipeline, chosen)
        else:
            predictions, embeddings = pipeline(chosen), [{} for _ in chosen]
        for i, prediction, embedded in zip(plain, predictions, embeddings):
            answers[i] = (prediction, embedded)
    if several:
        order = sorted(several)
        for i, prediction in zip(order, pipeline([items[i] for i in order], explain=True)):
            answers[i] = (prediction, dict(prediction.explanation.embeddings) if prediction.explanation else {})
    return [output_row(n, label, answer[0], answer[1], item, explain=explain)
            for (n, item, label), answer in zip(chunk, answers) if answer is not None]


def predict_rows(pipeline: FusionPipeline, rows: list[tuple[int, dict, str | None]], *, explain: bool, batch_size: int,
                 progress: bool = True) -> tuple[list[dict], list[str]]:
    """Output rows for `rows` and a message per row that failed; a failing batch is retried item by item so that
    one bad file costs only its own row."""
    results, problems = [], []
    embed = pipeline.model.embedding_head is not None
    bar = tqdm(total=len(rows), desc="predict", disable=not progress, file=sys.stderr)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        try:
            results += _answer(pipeline, chunk, explain=explain, embed=embed)
        except FusionInputError:
            for row in chunk:
                try:
                    results += _answer(pipeline, [row], explain=explain, embed=embed)
                except FusionInputError as error:
                    problems.append(f"line {row[0]}: {error}")
        bar.update(len(chunk))
    bar.close()
    return results, problems


def write_rows(rows: list[dict], path: Path) -> None:
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.DataFrame(rows)
        for column in ("probs", "embeddings", "shares", "agreement", "alone"):
            if column in frame:
                frame[column] = frame[column].map(lambda v: json.dumps(v, ensure_ascii=False))
        frame.to_parquet(path)
    else:
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--manifest", required=True, help="CSV or JSONL with image, audio, text (and optional label) columns")
    parser.add_argument("--out", required=True, help="output file, .jsonl or .parquet")
    parser.add_argument("--explain", action="store_true", help="add modality shares, agreement and each modality's answer alone")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".jsonl", ".parquet"):
        parser.error(f"--out must end in .jsonl or .parquet, got {out.name!r}")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            parser.error("writing .parquet needs pyarrow (pip install pyarrow); .jsonl needs nothing")
    if not Path(args.manifest).is_file():
        parser.error(f"--manifest {args.manifest!r} does not exist")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    rows, problems = read_rows(args.manifest)
    device = state.device if state.device.type == "cuda" else None
    pipeline = FusionPipeline.from_pretrained(args.model, precision=args.precision, device=device)
    started = time.perf_counter()
    with state.split_between_processes(rows) as mine:
        results, failed = predict_rows(pipeline, list(mine), explain=args.explain, batch_size=args.batch_size,
                                       progress=state.is_local_main_process)
    results = gather_object(results) if state.num_processes > 1 else results
    failed = gather_object(failed) if state.num_processes > 1 else failed
    if state.is_main_process:
        results = sorted(results, key=lambda row: row["line"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_rows(results, out)
        seconds = time.perf_counter() - started
        for message in problems + sorted(failed, key=lambda m: int(m.split()[1].rstrip(":"))):
            print(f"skipped {message}", file=sys.stderr)
        print(f"{len(results)} rows to {out} in {seconds:.1f} s ({len(results) / max(seconds, 1e-9):.0f} items/s); "
              f"{len(problems) + len(failed)} skipped", file=sys.stderr)
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
