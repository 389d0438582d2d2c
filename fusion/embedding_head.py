"""Fit an embedding head to a checkpoint that was trained without one: the shared space in which an image, a clip
and a phrase of the same class lie close together (`FusionPipeline.embed`, `similarity`, `index`, `search`).

    python -m fusion.embedding_head --model DIR --data ../shared/data [--size 64] [--steps 800]

`fusion.train` trains the head beside the classifier (its contrastive loss); this is for checkpoints without one.
The classifier stays as it is: each modality's summary state alone (what the model computes when given only that
modality) is computed once for the training items, frozen, and a linear head is trained on them with a supervised
contrastive loss (InfoNCE with every item of the same class as a positive, across and within modalities) in a
minute or two on a CPU. Training items are those the checkpoint trained on (MNIST outside the held-out split, the
FSDD training speakers, the synthetic voices when their cache exists, training-template phrases); a tenth of each
is kept out to validate on. The held-out test data is never read here. The head is written into the checkpoint
(`--out`, default the model folder itself), with `embedding_head` in its training_log.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import phrases
from .data.sources import HELD_OUT_SPEAKER, list_fsdd, load_mnist, mnist_split
from .data.synthetic import synthetic_clips
from .modalities import MODALITIES, subset_key
from .pipeline import FusionPipeline
from .retrieval import alone_passes, pairwise_recall, supervised_contrastive


def summaries(pipeline: FusionPipeline, items: list[dict], *, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per modality, (N, F) summary states of each item's modality alone (items of one modality each)."""
    found: dict[str, list[np.ndarray]] = {}
    for _, _, _, alone in alone_passes(pipeline, items, batch_size=batch_size):
        for modality, (summary, _) in alone.items():
            found.setdefault(modality, []).append(summary.float().cpu().numpy())
    return {m: np.concatenate(v) for m, v in found.items()}


def training_items(data: Path, cache: Path | None, *, per_modality: int, seed: int) -> dict[str, tuple[list, list[int]]]:
    """Per modality, (inputs, labels) the checkpoint trained on, at most `per_modality` of each, shuffled."""
    rng = random.Random(seed)
    result: dict[str, tuple[list, list[int]]] = {}
    mnist = load_mnist(data)
    if mnist is not None:
        train, _ = mnist_split(len(mnist[0]))
        chosen = rng.sample(list(train), min(per_modality, len(train)))
        result["image"] = ([mnist[0][i] for i in chosen], [int(mnist[1][i]) for i in chosen])
    clips = [c for c in list_fsdd(data) if c.speaker != HELD_OUT_SPEAKER]
    if cache is not None and (cache / "synthetic-voices").is_dir():
        clips += synthetic_clips(cache / "synthetic-voices")
    if clips:
        chosen_clips = rng.sample(clips, min(per_modality, len(clips)))
        result["audio"] = ([str(c.path) for c in chosen_clips], [c.label for c in chosen_clips])
    digits = [rng.randrange(10) for _ in range(per_modality)]
    result["text"] = ([phrases.phrase(d, rng, split="train") for d in digits], digits)
    return result


def train_head(states: dict[str, np.ndarray], labels: dict[str, np.ndarray], *, size: int, steps: int, temperature: float,
               batch: int, lr: float, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    width = next(iter(states.values())).shape[1]
    head = nn.Linear(width, size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    tensors = {m: torch.from_numpy(s) for m, s in states.items()}
    targets = {m: torch.from_numpy(y) for m, y in labels.items()}
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = {m: torch.randint(0, len(t), (batch,), generator=generator) for m, t in tensors.items()}
        vectors = F.normalize(head(torch.cat([tensors[m][r] for m, r in rows.items()])), dim=-1)
        loss = supervised_contrastive(vectors, torch.cat([targets[m][r] for m, r in rows.items()]), temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps)))
    return head


def project(head: nn.Linear, states: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(head(torch.from_numpy(states)), dim=-1).numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", required=True, help="folder with mnist/ and fsdd/ (the digits task)")
    parser.add_argument("--out", default=None, help="checkpoint folder to write (default: --model)")
    parser.add_argument("--cache", default=None, help="folder with synthetic-voices/ made by training (optional)")
    parser.add_argument("--size", type=int, default=64, help="width of the shared space")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=128, help="items per modality per step")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--per-modality", type=int, default=3000, help="training items per modality, at most")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.size < 1 or args.steps < 1 or args.batch < 2 or not 0 < args.temperature:
        parser.error("--size and --steps must be positive, --batch at least 2, --temperature above 0")
    started = time.perf_counter()
    pipeline = FusionPipeline.from_pretrained(args.model, precision="fp32", device="cpu")
    found = training_items(Path(args.data), Path(args.cache) if args.cache else None, per_modality=args.per_modality, seed=args.seed)
    states, labels, val_states, val_labels = {}, {}, {}, {}
    for modality in MODALITIES:
        if modality not in found:
            continue
        inputs, digits = found[modality]
        index = {label: i for i, label in enumerate(pipeline.labels)}
        y = np.array([index[str(d)] for d in digits])
        s = summaries(pipeline, [{modality: x} for x in inputs])[modality]
        cut = len(s) // 10
        val_states[modality], val_labels[modality] = s[:cut], y[:cut]
        states[modality], labels[modality] = s[cut:], y[cut:]
        print(f"{modality}: {len(s) - cut} training and {cut} validation items ({time.perf_counter() - started:.0f} s)", flush=True)
    if len(states) < 2:
        raise SystemExit(f"need at least two modalities in {args.data} to align; found {', '.join(states) or 'none'}")
    head = train_head(states, labels, size=args.size, steps=args.steps, temperature=args.temperature, batch=args.batch,
                      lr=args.lr, seed=args.seed)
    validation = pairwise_recall({m: project(head, s) for m, s in val_states.items()}, val_labels)
    print(json.dumps({"validation": validation}, ensure_ascii=False), flush=True)

    model = pipeline.model
    model.config.embedding_size = args.size
    model.embedding_head = head
    out = Path(args.out or args.model)
    model.save_pretrained(out)
    pipeline.processor.save_pretrained(out)
    record = {"size": args.size, "steps": args.steps, "batch": args.batch, "temperature": args.temperature,
              "lr": args.lr, "seed": args.seed, "training_items": {m: int(len(s)) for m, s in states.items()},
              "validation": validation, "seconds": round(time.perf_counter() - started, 1),
              "modalities": subset_key(states)}
    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    log["embedding_head"] = record
    log_path.write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")
    print(f"saved {out} after {record['seconds']} s")
    return record


if __name__ == "__main__":
    main()
