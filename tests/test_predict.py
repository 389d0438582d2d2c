"""Batch prediction of a manifest (`fusion.predict`): rows in the manifest's order, bad rows reported by line and
skipped, and the same output from two processes under `accelerate launch` as from one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.data.sources import list_fsdd
from fusion.evaluate import load_phrases
from fusion.predict import main, read_rows

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "assets" / "fusion-digits"
SAMPLE = ROOT / "assets" / "examples" / "sample"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """30 rows of the sample (clips, phrases, both), a row whose file is missing, one whose clip is corrupt, one
    with no input and one that is not JSON."""
    folder = tmp_path_factory.mktemp("manifest")
    clips = list_fsdd(SAMPLE)[:12]
    phrases = (load_phrases(SAMPLE) or [])[:12]
    shutil.copy(ROOT / "assets" / "examples" / "digit-7.png", folder / "seven.png")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    lines = [json.dumps({"audio": str(c.path), "label": str(c.label)}) for c in clips]
    lines += [json.dumps({"text": t, "label": str(d)}) for t, d in phrases]
    lines += [json.dumps({"image": "seven.png", "audio": str(c.path), "text": t}) for c, (t, _) in zip(clips[:6], phrases[:6])]
    lines.insert(5, json.dumps({"image": "missing.png", "label": "3"}))
    lines.insert(9, json.dumps({"audio": "broken.wav", "label": "1"}))
    lines.insert(14, json.dumps({"label": "2"}))
    lines.insert(20, "{not json")
    path = folder / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_named_by_line_and_skipped(manifest, tmp_path, capsys):
    rows, problems = read_rows(manifest)
    assert len(rows) == 31 and [p.split(":")[1] for p in problems] == ["6", "15", "21"]
    out = tmp_path / "out.jsonl"
    assert main(["--model", str(CHECKPOINT), "--manifest", str(manifest), "--out", str(out), "--explain", "--precision", "fp32"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 30 and [r["line"] for r in written] == sorted(r["line"] for r in written)
    assert 10 not in {r["line"] for r in written}  # the corrupt clip
    errors = capsys.readouterr().err
    assert "skipped line 10: could not decode the audio" in errors and "missing.png" in errors
    labelled = [r for r in written if r["label"] is not None]
    assert sum(r["correct"] for r in labelled) / len(labelled) >= 0.9
    last = written[-1]
    assert last["label"] is None and last["correct"] is None and set(last["modalities"]) == {"image", "text", "audio"}
    assert set(last["embeddings"]) == {"image", "text", "audio"} and len(last["embeddings"]["text"]) == 64
    assert abs(sum(last["shares"].values()) - 1) < 1e-4 and set(last["alone"]) == {"image", "text", "audio"}


@pytest.mark.slow
def test_two_processes_write_what_one_does(manifest, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(["--model", str(CHECKPOINT), "--manifest", str(manifest), "--out", str(one), "--precision", "fp32"]) == 0
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "fusion.predict", "--model", str(CHECKPOINT), "--manifest", str(manifest),
               "--out", str(two), "--precision", "fp32", "--batch-size", "8"]
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first = [json.loads(line) for line in one.read_text().splitlines()]
    second = [json.loads(line) for line in two.read_text().splitlines()]
    assert [r["line"] for r in first] == [r["line"] for r in second]
    for a, b in zip(first, second):
        assert a["prediction"] == b["prediction"] and abs(a["confidence"] - b["confidence"]) < 1e-4


def test_parquet_without_pyarrow_says_what_to_install(manifest, tmp_path):
    pytest.importorskip("pandas")
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    with pytest.raises(SystemExit):
        main(["--model", str(CHECKPOINT), "--manifest", str(manifest), "--out", str(tmp_path / "x.parquet")])
