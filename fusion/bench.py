"""Speed and footprint of a fusion checkpoint on this machine, stage by stage and through the running app.

    python -m fusion.bench [--model DIR] [--json] [--quick]

Measures load time; p50/p95 latency of decode, preprocess, forward, explain and render for each precision
available here (fp32 and int8 on a CPU; fp16, bf16 and int8 on a GPU); model footprint and peak memory;
throughput at batch sizes 1, 8 and 32; process memory growth over repeated requests; and, through the app
started in a subprocess, its cold start and the latency of 1 client and of 16 concurrent clients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from .feature_extraction import load_waveform
from .image_processing import open_image
from .pipeline import FusionPipeline
from .render import (
    attention_image,
    base_image,
    image_overlay,
    png_bytes,
    spectrogram_image,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "assets" / "examples"
ITEM: dict[str, Any] = {"image": str(EXAMPLES / "digit-7.png"), "text": "sieben", "audio": str(EXAMPLES / "spoken-7.wav")}


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
    for _ in range(min(10, requests)):  # warm-up
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


def _sketch(path: str) -> dict:
    """What the app's sketchpad sends for an uploaded picture."""
    from gradio_client import handle_file

    return {"background": handle_file(path), "layers": [], "composite": None}


class _Server:
    """`app.py` (or the framework-floor server) in a subprocess with its own temporary folders, so that what it
    leaves behind can be checked after it is stopped by SIGTERM."""

    def __init__(self, command: list[str], workdir: Path):
        self.workdir = workdir
        self.temp = workdir / "tmp"
        self.gradio_temp = workdir / "gradio"
        self.timings = workdir / "timings.jsonl"
        for folder in (self.temp, self.gradio_temp):
            folder.mkdir(parents=True)
        self.port = free_port()
        env = {**os.environ, "TMPDIR": str(self.temp), "GRADIO_TEMP_DIR": str(self.gradio_temp),
               "FUSION_TIMINGS": str(self.timings), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.started = time.perf_counter()
        self.process = subprocess.Popen([*command, "--port", str(self.port)], env=env, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ps = psutil.Process(self.process.pid)
        self.url = f"http://127.0.0.1:{self.port}/"

    def client(self):
        """A `gradio_client.Client` that makes one SSL context for all its calls (the stock client makes one per
        HTTP call, which costs more CPU than the app's own work) and downloads into the work folder."""
        from gradio_client import Client

        downloads = Path(tempfile.mkdtemp(dir=self.workdir, prefix="downloads-"))
        return Client(self.url, verbose=False, ssl_verify=_SSL, download_files=str(downloads),
                      analytics_enabled=False)

    def wait(self, timeout: float = 180.0):
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited during start-up (code {self.process.returncode})")
            if time.perf_counter() - self.started > timeout:
                raise RuntimeError(f"the server did not answer within {timeout:.0f} s")
            try:
                return self.client()
            except Exception:
                time.sleep(0.25)

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far, all its threads."""
        times = self.ps.cpu_times()
        return times.user + times.system

    def idle(self, *, share: float = 0.05, window: float = 0.25, timeout: float = 60.0) -> float:
        """Wait until the server uses under `share` of one core over a `window` (its background start-up work, such
        as the app's pass over the sample, is done); the seconds waited. Raises after `timeout` seconds."""
        started = time.perf_counter()
        while True:
            before = self.cpu_s()
            time.sleep(window)
            if self.cpu_s() - before < share * window:
                return round(time.perf_counter() - started, 2)
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"the server stayed busy for {timeout:.0f} s without a request")

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stage_records(self) -> list[dict]:
        if not self.timings.is_file():
            return []
        return [json.loads(line) for line in self.timings.read_text().splitlines() if line.strip()]

    def stop(self) -> dict:
        """SIGTERM, as a process manager stops it; the exit code and what it left in its temporary folders."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        left = [p for folder in (self.temp, self.gradio_temp) for p in folder.rglob("*")]
        return {"exit_code": code, "left_in_temp": len(left),
                "left_in_temp_mb": round(sum(p.stat().st_size for p in left if p.is_file()) / 2**20, 2)}


_SSL = ssl.create_default_context()


def _call(client) -> float:
    from gradio_client import handle_file

    start = time.perf_counter()
    client.predict(_sketch(ITEM["image"]), ITEM["text"], handle_file(ITEM["audio"]), "relevance", 0.5, "average",
                   "average", api_name="/predict")
    return time.perf_counter() - start


def _load(server: _Server, clients: int | list, requests: int) -> dict:
    """`clients` new clients (or these clients) at once, each sending `requests` explained predictions of the same
    example (as visitors clicking one example row do): requests/s, latency, errors, and the server's CPU per
    request."""
    own = [server.client() for _ in range(clients)] if isinstance(clients, int) else clients

    def run(client):
        times, errors = [], []
        for _ in range(requests):
            try:
                times.append(_call(client))
            except Exception as error:
                errors.append(f"{type(error).__name__}: {error}"[:300])
        return times, errors

    cpu, start = server.cpu_s(), time.perf_counter()
    with ThreadPoolExecutor(len(own)) as pool:
        results = list(pool.map(run, own))
    wall, cpu = time.perf_counter() - start, server.cpu_s() - cpu
    times = [t for t, _ in results for t in t]
    done = len(times)
    return {**(percentiles(times) if times else {}), "requests": len(own) * requests,
            "errors": sum(len(e) for _, e in results), "error_messages": sorted({m for _, e in results for m in e})[:5],
            "requests_per_s": round(done / wall, 2), "server_cpu_ms_per_request": round(cpu / max(done, 1) * 1000, 1)}


def _stages(records: list[dict]) -> dict:
    """p50 of the app's own per-request stage timings (wall and CPU ms), from `FUSION_TIMINGS` lines."""
    if not records:
        return {}
    out = {}
    for kind in ("wall_ms", "cpu_ms"):
        names = records[0].get(kind, {})
        out[kind] = {name: round(float(np.median([r[kind][name] for r in records if name in r.get(kind, {})])), 2)
                     for name in names}
    return out


def through_the_app(model: str, *, requests: int, clients: tuple[int, ...] = (1, 4, 16), app: Path | None = None,
                    floor: bool = True, soak: int = 0, together: bool = False) -> dict:
    """The running app as visitors reach it: cold start; one client's latency with the server's CPU per request
    and the app's own stage timings (server time apart from client time); the framework floor (a server with the
    same components whose function returns a ready answer) in the same run; requests/s at each client count;
    memory growth; and what is left in the temporary folders after SIGTERM.

    `together` starts both servers at once and measures them one after the other (for CI: it saves one cold
    start; each cold-start time then includes the other server's start, and the report says so)."""
    app = app or ROOT / "app.py"
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as work, client_temp(Path(work)):
        servers = {"app": [sys.executable, str(app), "--model", model]}
        if floor:
            servers["floor"] = [sys.executable, "-m", "fusion.bench", "--serve-floor", "--app-file", str(app), "--model", model]
        started = {name: _Server(command, Path(work) / name) for name, command in servers.items()} if together else {}
        report: dict = {}
        try:
            for name, command in servers.items():
                server = started.get(name) or _Server(command, Path(work) / name)
                report[name] = {"started_together": together}
                try:
                    report[name].update(_measure(server, requests=requests, clients=clients if name == "app" else (),
                                                 soak=soak))
                finally:
                    report[name]["stopped"] = server.stop()
        finally:  # with `together`, a server whose turn never came (one before it failed)
            for server in started.values():
                if server.process.poll() is None:
                    server.stop()
        return report


def _measure(server: _Server, *, requests: int, clients: tuple[int, ...], soak: int) -> dict:
    """One server's cold start and one client's latency and server CPU; with `clients`, the load phases and the
    steady-state memory too."""
    client = server.wait()
    _call(client)
    entry: dict = {"cold_start_s": round(time.perf_counter() - server.started, 2)}
    for _ in range(3):
        _call(client)  # warm
    entry["waited_for_idle_s"] = server.idle()  # the app's own start-up work (the sample's pass) is not a request's
    skip = len(server.stage_records())
    cpu = server.cpu_s()
    single = [_call(client) for _ in range(requests)]
    entry["one_client"] = {**percentiles(single),
                           "server_cpu_ms_per_request": round((server.cpu_s() - cpu) / requests * 1000, 1),
                           "server_stages": _stages(server.stage_records()[skip:])}
    if not clients:
        return entry
    start_rss = server.rss_mb()
    for count in clients:
        entry[f"{count}_clients"] = _load(server, count, requests)
    # Growth in the steady state: the same clients (sessions, each holding its last answer) again, after the load
    # phases have made the server's threads.
    most = [server.client() for _ in range(max(clients))]
    _load(server, most, 1)
    rss = server.rss_mb()
    soaked = _load(server, most, -(-soak // len(most))) if soak else {"requests": 0, "errors": 0}
    entry["memory"] = {"rss_at_start_mb": round(start_rss, 1), "growth_over_load_phases_mb": round(rss - start_rss, 1),
                       "rss_before_mb": round(rss, 1), "rss_after_mb": round(server.rss_mb(), 1),
                       "requests_between": soaked["requests"], "errors_between": soaked["errors"]}
    entry["memory"]["growth_mb"] = round(entry["memory"]["rss_after_mb"] - rss, 1)
    return entry


@contextlib.contextmanager
def client_temp(folder: Path):
    """gradio_client 2 downloads each file through a new folder in the system's temporary folder and leaves that
    folder behind, empty: one per file, about 100 for a quick bench. Point the temporary folder at `folder` meanwhile
    (the app tests do the same)."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def serve_floor(model: str, port: int, app_file: Path) -> None:
    """The framework floor: the app's own interface and queue, whose predict function returns one answer computed
    at start-up, so a request costs only what Gradio and the transfers cost."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fusion_app", app_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"{app_file} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "tune_for_serving"):
        module.tune_for_serving(module.CONCURRENCY)
    files = module.GradioFiles() if hasattr(module, "GradioFiles") else None
    pipeline = FusionPipeline.from_pretrained(model)
    demo = module.build_demo(pipeline)
    function = next(f for f in demo.fns.values() if f.api_name == "predict")
    sketch = {"background": np.asarray(open_image(ITEM["image"]).convert("RGBA")), "layers": [], "composite": None}
    answer = function.fn(sketch, ITEM["text"], ITEM["audio"], "relevance", 0.5, "average", "average")
    function.fn = lambda *inputs: answer
    demo.queue(max_size=module.QUEUE_SIZE, default_concurrency_limit=module.CONCURRENCY)
    if files is not None:  # stopped by SIGTERM, it cleans up as the app does, so the two leave the same behind
        files.demo = demo
        module._stop_on_signals(files)
    try:
        demo.launch(server_name="127.0.0.1", server_port=port, max_file_size=module.MAX_FILE_SIZE)
    finally:
        demo.close(verbose=False)
        if files is not None:
            files.remove()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "fusion-digits"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="few repeats, few requests (for CI)")
    parser.add_argument("--no-app", action="store_true", help="skip the measurements through the running app")
    parser.add_argument("--app-only", action="store_true", help="only the measurements through the running app")
    parser.add_argument("--app-file", type=Path, default=ROOT / "app.py", help="the app to start (to compare versions)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client (default 20; 3 with --quick)")
    parser.add_argument("--soak", type=int, default=0, help="this many more requests before memory is read again")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.model, args.port, args.app_file)
        return {}
    repeats, requests = (5, 3) if args.quick else (50, 20)
    requests = args.requests or requests
    precisions = ["fp16", "bf16", "int8", "fp32"] if torch.cuda.is_available() else ["fp32", "int8"]
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_average_before": [round(x, 2) for x in os.getloadavg()],
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
        report["memory"] = memory_growth(pipeline, 10 if args.quick else 500)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        footprints = {p: e["footprint_mb"] for p, e in report["precisions"].items()}
        report["int8_over_fp32_footprint"] = round(footprints["int8"] / footprints["fp32"], 3)
    if not args.no_app:
        report["app"] = through_the_app(args.model, requests=requests, clients=(1, 4) if args.quick else (1, 4, 16),
                                        app=args.app_file, soak=args.soak, together=args.quick)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
