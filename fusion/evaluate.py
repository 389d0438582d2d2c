"""Accuracy of a fusion checkpoint for every subset of modalities, and with one modality turned to garbage.

    python -m fusion.evaluate --model assets/fusion-digits --data heldout [--precision fp32|int8] [--json]

`--data` holds any of `mnist/images-idx3-ubyte.gz` with `mnist/labels-idx1-ubyte.gz`, `fsdd/{digit}_*.wav` and
`text.tsv` (`phrase<TAB>digit`). A multimodal example pairs the k-th item of each modality of the same digit,
cycling through the shorter lists.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import phrases
from .data.examples import collate
from .data.sources import folder_items, list_fsdd, load_mnist, load_phrases
from .modalities import HALF_PRECISIONS, MODALITIES, PRECISIONS, SUBSET_KEYS
from .pipeline import FusionPipeline

GARBAGE_KEYS = {"image": "noise image", "audio": "noise audio", "text": "no-number text"}


def load_pools(folder: str | Path, pipeline: FusionPipeline) -> dict[str, dict[int, list]]:
    """Per modality, per digit: preprocessed image and audio tensors and raw phrases found under `folder`; under
    `audio_pitch`, each clip's voice pitch (Hz, as the processor measures it), in the order of its features."""
    processor = pipeline.processor
    label_index = {label: i for i, label in enumerate(pipeline.labels)}
    pools: dict[str, dict[int, list]] = {}

    def index(digit: int) -> int:
        if str(digit) not in label_index:
            raise ValueError(f"the model has no label {str(digit)!r}; its labels are {pipeline.labels}")
        return label_index[str(digit)]

    mnist = load_mnist(folder)
    if mnist is not None:
        for image, digit in zip(*mnist):
            pools.setdefault("image", {}).setdefault(index(int(digit)), []).append(processor.image_features(image)[0])
    for clip in list_fsdd(folder):
        features, facts = processor.feature_extractor.prepare(str(clip.path))
        pools.setdefault("audio", {}).setdefault(index(clip.label), []).append(features)
        pools.setdefault("audio_pitch", {}).setdefault(index(clip.label), []).append(facts["audio_pitch"])
    for text, digit in load_phrases(folder) or []:
        pools.setdefault("text", {}).setdefault(index(digit), []).append(text)
    return pools


def garbage_pools(pipeline: FusionPipeline, *, count: int = 50, seed: int = 0) -> dict[str, list]:
    """Inputs that say nothing about the class: random-noise images, white-noise clips, phrases without a number,
    each through the same preprocessing as real inputs."""
    rng = np.random.default_rng(seed)
    processor = pipeline.processor
    rate = processor.settings.audio.sampling_rate
    images = [processor.image_features(rng.integers(0, 256, (64, 64), dtype=np.uint8))[0] for _ in range(count)]
    clips = [processor.audio_features((rate, rng.normal(0, 0.1, rate).astype(np.float32)))[0] for _ in range(count)]
    texts = [phrases.no_number_phrase(random.Random(i)) for i in range(count)]
    return {"image": images, "audio": clips, "text": texts}


def paired_examples(pools: dict, subset: tuple[str, ...], *, garbage: dict[str, Any] | None = None, replace: str | None = None) -> list[dict]:
    """The k-th item of each modality of the same label, cycling through shorter lists; `replace` swaps one
    modality for garbage."""
    labels = sorted(set.intersection(*(set(pools[m]) for m in subset if m != replace)))
    examples = []
    for label in labels:
        count = max(len(pools[m][label]) for m in subset if m != replace)
        for k in range(count):
            example = {"label": label}
            for modality in subset:
                source = (garbage or {})[modality] if modality == replace else pools[modality][label]
                example[modality] = source[(k + label) % len(source)] if modality == replace else source[k % len(source)]
            examples.append(example)
    return examples


def encode_audio(pipeline: FusionPipeline, pools: dict, *, batch_size: int = 128) -> dict:
    """`pools` with every audio feature (mel, frames) replaced by the audio encoder's output (T, E) for it, computed
    once: evaluation pairs each clip with many images and phrases, and the encoder need not hear it each time.
    The answers are the model's own (the same encoder, in eval mode, on the same features, each clip at the view
    its pitch, from `pools["audio_pitch"]` where known, and its answer choose)."""
    audio = pools.get("audio")
    if not audio:
        return pools
    pitches = pools.get("audio_pitch", {})
    modality = pipeline.model.fusion.encoder_of("audio")
    model = pipeline.model
    encoder = modality.encoder
    was_training = model.training
    model.eval()  # the encoder, and the answers that choose each clip's view (`audio_view`)
    encoded: dict[int, list] = {}
    try:
        for label, features in audio.items():
            states = []
            for start in range(0, len(features), batch_size):
                stacked = torch.stack(features[start : start + batch_size])
                pitch = pitches.get(label)
                pitch = None if pitch is None else torch.tensor(pitch[start : start + batch_size]).to(pipeline.device)
                with torch.inference_mode():
                    values = stacked.to(pipeline.device, next(encoder.parameters()).dtype
                                        if pipeline.precision in HALF_PRECISIONS else torch.float32)
                    view = model.audio_view(values, audio_pitch=pitch)  # each clip as the model's forward hears it
                    states += list((modality.features(view.values)[0] if view.states is None else view.states).cpu())
            encoded[label] = states
    finally:
        model.train(was_training)
    return dict(pools, audio=encoded)


def accuracy(pipeline: FusionPipeline, examples: list[dict], *, batch_size: int = 256, audio_states: bool = False) -> float:
    """Share of `examples` answered right, in eval mode (in training mode, dropout would be on and BatchNorm
    would learn the evaluation data's statistics); the model's mode is restored after. With `audio_states`, the
    examples' audio is already the audio encoder's output (`encode_audio`)."""
    was_training = pipeline.model.training
    pipeline.model.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pipeline.processor)
            labels = batch.pop("labels")
            if audio_states and "audio_values" in batch:
                batch["audio_encoder_states"] = batch.pop("audio_values")
            logits = pipeline.logits(batch).float().cpu()
            correct += int((logits.argmax(dim=-1) == labels).sum())
    finally:
        pipeline.model.train(was_training)
    return correct / max(len(examples), 1)


def evaluate(pipeline: FusionPipeline, folder: str | Path, *, garbage: bool = True) -> dict:
    """Accuracy and count per modality subset found under `folder`; with `garbage`, also every three-modality
    example with one modality replaced by garbage (keys like `image+audio+text|noise image`). `n` maps each key
    to its number of examples."""
    pools = encode_audio(pipeline, load_pools(folder, pipeline))
    results: dict = {"n": {}}
    for key in SUBSET_KEYS:
        subset = tuple(key.split("+"))
        if all(m in pools for m in subset):
            examples = paired_examples(pools, subset)
            results[key] = round(accuracy(pipeline, examples, audio_states=True), 5)
            results["n"][key] = len(examples)
    if garbage and all(m in pools for m in MODALITIES):
        noise = garbage_pools(pipeline)
        noise["audio"] = encode_audio(pipeline, {"audio": {0: noise["audio"]}})["audio"][0]
        for modality, name in GARBAGE_KEYS.items():
            examples = paired_examples(pools, MODALITIES, garbage=noise, replace=modality)
            key = f"image+audio+text|{name}"
            results[key] = round(accuracy(pipeline, examples, audio_states=True), 5)
            results["n"][key] = len(examples)
    return results


def evaluate_voices(pipeline: FusionPipeline, folder: str | Path) -> dict:
    """Audio accuracy on every voice test set under `folder` (each `NAME/fsdd/*.wav`, as
    `python -m fusion.data.heldout --voices` writes them), keyed `voices/NAME`, with counts under `n`."""
    results: dict = {"n": {}}
    for subfolder in sorted(p for p in Path(folder).iterdir() if (p / "fsdd").is_dir()):
        found = evaluate(pipeline, subfolder, garbage=False)
        if "audio" in found:
            results[f"voices/{subfolder.name}"] = found["audio"]
            results["n"][f"voices/{subfolder.name}"] = found["n"]["audio"]
    return results


def retrieval(pipeline: FusionPipeline, folder: str | Path) -> dict:
    """R@1 and R@5 of the shared embedding space for every ordered pair of modalities found under `folder` (each
    item of one modality queries all items of another; a hit is an item of the same label), with counts under
    `n`."""
    from .retrieval import embed_items, pairwise_recall

    items = folder_items(folder)
    vectors: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[str | None]] = {}
    for (_, item, label), embedded in zip(items, embed_items(pipeline, [item for _, item, _ in items])):
        for modality, vector in embedded.items():
            vectors.setdefault(modality, []).append(vector)
            labels.setdefault(modality, []).append(label)
    results: dict = pairwise_recall({m: np.stack(v) for m, v in vectors.items()}, {m: np.array(v) for m, v in labels.items()})
    results["n"] = {m: len(v) for m, v in vectors.items()}
    return results


def faithfulness(pipeline: FusionPipeline, folder: str | Path, *, count: int = 100) -> dict:
    """The deletion, attribution and cost checks below on up to `count` items per modality."""
    mnist = load_mnist(folder)
    clips = list_fsdd(folder)
    if mnist is None or not clips:
        raise ValueError(f"{folder} needs mnist/ and fsdd/ for the faithfulness checks")
    label_index = {label: i for i, label in enumerate(pipeline.labels)}
    # Spread the picks over the digits: the k-th of each digit in turn.
    images = [(image, int(digit)) for image, digit in zip(*mnist)][:count]
    picked_clips = sorted(clips, key=lambda c: (c.path.name.split("_")[-1], c.label))[:count]
    image_labels = [label_index[str(d)] for _, d in images]
    clip_labels = [label_index[str(c.label)] for c in picked_clips]
    clip_paths = [str(c.path) for c in picked_clips]
    texts = {digit: text for text, digit in (load_phrases(folder) or [])}
    items = [{"image": image, "audio": path, "text": texts.get(c.label, str(c.label))}
             for (image, _), path, c in zip(images[:20], clip_paths[:20], picked_clips[:20])]
    return {
        "image_deletion": image_deletion(pipeline, [i for i, _ in images], image_labels),
        "audio_deletion": audio_deletion(pipeline, clip_paths, clip_labels),
        "attribution": attribution_test(pipeline, [i for i, _ in images], clip_paths),
        "cost": explain_cost(pipeline, items),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", default=None, help="folder with mnist/, fsdd/ and/or text.tsv")
    parser.add_argument("--voices", default=None,
                        help="folder of voice test sets (NAME/fsdd/*.wav, from fusion.data.heldout --voices): audio "
                        "accuracy on each")
    parser.add_argument("--precision", default="fp32", choices=[p for p in PRECISIONS if p != "auto"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-garbage", action="store_true", help="skip the garbage-modality checks")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--faithfulness", action="store_true",
                        help="run the explanation checks (deletion, attribution, cost) instead of accuracy")
    parser.add_argument("--count", type=int, default=100, help="items per modality for --faithfulness")
    parser.add_argument("--retrieval", action="store_true",
                        help="R@1 and R@5 of the shared embedding space for every ordered pair of modalities instead of accuracy")
    args = parser.parse_args(argv)
    if not args.data and not args.voices:
        parser.error("give --data, --voices or both")
    for name in ("data", "voices"):
        if getattr(args, name) and not Path(getattr(args, name)).is_dir():
            parser.error(f"--{name} {getattr(args, name)!r} is not a folder")
    if (args.faithfulness or args.retrieval) and not args.data:
        parser.error("--faithfulness and --retrieval need --data")
    torch.manual_seed(0)
    pipeline = FusionPipeline.from_pretrained(args.model, precision=args.precision, device=args.device)
    if args.faithfulness or args.retrieval:
        results = faithfulness(pipeline, args.data, count=args.count) if args.faithfulness else retrieval(pipeline, args.data)
        print(json.dumps(results) if args.json else json.dumps(results, indent=1))
        return 0
    results = evaluate(pipeline, args.data, garbage=not args.no_garbage) if args.data else {"n": {}}
    if args.voices:
        voices = evaluate_voices(pipeline, args.voices)
        results["n"].update(voices.pop("n"))
        results.update(voices)
    if len(results) == 1:
        print(f"no evaluation data found under {args.data or args.voices}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{pipeline.description} on {args.data}")
        for key, count in results["n"].items():
            print(f"  {key:34s} {100 * results[key]:6.2f}%   (n={count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ checks of explanations (faithfulness)


def _true_probability(pipeline, items: list[dict], labels: list[int]) -> np.ndarray:
    predictions = pipeline(items)
    return np.array([p.probs[pipeline.labels[label]] for p, label in zip(predictions, labels)])


def image_deletion(pipeline, images: list[np.ndarray], labels: list[int], *, fraction: float = 0.2,
                   steps: int = 10, seed: int = 0) -> dict:
    """Replace the most relevant `fraction` of each image's pixels with its background, and a random
    `fraction` for comparison; report the mean drop of the true class's probability for both, their ratio,
    and deletion and insertion curves (true-class probability as the top pixels are removed or restored)."""
    rng = np.random.default_rng(seed)
    base = _true_probability(pipeline, [{"image": image} for image in images], labels)
    relevant, random_, curves_del, curves_ins = [], [], [], []
    grid = np.linspace(0, 1, steps + 1)
    for image, label, p0 in zip(images, labels, base):
        heat = pipeline(image=image, explain=True, target=pipeline.labels[label]).image_heatmap
        grey = np.asarray(image, dtype=np.float32)
        background = float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))
        order = np.lexsort((rng.random(heat.size), -heat.ravel()))
        count = int(round(fraction * heat.size))

        def erased(indices):
            out = grey.copy().ravel()
            out[indices] = background
            return out.reshape(grey.shape).astype(np.asarray(image).dtype)

        def restored(indices):
            out = np.full(grey.size, background, dtype=np.float32)
            out[indices] = grey.ravel()[indices]
            return out.reshape(grey.shape).astype(np.asarray(image).dtype)

        variants = [erased(order[:count]), erased(rng.permutation(heat.size)[:count])]
        variants += [erased(order[: int(round(f * heat.size))]) for f in grid]
        variants += [restored(order[: int(round(f * heat.size))]) for f in grid]
        probs = _true_probability(pipeline, [{"image": v} for v in variants], [label] * len(variants))
        relevant.append(p0 - probs[0])
        random_.append(p0 - probs[1])
        curves_del.append(probs[2 : 2 + len(grid)])
        curves_ins.append(probs[2 + len(grid) :])
    return _deletion_summary(relevant, random_, curves_del, curves_ins, grid)


def audio_deletion(pipeline, clips: list[Any], labels: list[int], *, fraction: float = 0.2, steps: int = 10, seed: int = 0) -> dict:
    """Mask the most relevant `fraction` of each spectrogram's frames (to the spectrogram's floor) and a
    random `fraction` for comparison; the same summary as `image_deletion`."""
    rng = np.random.default_rng(seed)
    processor = pipeline.processor
    relevant, random_, curves_del, curves_ins = [], [], [], []
    grid = np.linspace(0, 1, steps + 1)
    for clip, label in zip(clips, labels):
        features, _ = processor.audio_features(clip)
        pred = pipeline(audio=clip, explain=True, target=pipeline.labels[label])
        frame_relevance = pred.audio_heatmap.sum(axis=0)
        frames = frame_relevance.size
        order = np.lexsort((rng.random(frames), -frame_relevance))
        count = int(round(fraction * frames))
        floor = float(features.min())

        def masked(indices):
            out = features.clone()
            out[:, indices] = floor
            return out

        def kept(indices):
            out = torch.full_like(features, floor)
            out[:, indices] = features[:, indices]
            return out

        variants = [features, masked(order[:count]), masked(rng.permutation(frames)[:count])]
        variants += [masked(order[: int(round(f * frames))]) for f in grid]
        variants += [kept(order[: int(round(f * frames))]) for f in grid]
        batch = {"audio_values": torch.stack(variants), "audio_mask": torch.ones(len(variants), dtype=torch.bool)}
        probs = pipeline.logits(batch).float().softmax(dim=-1)[:, label].cpu().numpy()
        relevant.append(probs[0] - probs[1])
        random_.append(probs[0] - probs[2])
        curves_del.append(probs[3 : 3 + len(grid)])
        curves_ins.append(probs[3 + len(grid) :])
    return _deletion_summary(relevant, random_, curves_del, curves_ins, grid)


def _deletion_summary(relevant, random_, curves_del, curves_ins, grid) -> dict:
    drop_relevant, drop_random = float(np.mean(relevant)), float(np.mean(random_))
    deletion, insertion = np.mean(curves_del, axis=0), np.mean(curves_ins, axis=0)
    return {
        "n": len(relevant),
        "drop_relevant": round(drop_relevant, 4),
        "drop_random": round(drop_random, 4),
        # Undefined (null in JSON, where infinity is not allowed) when random deletion does not lower it at all.
        "ratio": round(drop_relevant / drop_random, 2) if drop_random > 1e-6 else None,
        "fractions": [round(float(f), 2) for f in grid],
        "deletion_curve": [round(float(v), 4) for v in deletion],
        "insertion_curve": [round(float(v), 4) for v in insertion],
        "deletion_auc": round(float(np.trapezoid(deletion, grid)), 4),
        "insertion_auc": round(float(np.trapezoid(insertion, grid)), 4),
    }


def attribution_test(pipeline, images: list[np.ndarray], clips: list[Any], *, seed: int = 0) -> dict:
    """With a noise image beside clean audio, how often the audio's share beats the image's; and with
    white-noise audio beside a clean image, how often the image's share beats the audio's."""
    rng = np.random.default_rng(seed)
    rate = pipeline.processor.settings.audio.sampling_rate
    audio_wins = image_wins = 0
    for image, clip in zip(images, clips):
        noise_image = rng.integers(0, 256, np.asarray(image).shape, dtype=np.uint8)
        shares = pipeline(image=noise_image, audio=clip, explain=True).modality_shares
        audio_wins += shares["audio"] > shares["image"]
        noise_clip = (rate, rng.normal(0, 0.1, rate).astype(np.float32))
        shares = pipeline(image=image, audio=noise_clip, explain=True).modality_shares
        image_wins += shares["image"] > shares["audio"]
    n = min(len(images), len(clips))
    return {"n": n, "audio_over_noise_image": audio_wins / n, "image_over_noise_audio": image_wins / n}


def explain_cost(pipeline, items: list[dict], *, repeats: int = 3) -> dict:
    """Median seconds of a plain and of an explained prediction over `items`, measured in one run."""
    plain, explained = [], []
    pipeline(**items[0])  # warm up
    pipeline(**items[0], explain=True)
    for _ in range(repeats):
        for item in items:
            start = time.perf_counter()
            pipeline(**item)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipeline(**item, explain=True)
            explained.append(time.perf_counter() - start)
    p, e = float(np.median(plain)), float(np.median(explained))
    return {"plain_ms": round(1000 * p, 2), "explained_ms": round(1000 * e, 2), "ratio": round(e / p, 2)}
