"""The benchmark runs end to end on small settings (the full run is `python -m fusion.bench`)."""

from fusion import bench


def test_quick_benchmark_measures_every_stage_precision_and_the_app(capsys):
    report = bench.main(["--quick", "--json"])
    assert set(report["precisions"]) == {"fp32", "int8"}  # on a CPU
    for entry in report["precisions"].values():
        assert set(entry["latency"]) == {"decode", "preprocess", "forward", "explain", "render", "plain_total", "explained_total"}
        assert all(v["p50_ms"] > 0 and v["p95_ms"] >= v["p50_ms"] for v in entry["latency"].values())
        assert set(entry["throughput"]) == {"batch_1_items_per_s", "batch_8_items_per_s", "batch_32_items_per_s"}
        assert entry["footprint_mb"] > 0 and entry["load_s"] > 0
    assert report["int8_over_fp32_footprint"] < 1
    assert report["memory"]["requests"] == 50
    assert report["app"]["4_clients"]["errors"] == 0
    assert report["app"]["cold_start_s"] > 0
    assert '"precisions"' in capsys.readouterr().out
