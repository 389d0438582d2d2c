"""Make a checkpoint smaller and faster: structured pruning of attention heads and MLP channels.

    python -m fusion.compress prune --model DIR --out DIR --data DIR [--heads K] [--width F] [--only PREFIX ...]
                                    [--items N] [--json]

`--data` is a folder in the evaluate layout (`mnist/`, `fsdd/`, `text.tsv`; any of them) whose items measure how
much each head and channel matters: the first-order estimate of the loss change when a unit is removed,
|Σ gradient × weight| over the unit's weights, summed over batches of every modality subset (Molchanov et al.,
"Importance estimation for neural network pruning", 2019). Use training or validation data, never test data.
Every attention block of the encoders keeps its `--heads` most important heads, every MLP its `--width` share of
channels; `--only` limits both to blocks whose name starts with a prefix (`encoders.audio`). The pruned
checkpoint records its sizes in `config.json` (`pruned`) and loads with `from_pretrained` in every precision.
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

from .data.examples import collate
from .evaluate import load_pools, paired_examples
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


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_command(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    pipeline = FusionPipeline.from_pretrained(args.model, precision="fp32", device=args.device)
    model = pipeline.model
    before = parameter_count(model)
    blocks = prunable_blocks(model.fusion)
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
        "kept": {path: f"{len(keep)}/{next(b.count for b in blocks if b.path == path)}" for path, keep in plan.items()},
        "parameters": {"before": before, "after": parameter_count(model)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "pruning.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


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
    pruning.add_argument("--device", default="cpu")
    pruning.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        report = prune_command(args)
    except ValueError as error:
        raise SystemExit(f"fusion.compress: {error}") from None
    print(json.dumps(report, indent=None if args.json else 1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
