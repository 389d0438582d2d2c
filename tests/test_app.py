"""The Gradio app: callbacks called with what each component passes, and the running app via gradio_client."""

import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import numpy as np
import pytest
import soundfile
import torch
from gradio.utils import get_type_hints
from PIL import Image

import app
from fusion import FusionInputError, FusionPipeline, bench
from fusion.render import SCALE_WIDTH, SPECTROGRAM_HEIGHT, notice

from .conftest import launch_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return FusionPipeline.from_pretrained(tiny_checkpoint, precision="fp32")


@pytest.fixture()
def sketch():
    """What gr.Sketchpad(type="numpy", image_mode="RGBA") passes: a white background and a drawn layer."""
    layer = np.zeros((280, 280, 4), dtype=np.uint8)
    layer[60:220, 130:150, 3] = 255  # a black vertical stroke
    return {"background": np.full((280, 280, 4), 255, dtype=np.uint8), "layers": [layer], "composite": None}


def test_predict_with_a_sketch_text_and_a_numpy_recording(pipe, sketch, tone):
    out = app.predict(pipe, sketch, "the number is one", tone, "relevance", 0.5, "average", "average")
    labels, image, spectrogram, words, shares, subsets, notice, attention, download, state = out
    assert set(labels) == {str(d) for d in range(10)} and abs(sum(labels.values()) - 1) < 1e-5
    image, spectrogram, attention = (np.asarray(Image.open(p)) for p in (image, spectrogram, attention))
    assert image.shape == (280, 280 + SCALE_WIDTH, 3) and image.dtype == np.uint8  # the image and its colour scale
    assert spectrogram.shape[0] >= SPECTROGRAM_HEIGHT and spectrogram.shape[1] >= SPECTROGRAM_HEIGHT + SCALE_WIDTH
    assert state["focus"] is None  # no token chosen yet
    assert "".join(piece for piece, _ in words) == "the number is one"
    assert [row[0] for row in shares] == ["image", "text", "audio"]
    assert len(subsets) == 7
    assert "from image + text + audio" in notice
    assert attention.ndim == 3
    assert download is None  # built on request by `export`, not for every answer
    assert state["prediction"].label == max(labels, key=labels.get)
    with zipfile.ZipFile(app.export(state, 0.3, "layer 1", "average")) as archive:
        assert {"explanation.json", "image_heatmap.png", "image_overlay.png", "audio_overlay.png"} <= set(archive.namelist())
        shown = np.asarray(Image.open(archive.open("image_overlay.png")))
    assert np.array_equal(shown, np.asarray(Image.open(app.render(state, 0.3, "layer 1", "average")[0])))


class Click:
    """What Gradio passes a `.select` handler (`gr.SelectData`), reduced to the index it carries."""

    def __init__(self, index):
        self.index = index


def test_clicks_redraw_every_view_around_the_chosen_token(pipe, sketch, tone):
    """A click on the image, the spectrogram or a word redraws from the kept explanation: the chosen token is named,
    the other modalities show its attention, the token × token picture appears; `unfocus` goes back."""
    state = app.predict(pipe, sketch, "the number is one", tone)[9]
    calls = pipe.model.forward

    def no_forward(*args, **kwargs):
        raise AssertionError("a redraw ran the model")

    pipe.model.forward = no_forward
    try:
        image, audio, _, words, tokens, caption, state = app.clicked_image(state, 0.5, "average", "average", "from", Click([140, 100]))
        assert "the image at (140, 100)" in caption and tokens and image and audio
        assert [p for p, _ in words] == ["the", " ", "number", " ", "is", " ", "one"]
        *_, caption, state = app.clicked_word(state, 0.5, "layer 1", "head 2", "to", Click(6))
        assert "the word “one” is attended to by" in caption and "layer 1, head 2" in caption
        *_, caption, state = app.clicked_spectrogram(state, 0.5, "average", "average", "from", Click([5, 10]))
        assert "the audio at" in caption
        with zipfile.ZipFile(app.export(state, 0.5, "average", "average")) as archive:
            assert {"focus_token_matrix.png", "fusion_attention.npz"} <= set(archive.namelist())
        with pytest.raises(gr.Error, match="not on its colour scale"):
            app.clicked_image(state, 0.5, "average", "average", "from", Click([290, 10]))
        with pytest.raises(gr.Error, match="Click on a word"):
            app.clicked_word(state, 0.5, "average", "average", "from", Click(1))
        *_, tokens, caption, state = app.unfocus(state, 0.5, "average", "average", "from")
        assert tokens is None and caption == app.FOCUS_HINT and state["focus"] is None
    finally:
        pipe.model.forward = calls
    with pytest.raises(gr.Error, match="Press Predict first"):
        app.focus(None, 0.5, "average", "average", "from", "image", (1, 1))


def test_the_maps_are_checked_after_the_answer_and_compared_on_request(pipe, sketch, tone):
    state = app.predict(pipe, sketch, "the number is one", tone)[9]
    rows = app.check_maps(pipe, state)
    assert [row[0] for row in rows] == ["image", "text", "audio"]
    assert all(row[3] in ("yes", "no", "cannot tell") for row in rows)
    table = app.compare_precision(pipe, state)
    assert table.startswith("**fp32 vs fp32**") and "| audio | 1.000 | 100% |" in table
    with pytest.raises(gr.Error, match="Press Predict first"):
        app.compare_precision(pipe, None)


def test_export_before_any_answer_says_so():
    with pytest.raises(gr.Error, match="press Predict first"):
        app.export(None, 0.5, "average", "average")


def test_stale_answer_folders_cost_a_request_nothing_to_find(tmp_path, monkeypatch):
    """5,000 answers an hour old: making the next folder removes at most `PRUNE_PER_FOLDER` of them and never lists
    the folder, so a request's cost does not grow with traffic; the backlog still drains as answers come."""
    now = [0.0]
    folders = app.AnswerFolders(tmp_path / "outputs", keep_s=3600, clock=lambda: now[0])
    stale = [folders.new() for _ in range(5000)]
    now[0] = 3601.0
    removed = []
    real_rmtree = app.shutil.rmtree
    monkeypatch.setattr(app.shutil, "rmtree", lambda path, **kw: (removed.append(path), real_rmtree(path, **kw)))
    root = str(tmp_path / "outputs")
    for name in ("listdir", "scandir"):
        real = getattr(os, name)

        def refuse_root(path=".", _real=real):
            if not isinstance(path, int) and os.path.abspath(path) == root:
                pytest.fail("the answers' folder was listed")
            return _real(path)
        monkeypatch.setattr(os, name, refuse_root)
    fresh = folders.new()
    assert [Path(p) for p in removed] == stale[: app.PRUNE_PER_FOLDER]
    assert fresh.is_dir() and not stale[0].exists() and stale[app.PRUNE_PER_FOLDER].exists()
    made = 1
    while stale[-1].exists():
        assert made < 5000, "the backlog does not drain"
        folders.new()
        made += 1
    assert made == 5000 // app.PRUNE_PER_FOLDER  # each new folder removed its full share of the backlog
    assert all(not path.exists() for path in stale) and fresh.is_dir() and len(folders) == made
    now[0] = 3602.0
    folders.remove_all()
    assert not (tmp_path / "outputs").exists()


def test_model_events_run_in_the_same_few_threads_and_keep_their_signature_and_errors():
    threads = app.ModelThreads(concurrency=1)
    try:
        seen = {threads.pin(threading.get_ident)() for _ in range(50)}
        assert 1 <= len(seen) <= 2 and threading.get_ident() not in seen

        def chosen(state, evt: gr.SelectData):
            raise gr.Error(f"nothing at {evt.index}")

        pinned = threads.pin(chosen)
        assert list(inspect.signature(pinned).parameters) == ["state", "evt"]
        assert get_type_hints(pinned)["evt"] is gr.SelectData  # how Gradio decides to pass the click
        with pytest.raises(gr.Error, match="nothing at 3"):
            pinned(None, SimpleNamespace(index=3))
    finally:
        threads.close()


def test_the_demo_runs_its_model_events_in_the_model_threads(pipe, monkeypatch):
    threads = app.ModelThreads(concurrency=1)
    ran_in = []
    monkeypatch.setattr(app, "predict", lambda *a: ran_in.append(threading.current_thread().name))
    monkeypatch.setattr(app, "find_matching", lambda *a: ran_in.append(threading.current_thread().name))
    try:
        demo = app.build_demo(pipe, threads)
        for name in ("predict", "find"):
            next(f for f in demo.fns.values() if f.api_name == name).fn(None, None, None, None, None)
        assert len(ran_in) == 2 and all(name.startswith("model") for name in ran_in)
        # Pinned or not, every click handler still tells Gradio that it wants the click's data.
        clicked = {f.name for f in demo.fns.values() if gr.SelectData in get_type_hints(f.fn).values()}
        assert {"open_chosen", "explain_chosen_row", "clicked_image", "clicked_word"} <= clicked
    finally:
        threads.close()


def test_answer_folders_of_stopped_processes_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, alive, gone = (tmp_path / f"{app.OUTPUTS_PREFIX}{pid}" for pid in (os.getpid(), os.getppid(), dead.pid))
    other = tmp_path / "fusion-outputs-notes"
    for folder in (mine, alive, gone, other):
        (folder / "answer").mkdir(parents=True)
    assert app.remove_orphaned_outputs(tmp_path) == 1
    assert not gone.exists() and mine.exists() and alive.exists() and other.exists()


def test_rerender_changes_with_opacity_and_layer(pipe, sketch):
    state = app.predict(pipe, sketch, None, None)[9]
    faint, _, average = (np.asarray(Image.open(p)) if p else None for p in app.render(state, 0.1, "average", "average")[:3])
    strong, _, first = (np.asarray(Image.open(p)) if p else None for p in app.render(state, 0.9, "layer 1", "head 2")[:3])
    assert faint.shape == strong.shape and not np.array_equal(faint, strong)
    assert average.shape == first.shape
    assert app.render(None, 0.5, "average", "average") == (None, None, None, None, None, app.FOCUS_HINT)


def test_untouched_sketchpad_and_empty_text_are_an_empty_submission(pipe):
    empty_sketch = {"background": None, "layers": [], "composite": None}
    with pytest.raises(gr.Error, match="Nothing to answer"):
        app.predict(pipe, empty_sketch, "   ", None)


def test_corrupt_upload_shows_the_processor_message(pipe, tmp_path):
    bad = tmp_path / "clip.wav"
    bad.write_bytes(b"RIFF\x00\x00not really audio")
    with pytest.raises(gr.Error, match=r"could not decode the audio \(.*clip.wav.*\); accepted: WAV"):
        app.predict(pipe, None, None, str(bad))
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(8000 * 61, dtype=np.int16), 8000)
    with pytest.raises(gr.Error, match="at most 60 s"):
        app.predict(pipe, None, None, str(long))


def test_disagreement_is_announced(pipe, sketch, monkeypatch):
    state = app.predict(pipe, sketch, "seven", None)[9]
    explanation = state["prediction"].explanation
    monkeypatch.setitem(explanation.agreement, "agree", False)
    monkeypatch.setitem(explanation.agreement, "labels", {"image": "1", "text": "7"})
    monkeypatch.setitem(explanation.agreement, "disagreeing", ["image"])
    assert "The modalities disagree: image says 1, text says 7" in notice(state["prediction"])


def test_share_needs_auth_or_an_explicit_no_auth():
    with pytest.raises(SystemExit):
        app.parse_args(["--share"])
    assert app.parse_args(["--share", "--auth", "ann:secret"]).auth == "ann:secret"
    assert app.parse_args(["--share", "--no-auth"]).no_auth
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-colon"])


def test_port_from_the_environment(monkeypatch):
    monkeypatch.setenv("PORT", "9123")
    assert app.parse_args([]).port == 9123


@pytest.fixture()
def client_temp(tmp_path):
    """A folder for gradio_client's downloads, which is also the temporary folder meanwhile (see `bench.client_temp`)."""
    folder = tmp_path / "client"
    folder.mkdir()
    with bench.client_temp(folder):
        yield folder


@pytest.fixture(scope="module")
def server(shipped_app):
    return shipped_app


@pytest.mark.slow
def test_running_app_answers_through_gradio_client(server, tmp_path, tone, client_temp):
    from gradio_client import Client, handle_file

    image = np.full((120, 90), 255, dtype=np.uint8)
    image[20:100, 40:52] = 0
    Image.fromarray(image).save(tmp_path / "one.png")
    soundfile.write(tmp_path / "tone.flac", tone[1], tone[0])
    client = Client(server, verbose=False, download_files=str(client_temp))
    assert "/predict" in client.view_api(return_format="dict")["named_endpoints"]
    result = client.predict({"background": handle_file(str(tmp_path / "one.png")), "layers": [], "composite": None},
                            "eins", handle_file(str(tmp_path / "tone.flac")), "relevance", 0.5, "average", "average",
                            api_name="/predict")
    labels, image_path, spectrogram_path, words = result[:4]
    assert labels["label"] in {str(d) for d in range(10)}
    assert Image.open(image_path).size == (90 + SCALE_WIDTH, 120)  # the image as given and its colour scale
    assert Image.open(spectrogram_path).size[0] >= SPECTROGRAM_HEIGHT + SCALE_WIDTH
    assert [w["token"] for w in words] == ["eins"]
    with pytest.raises(Exception, match="Nothing to answer"):
        client.predict(None, "", None, "relevance", 0.5, "average", "average", api_name="/predict")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(Exception, match="could not decode the image"):
        client.predict({"background": handle_file(str(tmp_path / "broken.png")), "layers": [], "composite": None},
                       "", None, "relevance", 0.5, "average", "average", api_name="/predict")
    # and it keeps serving
    assert client.predict(None, "zwei", None, "rollout", 0.5, "average", "average", api_name="/predict")[0]["label"]
    # the download is built when asked for, from this session's last answer
    with zipfile.ZipFile(client.predict(0.5, "average", "average", api_name="/export")) as archive:
        assert json.loads(archive.read("explanation.json"))["method"] == "rollout"


@pytest.mark.slow
def test_a_server_path_in_a_request_is_refused(server):
    """An API caller names a file on the server instead of uploading one: Gradio must not read it."""
    import json
    import urllib.request

    secret = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "passwd.wav"}
    body = json.dumps({"data": [None, "", secret, "relevance", 0.5, "average", "average"]}).encode()
    request = urllib.request.Request(f"{server}gradio_api/call/predict", data=body, headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    stream = urllib.request.urlopen(f"{server}gradio_api/call/predict/{event}", timeout=30).read().decode()
    assert "event: error" in stream and "not uploaded by a user" in stream and "root:" not in stream, stream


@pytest.mark.slow
def test_identical_concurrent_requests_all_get_whole_pictures(server, client_temp):
    """Gradio rewrites the cached file of an output array in place, so identical answers served at once could
    arrive truncated; the app returns files it wrote itself instead. The race is timing-dependent: this catches it
    often, not always (the benchmark's 16 × 20 identical requests saw it 11 times before the fix)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    def ask(_):
        client = Client(server, verbose=False, download_files=str(client_temp))
        results = []
        for _ in range(3):
            labels, image, spectrogram, words, *_, attention, download = client.predict(
                None, "the number is four", None, "relevance", 0.5, "average", "average", api_name="/predict")
            Image.open(attention).load()  # a truncated PNG fails here
            with zipfile.ZipFile(client.predict(0.5, "average", "average", api_name="/export")) as archive:
                assert archive.testzip() is None
            results.append(labels["label"])
        return results

    with ThreadPoolExecutor(8) as pool:
        answers = [label for labels in pool.map(ask, range(8)) for label in labels]
    assert len(answers) == 24 and len(set(answers)) == 1


@pytest.mark.slow
def test_a_guarded_app_refuses_strangers_turns_a_full_queue_away_and_cleans_up_on_sigterm(tiny_checkpoint, tmp_path,
                                                                                          client_temp):
    """One app started as a careful host would (a password, a queue of one, one worker), checked in turn: a
    stranger and a wrong password are refused, a full queue turns requests away at once, and SIGTERM from a
    process manager stops it with the answer folders and Gradio's cached files gone. (One start instead of three
    keeps the suite inside CI's time.)"""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AuthenticationError

    temp, gradio_temp = tmp_path / "tmp", tmp_path / "gradio"
    temp.mkdir(), gradio_temp.mkdir()
    process, url = launch_app(tiny_checkpoint, "--auth", "ann:secret", "--queue-size", "1", "--concurrency", "1",
                           env={"TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(gradio_temp)})
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False)
        # Gradio answers a wrong password with 400 "Incorrect credentials." (gradio_client reports any non-401 as a
        # bare ValueError, so the login route is asked directly).
        wrong = httpx.post(url.rstrip("/") + "/login", data={"username": "ann", "password": "wrong"})
        assert wrong.status_code == 400 and wrong.json()["detail"] == "Incorrect credentials."
        client = Client(url, auth=("ann", "secret"), verbose=False, download_files=str(tmp_path / "downloads"))

        def ask(_):
            started = time.perf_counter()
            try:
                client.predict(None, "sieben", None, "relevance", 0.5, "average", "average", api_name="/predict")
                return "answered", time.perf_counter() - started
            except Exception as error:  # noqa: BLE001 - the message is what is checked
                return str(error), time.perf_counter() - started

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(ask, range(16)))
        turned_away = [seconds for message, seconds in outcomes if "Queue is full" in message]
        assert [m for m, _ in outcomes if m != "answered" and "Queue is full" not in m] == []
        assert "answered" in [m for m, _ in outcomes] and turned_away
        assert max(turned_away) < 10  # told at once, not after a timeout

        client.predict(None, "fünf", handle_file(str(ROOT / "assets" / "examples" / "spoken-5.wav")), "relevance", 0.5,
                       "average", "average", api_name="/predict")
        client.predict(0.5, "average", "average", api_name="/export")
        assert any(temp.rglob("*.png")) and any(gradio_temp.rglob("*.png")) and any(gradio_temp.rglob("*.wav"))
        process.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        assert process.wait(timeout=30) == 0
        assert time.perf_counter() - started < 10
        assert list(temp.rglob("*")) == [] and list(gradio_temp.rglob("*")) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_stage_timings_go_to_the_named_file_and_a_bad_name_never_fails_a_request(pipe, sketch, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_TIMINGS", str(tmp_path / "timings.jsonl"))
    app.predict(pipe, sketch, "drei", None)
    record = json.loads((tmp_path / "timings.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "predict" and set(record["cpu_ms"]) == {"pipeline", "draw", "save", "total"}
    assert record["wall_ms"]["total"] >= record["wall_ms"]["pipeline"] > 0
    monkeypatch.setenv("FUSION_TIMINGS", str(tmp_path / "missing" / "timings.jsonl"))
    assert app.predict(pipe, sketch, "drei", None)[0]


def test_a_transparent_sketch_is_composited_onto_white_before_the_library_sees_it(pipe, digit_image):
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = digit_image  # black ink where the digit is, transparent elsewhere
    composited = app.sketch_image({"background": None, "layers": [rgba], "composite": rgba})
    assert composited.mode == "RGBA" and composited.size == (28, 28)
    pixels, geometry = pipe.processor.image_features(composited)
    reference, _ = pipe.processor.image_features(digit_image)
    assert geometry.inverted  # black on (composited) white was flipped to light on dark
    assert torch.corrcoef(torch.stack([pixels.flatten(), reference.flatten()]))[0, 1] > 0.95
    with pytest.raises(FusionInputError, match="the sketch is empty"):
        app.sketch_image({"background": None, "layers": [], "composite": None})
    assert app.sketch_image("drawn.png") == "drawn.png"  # a path from the API goes on as it came


def test_find_matching_searches_the_sample_and_opens_a_match(tmp_path):
    """The shipped checkpoint and sample: a drawn 7 finds spoken 7s, a clip finds images, a match opens explained."""
    pipe = FusionPipeline.from_pretrained(ROOT / "assets" / "fusion-digits", precision="fp32", device="cpu")
    examples = ROOT / "assets" / "examples"
    rows, pictures, clip, matches = app.find_matching(pipe, str(examples / "digit-7.png"), "", None, "image", "audio")
    assert len(rows) == app.MATCHES and rows[0][1] == "7" and pictures is None and clip.endswith(".wav")
    assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    rows, pictures, clip, matches = app.find_matching(pipe, None, "", str(examples / "spoken-2.wav"), "audio", "image")
    assert rows[0][1] == "2" and len(pictures) == app.MATCHES and clip is None
    out = app.open_match(pipe, matches, "relevance", 0.5, "average", "average", Click([1, 0]))
    state = out[9]
    assert state["prediction"].modalities == ["image"]
    assert app.similarity_rows(state) == [["image", 1.0, None, None]]
    with pytest.raises(gr.Error, match="Give a text to search with"):
        app.find_matching(pipe, None, " ", None, "text", "image")
    full = app.predict(pipe, str(examples / "digit-7.png"), "sieben", str(examples / "spoken-7.wav"))[9]
    rows = app.similarity_rows(full)
    assert [row[0] for row in rows] == ["image", "text", "audio"] and all(0.5 < v <= 1.0 for row in rows for v in row[1:])


def test_the_dataset_view_opens_the_sample_filters_and_explains_a_row(tmp_path):
    pipe = FusionPipeline.from_pretrained(ROOT / "assets" / "fusion-digits", precision="fp32", device="cpu")
    table, count, picture, state, labels, page = app.open_dataset(pipe, None)
    assert "of 500 items" in count and len(table) == app.DATASET_PAGE and Image.open(picture).size[0] > 400 and page == 1
    table, count, picture, state = app.filter_dataset(state, True, False, "any", "any", 1)
    wrong = [row for row in table]
    assert wrong and all(row[4] is False for row in wrong) and count.startswith(f"{len(state['indices'])} of 500")
    out = app.explain_row(pipe, state, "relevance", 0.5, "average", "average", Click([0, 2]))
    assert out[9]["prediction"].label == wrong[0][2]  # the row's own prediction, now explained
    table, count, *_ = app.filter_dataset(state, False, False, "7", "audio", 99)  # the page is clamped
    assert all(row[1] == "7" and row[5] == "audio" for row in table)
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"prediction": "1", "confidence": 0.9, "modalities": ["text"], "label": "1",
                                       "correct": True, "input": {"text": "one"}}) + "\n")
    table, count, *_ = app.open_dataset(pipe, str(predictions))
    assert "1 of 1 items · 0 wrong" in count and table[0][-1] == "“one”"
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(gr.Error, match="Open a .jsonl of predictions"):
        app.open_dataset(pipe, str(tmp_path / "x.txt"))
