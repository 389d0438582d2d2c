"""The benchmark runs end to end on small settings (the full run is `python -m fusion.bench`)."""

import pytest

from fusion import bench

pytestmark = pytest.mark.slow


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
    # the process's CPU per request holds the app function's own, and was read once the start-up work was done
    assert served["one_client"]["server_cpu_ms_per_request"] >= 0.9 * stages["cpu_ms"]["total"]
    assert 0 <= served["waited_for_idle_s"] < 60 and 0 <= floor["waited_for_idle_s"] < 60
    assert floor["one_client"]["p50_ms"] < served["one_client"]["p50_ms"]  # the floor skips the model and drawing
    assert served["stopped"] == {"exit_code": 0, "left_in_temp": 0, "left_in_temp_mb": 0.0}  # stopped by SIGTERM
    assert floor["stopped"] == served["stopped"]
    assert '"precisions"' in capsys.readouterr().out
