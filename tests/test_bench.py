"""The benchmark runs end to end on small settings (the full run is `python -m fusion.bench`)."""

import pytest

from fusion import bench


@pytest.mark.slow
def test_quick_benchmark_measures_every_stage_precision_and_the_app(capsys):
    report = bench.main(["--quick", "--json"])
    assert set(report["precisions"]) == {"fp32", "int8"}  # on a CPU
    for entry in report["precisions"].values():
        assert set(entry["latency"]) == {"decode", "preprocess", "forward", "explain", "render", "plain_total", "explained_total"}
        assert all(v["p50_ms"] > 0 and v["p95_ms"] >= v["p50_ms"] for v in entry["latency"].values())
        assert set(entry["throughput"]) == {"batch_1_items_per_s", "batch_8_items_per_s", "batch_32_items_per_s"}
        assert entry["footprint_mb"] > 0 and entry["load_s"] > 0
    assert report["int8_over_fp32_footprint"] < 1
    assert report["memory"]["requests"] == 10
    served, floor = report["app"]["app"], report["app"]["floor"]
    assert served["started_together"] and served["cold_start_s"] > 0 and served["4_clients"]["errors"] == 0 and served["4_clients"]["requests_per_s"] > 0
    # server time apart from client time: the app's own stages, and its process's CPU per request
    stages = served["one_client"]["server_stages"]
    assert {"pipeline", "draw", "save", "total"} <= set(stages["cpu_ms"]) and stages["wall_ms"]["pipeline"] > 0
    assert served["one_client"]["server_cpu_ms_per_request"] > floor["one_client"]["server_cpu_ms_per_request"] > 0
    # the process's CPU per request holds the app function's own; both servers were waited on until idle first
    assert served["one_client"]["server_cpu_ms_per_request"] >= 0.9 * stages["cpu_ms"]["total"]
    assert "waited_for_idle_s" in served and "waited_for_idle_s" in floor
    assert floor["one_client"]["p50_ms"] < served["one_client"]["p50_ms"]  # the floor skips the model and drawing
    assert served["stopped"] == {"exit_code": 0, "left_in_temp": 0, "left_in_temp_mb": 0.0}  # stopped by SIGTERM
    assert floor["stopped"] == served["stopped"]
    assert '"precisions"' in capsys.readouterr().out


def test_idle_waits_out_busy_windows_and_gives_up_on_a_server_that_stays_busy():
    """`_Server.idle` returns once a window passes with (almost) no server CPU, and raises if none does."""
    server = object.__new__(bench._Server)  # only its CPU reading is used
    readings = iter([0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0])  # busy, busy, then idle
    server.cpu_s = lambda: next(readings)
    assert bench._Server.idle(server, window=0.01, timeout=5) >= 0.02
    busy = iter(range(10_000))
    server.cpu_s = lambda: float(next(busy))  # a second of CPU per reading
    with pytest.raises(RuntimeError, match="stayed busy"):
        bench._Server.idle(server, window=0.01, timeout=0.05)
