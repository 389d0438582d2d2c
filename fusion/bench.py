"""Speed and footprint of a fusion checkpoint on this machine, stage by stage and through the running app.

    python -m fusion.bench [--model DIR] [--json] [--quick]

Measures load time; p50/p95 latency of decode, preprocess, forward, explain and render for each precision
available here (fp32 and int8 on a CPU; fp16, bf16 and int8 on a GPU); model footprint and peak memory;
throughput at batch sizes 1, 8 and 32; process memory growth over repeated requests; and, through the app
started in a subprocess, its cold start and the latency of 1 client and of 16 concurrent clients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch

from .pipeline import FusionPipeline
from .processing import load_waveform, open_image
from .render import attention_image, base_image, image_overlay, png_bytes, spectrogram_image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
ITEM = {"image": str(EXAMPLES / "digit-7.png"), "text": "sieben", "audio": str(EXAMPLES / "spoken-7.wav")}


def percentiles(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p95_ms": round(float(np.percentile(values, 95)), 2)}


def timed(function, repeats: int) -> list[float]:
    function()  # warm up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def stage_latencies(pipeline: FusionPipeline, repeats: int) -> dict:
    """p50/p95 of each stage of an explained three-modality prediction, and of the whole."""
    processor = pipeline.processor
    batch = processor([ITEM])
    prediction = pipeline(**ITEM, explain=True)

    def render():  # the three pictures the app shows, drawn and encoded as it serves them
        png_bytes(image_overlay(base_image(ITEM["image"]), prediction.explanation))
        png_bytes(spectrogram_image(prediction.explanation))
        png_bytes(attention_image(prediction.explanation.attention_matrix_mean, prediction.modalities))

    stages = {
        "decode": lambda: (open_image(ITEM["image"]).load(), load_waveform(ITEM["audio"], processor.settings.audio)),
        "preprocess": lambda: processor([ITEM]),
        "forward": lambda: pipeline.forward(batch),
        "explain": lambda: pipeline.explain(batch),
        "render": render,
        "plain_total": lambda: pipeline(**ITEM),
        "explained_total": lambda: pipeline(**ITEM, explain=True),
    }
    return {name: percentiles(timed(function, repeats)) for name, function in stages.items()}


def throughput(pipeline: FusionPipeline, repeats: int) -> dict:
    result = {}
    for size in (1, 8, 32):
        items = [ITEM] * size
        seconds = timed(lambda: pipeline(items), max(2, repeats // size))
        result[f"batch_{size}_items_per_s"] = round(size / float(np.median(seconds)), 1)
    return result


def memory_growth(pipeline: FusionPipeline, requests: int) -> dict:
    """Resident memory before and after `requests` explained predictions."""
    process = psutil.Process()
    for _ in range(10):
        pipeline(**ITEM, explain=True)
    before = process.memory_info().rss
    for _ in range(requests):
        pipeline(**ITEM, explain=True)
    after = process.memory_info().rss
    return {"requests": requests, "rss_before_mb": round(before / 2**20, 1), "rss_after_mb": round(after / 2**20, 1),
            "growth_mb": round((after - before) / 2**20, 1)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_the_app(model: str, *, requests: int, clients: int) -> dict:
    """Start `app.py`, time its cold start until it answers, then 1 client and `clients` concurrent clients."""
    from gradio_client import Client, handle_file

    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", model, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        client = None
        while client is None:
            if process.poll() is not None:
                raise RuntimeError("the app exited during start-up")
            if time.perf_counter() - started > 180:
                raise RuntimeError("the app did not answer within 180 s")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                time.sleep(0.25)
        def call(c):
            start = time.perf_counter()
            c.predict({"background": handle_file(ITEM["image"]), "layers": [], "composite": None}, ITEM["text"],
                      handle_file(ITEM["audio"]), "relevance", 0.5, "average", "average", api_name="/predict")
            return time.perf_counter() - start

        call(client)
        cold_start = time.perf_counter() - started
        single = [call(client) for _ in range(requests)]

        def one_client(_):
            # Every client sends the same example, as visitors clicking one example row do: identical answers
            # at once are the case that once made Gradio serve a half-rewritten output file.
            own = Client(f"http://127.0.0.1:{port}/", verbose=False)
            times, errors = [], []
            for _ in range(requests):
                try:
                    times.append(call(own))
                except Exception as error:
                    errors.append(f"{type(error).__name__}: {error}"[:300])
            return times, errors

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one_client, range(clients)))
        concurrent = [t for times, _ in results for t in times]
        return {
            "cold_start_s": round(cold_start, 2),
            "one_client": percentiles(single),
            f"{clients}_clients": {**percentiles(concurrent), "requests": clients * requests,
                                   "errors": sum(len(e) for _, e in results),
                                   "error_messages": sorted({m for _, e in results for m in e})[:5]},
        }
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "fusion-digits"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="few repeats, few requests (for CI)")
    parser.add_argument("--no-app", action="store_true", help="skip the measurements through the running app")
    parser.add_argument("--app-only", action="store_true", help="only the measurements through the running app")
    args = parser.parse_args(argv)
    repeats, requests = (5, 3) if args.quick else (50, 20)
    precisions = ["fp16", "bf16", "int8", "fp32"] if torch.cuda.is_available() else ["fp32", "int8"]
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "precisions": {},
    }
    for precision in [] if args.app_only else precisions:
        start = time.perf_counter()
        pipeline = FusionPipeline.from_pretrained(args.model, precision=precision)
        entry = {"load_s": round(time.perf_counter() - start, 3),
                 "footprint_mb": round(pipeline.model.get_memory_footprint() / 2**20, 2),
                 "device": str(pipeline.device)}
        entry["latency"] = stage_latencies(pipeline, repeats)
        entry["throughput"] = throughput(pipeline, repeats)
        if torch.cuda.is_available():
            entry["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["precisions"][precision] = entry
    if not args.app_only:
        report["memory"] = memory_growth(pipeline, 50 if args.quick else 500)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        footprints = {p: e["footprint_mb"] for p, e in report["precisions"].items()}
        report["int8_over_fp32_footprint"] = round(footprints["int8"] / footprints["fp32"], 3)
    if not args.no_app:
        report["app"] = through_the_app(args.model, requests=requests if args.quick else 20,
                                        clients=4 if args.quick else 16)
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
