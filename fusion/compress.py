"""Make a checkpoint smaller and faster: structured pruning of attention heads and MLP channels, distillation
into a smaller student, and a table of what each version costs and keeps.

    python -m fusion.compress prune --model DIR --out DIR --data DIR [--heads K] [--width F] [--only PREFIX ...]
                                    [--items N] [--finetune-epochs N --train-data DIR [fusion.train options]] [--json]

`--data` is a folder in the evaluate layout (`mnist/`, `fsdd/`, `text.tsv`; any of them) whose items measure how
much each head and channel matters: the first-order estimate of the loss change when a unit is removed,
|Σ gradient × weight| over the unit's weights, summed over batches of every modality subset (Molchanov et al.,
"Importance estimation for neural network pruning", 2019). Use training or validation data, never test data.
Every attention block of the encoders keeps its `--heads` most important heads, every MLP its `--width` share of
channels; `--only` limits both to blocks whose name starts with a prefix (`encoders.audio`). The pruned
checkpoint records its sizes in `config.json` (`pruned`) and loads with `from_pretrained` in every precision.
With `--finetune-epochs`, `fusion.train --init OUT` then trains it further on `--train-data` (the training
layout), with any other options passed on to it (`--lr 5e-4`, `--cache DIR`, ...); a Whisper encoder stays frozen.

    python -m fusion.compress distill --teacher DIR --out DIR (--data DIR | --manifest FILE) [--config small|JSON]
                                      [--epochs N] [fusion.train options]

trains a student with `fusion.train --teacher`: each answer, fused or one modality alone, learns the teacher's
temperature-scaled answer (`--distill` of the loss, default half) beside the label. The student reads the teacher's
processor and shares a Whisper teacher's frozen encoder (or, with `--audio-encoder convnext`, trains its own over
the same log-mel while the teacher hears the raw clips); `--config small` halves the other widths (fusion 64, text
48, image ConvNeXt 32/64), a JSON object sets any of `STUDENT_SIZES` itself (widths, layer counts, ConvNeXt blocks
per stage, and `whisper_layers`: the teacher's first N Whisper layers). A student with fewer Whisper layers tunes
its top ones (`--tune-audio-layers`): the cached states are their input, from which the teacher runs its own upper
layers, and `--distill-states W` also asks the student's Whisper output to match the teacher's. `--teacher-init`
starts the student from every teacher tensor whose name and shape fit (so a shallower student starts from the
teacher's first layers).

    python -m fusion.compress table --model DIR [DIR ...] --data DIR [--precision fp32 int8] [--repeats N] [--json]

measures each checkpoint in each precision on this machine: parameters, file size, memory footprint, p50 latency
of one three-modality prediction plain and explained (as `fusion.bench` times it), and accuracy on `--data` (the
evaluate layout) for every modality subset.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from .bench import ITEM, percentiles, timed
from .data.examples import collate
from .evaluate import evaluate, load_pools, paired_examples
from .modalities import SUBSET_KEYS
from .modeling import (
    FusionForClassification,
    FusionModel,
    PrunableBlock,
    prunable_blocks,
    prune_block,
)
from .pipeline import FusionPipeline


def importance_batches(pipeline: FusionPipeline, folder: str | Path, *, items: int = 512, batch_size: int = 32,
                       seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches (with `labels`) of up to `items` examples from `folder`, spread over every modality subset it
    allows, as evaluation pairs them."""
    pools = load_pools(folder, pipeline)
    if not pools:
        raise ValueError(f"{folder} has no mnist/, fsdd/ or text.tsv items to measure importance on")
    subsets = [tuple(key.split("+")) for key in SUBSET_KEYS if all(m in pools for m in key.split("+"))]
    rng = random.Random(seed)
    per_subset = math.ceil(items / len(subsets))
    examples = []
    for subset in subsets:
        candidates = paired_examples(pools, subset)
        examples += rng.sample(candidates, min(per_subset, len(candidates)))
    rng.shuffle(examples)
    examples = examples[:items]
    return [collate(examples[i : i + batch_size], pipeline.processor) for i in range(0, len(examples), batch_size)]


def _unit_scores(block: PrunableBlock, module: torch.nn.Module) -> torch.Tensor:
    """Σ gradient × weight over each unit's weights (its rows in the inputs, its columns in the output), (count,)."""
    def gradient_times(parameter: torch.Tensor | None) -> torch.Tensor | None:
        if parameter is None or parameter.grad is None:
            return None
        return parameter.grad * parameter

    score = torch.zeros(block.count)
    for name in block.inputs:
        layer = cast(torch.nn.Linear, module.get_submodule(name))
        taylor = cast(torch.Tensor, gradient_times(layer.weight)).sum(dim=1)  # (rows,)
        bias = gradient_times(layer.bias)
        if bias is not None:
            taylor = taylor + bias
        score += taylor.detach().float().cpu().view(block.count, block.unit).sum(dim=1)
    output = cast(torch.nn.Linear, module.get_submodule(block.output))
    taylor = cast(torch.Tensor, gradient_times(output.weight)).sum(dim=0)  # (columns,)
    return score + taylor.detach().float().cpu().view(block.count, block.unit).sum(dim=1)


def importance(model: FusionForClassification, batches: Iterable[dict[str, torch.Tensor]],
               blocks: list[PrunableBlock]) -> dict[str, torch.Tensor]:
    """Per block, each unit's estimated loss change if removed: |Σ gradient × weight| per batch, summed over
    batches. Frozen weights (a pretrained encoder) get gradients for the measurement only; the model's
    `requires_grad` flags and mode are restored."""
    base = model.fusion
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    model.requires_grad_(True)
    scores = {b.path: torch.zeros(b.count) for b in blocks}
    try:
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels").to(model.device)
            model.zero_grad(set_to_none=True)
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            F.cross_entropy(logits.float(), labels).backward()
            for block in blocks:
                scores[block.path] += _unit_scores(block, base.get_submodule(block.path)).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
        model.train(was_training)
    return scores


def choose(blocks: list[PrunableBlock], scores: dict[str, torch.Tensor], *, heads: int | None, width: float | None,
           only: list[str] | None = None) -> dict[str, list[int]]:
    """The units each block keeps (the most important, in their original order): `heads` per attention block,
    `width` × channels per MLP, for blocks under the `only` prefixes (all when None)."""
    if heads is not None and heads < 1:
        raise ValueError(f"--heads must be at least 1, got {heads}")
    if width is not None and not 0 < width <= 1:
        raise ValueError(f"--width must be in (0, 1], got {width}")
    plan = {}
    for block in blocks:
        if only and not any(block.path.startswith(prefix) for prefix in only):
            continue
        if block.kind == "heads" and heads is not None:
            kept = min(heads, block.count)
        elif block.kind == "width" and width is not None:
            kept = max(1, round(width * block.count))
        else:
            continue
        if kept < block.count:
            top = torch.topk(scores[block.path], kept).indices
            plan[block.path] = sorted(int(i) for i in top)
    return plan


def prune(model: FusionForClassification, plan: dict[str, list[int]]) -> None:
    """Remove every unit that `plan` does not keep, in place."""
    base: FusionModel = model.fusion
    blocks = {b.path: b for b in prunable_blocks(base)}
    for path, keep in plan.items():
        if path not in blocks:
            raise ValueError(f"no prunable block {path!r}; the model has {sorted(blocks)}")
        prune_block(base, blocks[path], keep)


def prune_command(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    pipeline = FusionPipeline.from_pretrained(args.model, precision="fp32", device=args.device)
    model = pipeline.model
    before = model.num_parameters()
    blocks = prunable_blocks(model.fusion)
    counts = {block.path: block.count for block in blocks}
    batches = importance_batches(pipeline, args.data, items=args.items)
    scores = importance(model, batches, blocks)
    plan = choose(blocks, scores, heads=args.heads, width=args.width, only=args.only)
    if not plan:
        raise SystemExit("nothing to prune: give --heads and/or --width below the model's sizes")
    prune(model, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    pipeline.processor.save_pretrained(out)
    report = {
        "model": str(args.model), "out": str(out), "heads": args.heads, "width": args.width, "only": args.only,
        "importance_items": sum(len(b["labels"]) for b in batches), "blocks_pruned": len(plan),
        "kept": {path: f"{len(keep)}/{counts[path]}" for path, keep in plan.items()},
        "parameters": {"before": before, "after": model.num_parameters()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.finetune_epochs:
        from . import train

        summary = train.main(["--init", str(out), "--data", args.train_data, "--out", str(out),
                              "--epochs", str(args.finetune_epochs), *args.train_options])
        report["finetune"] = {"epochs": args.finetune_epochs, "options": args.train_options,
                              "losses": [entry["loss"] for entry in summary["history"]], "seconds": summary["seconds"]}
    (out / "pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def measure(model: str | Path, data: str | Path, *, precision: str, repeats: int = 30) -> dict:
    """One row of the table: what `model` costs in `precision` on this machine and what it answers on `data`."""
    pipeline = FusionPipeline.from_pretrained(model, precision=precision, device="cpu")
    accuracy = evaluate(pipeline, data, garbage=False)
    return {
        "model": str(model), "precision": precision, "parameters": pipeline.model.num_parameters(),
        "file_mb": round((Path(model) / "model.safetensors").stat().st_size / 2**20, 2),
        "footprint_mb": round(pipeline.model.get_memory_footprint() / 2**20, 2),
        "plain_ms": percentiles(timed(lambda: pipeline(**ITEM), repeats))["p50_ms"],
        "explained_ms": percentiles(timed(lambda: pipeline(**ITEM, explain=True), repeats))["p50_ms"],
        "accuracy": {key: round(100 * value, 2) for key, value in accuracy.items() if key != "n"},
    }


def markdown(rows: list[dict]) -> str:
    keys = [key for key in SUBSET_KEYS if all(key in row["accuracy"] for row in rows)]
    lines = ["| model | precision | parameters | file (MiB) | footprint (MiB) | plain p50 | explained p50 | " + " | ".join(keys) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(keys)]
    for row in rows:
        lines.append(f"| {Path(row['model']).name} | {row['precision']} | {row['parameters'] / 1e6:.2f} M | {row['file_mb']} | "
                     f"{row['footprint_mb']} | {row['plain_ms']} ms | {row['explained_ms']} ms | "
                     + " | ".join(f"{row['accuracy'][key]:.2f}" for key in keys) + " |")
    return "\n".join(lines)


STUDENT_PRESETS = {"small": {"width": 64, "text_width": 48, "conv_widths": [32, 64]}}
STUDENT_SIZES = ("width", "text_width", "conv_widths", "embedding_size", "fusion_layers", "text_layers", "conv_depth",
                 "whisper_layers")


def student_options(config: str | None) -> list[str]:
    """`fusion.train` options for a student's sizes: a preset name or a JSON object of `STUDENT_SIZES`."""
    if not config:
        return []
    if config in STUDENT_PRESETS:
        sizes = STUDENT_PRESETS[config]
    else:
        try:
            sizes = json.loads(Path(config).read_text() if Path(config).is_file() else config)
        except json.JSONDecodeError as error:
            raise ValueError(f"--config must be {' or '.join(STUDENT_PRESETS)} or a JSON object, got {config!r} ({error.msg})") from None
        if not isinstance(sizes, dict) or set(sizes) - set(STUDENT_SIZES):
            raise ValueError(f"--config JSON must be an object with keys among {', '.join(STUDENT_SIZES)}, got {config!r}")
    options = []
    for key, value in sizes.items():
        options += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return options


def distill_command(args: argparse.Namespace) -> dict:
    from . import train

    source = ["--data", args.data] if args.data else ["--manifest", args.manifest]
    summary = train.main(["--teacher", args.teacher, "--out", args.out, *source, "--epochs", str(args.epochs),
                          *student_options(args.config), *args.train_options])
    return {"teacher": args.teacher, "out": args.out, "config": args.config, "epochs": args.epochs,
            "losses": [entry["loss"] for entry in summary["history"]], "seconds": summary["seconds"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fusion.compress", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pruning = commands.add_parser("prune", help="remove the least important attention heads and MLP channels")
    pruning.add_argument("--model", required=True, help="checkpoint folder to prune")
    pruning.add_argument("--out", required=True, help="folder for the pruned checkpoint")
    pruning.add_argument("--data", required=True, help="folder in the evaluate layout that importance is measured on")
    pruning.add_argument("--heads", type=int, default=None, help="attention heads each encoder attention block keeps")
    pruning.add_argument("--width", type=float, default=None, help="share of each MLP's channels kept, in (0, 1]")
    pruning.add_argument("--only", nargs="+", default=None, help="prune only blocks whose names start with these")
    pruning.add_argument("--items", type=int, default=512, help="examples importance is measured on")
    pruning.add_argument("--finetune-epochs", type=int, default=0, help="then train the pruned model this many epochs")
    pruning.add_argument("--train-data", default=None, help="training data for --finetune-epochs (fusion.train --data)")
    pruning.add_argument("--device", default="cpu")
    pruning.add_argument("--json", action="store_true", help="print the report as JSON")
    distill = commands.add_parser("distill", help="train a smaller student from a teacher's answers")
    distill.add_argument("--teacher", required=True, help="checkpoint folder of the teacher")
    distill.add_argument("--out", required=True, help="folder for the student checkpoint")
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="the digits task's data (fusion.train --data)")
    source.add_argument("--manifest", help="CSV or JSONL manifest (fusion.train --manifest)")
    distill.add_argument("--config", default=None, help="student sizes: 'small' or a JSON object (or file) of "
                         + ", ".join(STUDENT_SIZES) + "; default fusion.train's")
    distill.add_argument("--epochs", type=int, default=16)
    table = commands.add_parser("table", help="measure checkpoints: size, footprint, latency, accuracy per subset")
    table.add_argument("--model", nargs="+", required=True, help="checkpoint folders")
    table.add_argument("--data", required=True, help="folder in the evaluate layout (held-out data)")
    table.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8", "fp16", "bf16"])
    table.add_argument("--repeats", type=int, default=30, help="timed predictions per latency")
    table.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args, rest = parser.parse_known_args(argv)
    passes_on = args.command == "distill" or (args.command == "prune" and args.finetune_epochs)  # to fusion.train
    if rest and not passes_on:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "prune" and args.finetune_epochs and not args.train_data:
        parser.error("--finetune-epochs needs --train-data (the data fusion.train reads)")
    args.train_options = rest
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.command == "table":
        rows = [measure(model, args.data, precision=precision, repeats=args.repeats)
                for model in args.model for precision in args.precision]
        print(json.dumps(rows) if args.json else markdown(rows))
        return {"rows": rows}
    try:
        report = distill_command(args) if args.command == "distill" else prune_command(args)
    except ValueError as error:
        raise SystemExit(f"fusion.compress: {error}") from None
    print(json.dumps(report, indent=None if getattr(args, "json", False) else 1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
