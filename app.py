"""The fusion web demo: draw or upload a digit, type a phrase, speak or upload a clip; see the answer and why.

    python app.py [--model DIR] [--precision auto|int8|fp16|bf16|fp32] [--device cpu|cuda] [--port N]
                  [--share --auth USER:PASSWORD | --share --no-auth]

SIGTERM stops it as Ctrl-C does, removing its files. FUSION_TIMINGS=FILE appends each request's stage timings.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from gradio.utils import get_upload_folder
from PIL import Image

from fusion import METHODS, PRECISIONS, FusionInputError, FusionPipeline
from fusion.dataset_view import COLUMNS as DATASET_COLUMNS
from fusion.dataset_view import DatasetView
from fusion.image_processing import open_image
from fusion.modalities import SUBSET_KEYS
from fusion.render import (
    AXIS_HEIGHT,
    SCALE_WIDTH,
    base_image,
    draw_cross,
    draw_pictures,
    export_zip,
    png_bytes,
    present,
    spectrogram_x_to_time,
)
from fusion.retrieval import Gallery

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "fusion-digits"
EXAMPLES = ROOT / "assets" / "examples"
MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 64
CONCURRENCY = 2
OUTPUTS_PREFIX = "fusion-outputs-"
KEEP_OUTPUTS_S = 3600
PRUNE_PER_FOLDER = 2
AVERAGE = "average"
log = logging.getLogger("fusion.app")
FOCUS_HINT = ("Click a place on the image, a moment on the spectrogram or a word to see what that token attends to "
              "across the other modalities.")

I18N = gr.I18n(
    en={
        "fusion_intro": "Give any mix of a handwritten digit, a phrase and a spoken digit. The model answers which digit "
                 "you mean and shows why: relevance over the image, the spectrogram and the words, each "
                 "modality's share, and what each modality alone would say.",
        "fusion_image": "Image: draw or upload", "fusion_text": "Text", "fusion_audio": "Audio: record or upload",
        "fusion_predict": "Predict", "fusion_prediction": "Prediction", "fusion_method": "Explanation method",
        "fusion_opacity": "Heatmap opacity", "fusion_layer": "Fusion layer", "fusion_head": "Attention head",
        "fusion_image_relevance": "Image relevance", "fusion_audio_relevance": "Spectrogram relevance (time in seconds)",
        "fusion_text_relevance": "Word relevance", "fusion_contributions": "Each modality", "fusion_subsets": "Every subset of modalities",
        "fusion_attention": "Attention between modalities", "fusion_download": "Download the explanation (JSON and PNGs)",
        "fusion_examples": "Examples", "fusion_placeholder": "seven, 七, sieben, 3 plus 4, VII …",
        "fusion_export": "Prepare the download",
        "fusion_focus_hint": FOCUS_HINT,
        "fusion_direction": "Clicked token", "fusion_clear": "Back to relevance",
        "fusion_token_matrix": "Token × token attention across modalities", "fusion_check": "Check the maps",
        "fusion_compare": "Compare with full precision (fp32)",
        "fusion_similarity": "How alike the inputs are (cosine in the shared space)",
        "fusion_find": "Find matching items in the sample", "fusion_search_with": "Search with",
        "fusion_search_for": "Find", "fusion_find_button": "Find matches", "fusion_matches": "Nearest items (click one to explain it)",
        "fusion_match_images": "Matching images", "fusion_match_clip": "Best matching clip",
        "fusion_dataset": "Inspect a dataset", "fusion_dataset_open": "Open",
        "fusion_dataset_file": "Predictions from python -m fusion.predict (.jsonl) or a manifest (.csv/.jsonl); none: the shipped sample",
        "fusion_only_errors": "Only errors", "fusion_only_disagreements": "Only disagreements", "fusion_label_filter": "Label",
        "fusion_subset_filter": "Modalities", "fusion_page": "Page", "fusion_dataset_map": "Embeddings (PCA), by label; wrong ringed",
    },
    zh={
        "fusion_intro": "输入手写数字、短语和语音数字中的任意组合。模型回答你指的是哪个数字，并说明原因：图像、频谱图和文字上的相关性，"
                 "每种模态的贡献，以及每种模态单独会给出的答案。",
        "fusion_image": "图像：手绘或上传", "fusion_text": "文本", "fusion_audio": "音频：录音或上传",
        "fusion_predict": "预测", "fusion_prediction": "预测结果", "fusion_method": "解释方法",
        "fusion_opacity": "热图不透明度", "fusion_layer": "融合层", "fusion_head": "注意力头",
        "fusion_image_relevance": "图像相关性", "fusion_audio_relevance": "频谱图相关性（时间：秒）",
        "fusion_text_relevance": "词语相关性", "fusion_contributions": "各模态贡献", "fusion_subsets": "模态的每种子集",
        "fusion_attention": "模态之间的注意力", "fusion_download": "下载解释（JSON 和 PNG）",
        "fusion_examples": "示例", "fusion_placeholder": "seven、七、sieben、3 plus 4、VII …",
        "fusion_export": "准备下载",
        "fusion_focus_hint": "点击图像上的位置、频谱图上的时刻或一个词，查看该词元在其他模态上的注意力。",
        "fusion_direction": "点击的词元", "fusion_clear": "回到相关性",
        "fusion_token_matrix": "跨模态的词元 × 词元注意力", "fusion_check": "检验热图",
        "fusion_compare": "与全精度（fp32）比较",
        "fusion_similarity": "输入之间的相似度（共享空间中的余弦）",
        "fusion_find": "在样本中查找匹配项", "fusion_search_with": "用来搜索", "fusion_search_for": "查找",
        "fusion_find_button": "查找匹配", "fusion_matches": "最近的项（点击以解释）",
        "fusion_match_images": "匹配的图像", "fusion_match_clip": "最匹配的音频",
        "fusion_dataset": "检查数据集", "fusion_dataset_open": "打开",
        "fusion_dataset_file": "python -m fusion.predict 的预测（.jsonl）或清单（.csv/.jsonl）；留空：随附样本",
        "fusion_only_errors": "只看错误", "fusion_only_disagreements": "只看不一致", "fusion_label_filter": "标签",
        "fusion_subset_filter": "模态", "fusion_page": "页", "fusion_dataset_map": "嵌入（PCA），按标签着色；错误加圈",
    },
)


# A playhead over the spectrogram picture, in step with the audio input's player. Gradio has no event for the
# playback position, so the page follows it: on every animation frame, the playing <audio> element's time (inside
# the player's shadow root too) places a line over the picture, whose clip runs from 0 s at the left to the end
# of the clip at the colour scale. SCALE_WIDTH and AXIS_HEIGHT are render's, in the picture's own pixels.
PLAYHEAD_JS = """
() => {
  const SCALE_WIDTH = %d, AXIS_HEIGHT = %d;
  const line = document.createElement("div");
  line.id = "playhead";
  line.style.cssText = "position:absolute;width:2px;background:#ff4040;pointer-events:none;display:none;z-index:10";
  function players() {
    const root = document.querySelector("#audio-input");
    if (!root) return [];
    const found = [...root.querySelectorAll("audio")];
    root.querySelectorAll("*").forEach(e => { if (e.shadowRoot) found.push(...e.shadowRoot.querySelectorAll("audio")); });
    return found;
  }
  function tick() {
    const img = document.querySelector("#audio-heatmap img");
    const audio = players().find(a => !a.paused) || players().find(a => a.currentTime > 0);
    if (img && img.naturalWidth && audio && audio.duration > 0) {
      const host = img.parentElement;
      if (line.parentElement !== host) { host.style.position = "relative"; host.appendChild(line); }
      const box = img.getBoundingClientRect(), hostBox = host.getBoundingClientRect();
      const scale = box.width / img.naturalWidth;
      const x = Math.min(1, audio.currentTime / audio.duration) * (img.naturalWidth - SCALE_WIDTH) * scale;
      line.style.left = (box.left - hostBox.left + x) + "px";
      line.style.top = (box.top - hostBox.top) + "px";
      line.style.height = Math.max(0, box.height - AXIS_HEIGHT * scale) + "px";
      line.style.display = "block";
    } else {
      line.style.display = "none";
    }
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);
}
""" % (SCALE_WIDTH, AXIS_HEIGHT)


def explain_unreadable_images(component: gr.Sketchpad) -> gr.Sketchpad:
    """Give the sketchpad's unreadable uploads the library's specific message instead of a preprocessing trace.

    Wrapping the instance's `preprocess` keeps the stock front end (a subclass would need its own)."""
    stock = component.preprocess

    def preprocess(payload):
        try:
            return stock(payload)
        except gr.Error:
            raise
        except Exception as error:
            path = getattr(getattr(payload, "background", None), "path", None)
            try:
                if path:
                    open_image(path)
            except FusionInputError as specific:
                raise gr.Error(str(specific)) from None
            raise gr.Error(f"could not read the image ({type(error).__name__}); accepted: PNG, JPEG, GIF, BMP, WebP, TIFF") from None

    setattr(component, "preprocess", preprocess)  # on this instance only
    return component


def sketch_image(value: Any) -> Any:
    """The sketchpad's value (a background and drawn layers) as one image composited onto white; anything else
    (a path or an array sent through the API) as it came. Gradio's format stays here, out of the library."""
    if not isinstance(value, dict):
        return value
    parts = [value.get("background"), *(value.get("layers") or [])]
    parts = [p for p in parts if p is not None]
    if not parts and value.get("composite") is not None:
        parts = [value["composite"]]
    if not parts:
        raise FusionInputError("the sketch is empty: draw a digit or upload an image")
    images = [open_image(p).convert("RGBA") for p in parts]
    canvas = Image.new("RGBA", images[0].size, (255, 255, 255, 255))
    for layer in images:
        canvas = Image.alpha_composite(canvas, layer if layer.size == canvas.size else layer.resize(canvas.size))
    return canvas


def _has_drawing(value) -> bool:
    """An untouched sketchpad sends a dict with no layers and no background."""
    if isinstance(value, dict):
        return value.get("background") is not None or bool(value.get("layers"))
    return value is not None


def _choice_index(choice: str | None) -> int | None:
    """'layer 2' -> 1; 'average' -> None."""
    if not choice or choice == AVERAGE:
        return None
    return int(choice.split()[-1]) - 1


def predict(pipeline: FusionPipeline, image, text, audio, method="relevance", alpha=0.5, layer=AVERAGE, head=AVERAGE):
    """The main event: one explained prediction, as every output component wants it. The download is cleared:
    `export` builds it when asked for."""
    image = image if _has_drawing(image) else None
    text = text if isinstance(text, str) and text.strip() else None
    if image is None and text is None and audio is None:
        raise gr.Error("Nothing to answer: draw or upload an image, type a text, or record or upload audio.")
    if method not in METHODS:
        raise gr.Error(f"Unknown explanation method {method!r}; choose one of {', '.join(METHODS)}.")
    clock = StageClock()
    try:
        image = sketch_image(image)
        prediction = pipeline(image=image, text=text, audio=audio, explain=True, method=method)
    except FusionInputError as error:
        raise gr.Error(str(error)) from None
    except Exception:  # keep serving; the log has the details
        log.exception("prediction failed")
        raise gr.Error("The model failed on this input; the error was logged. Try another input.") from None
    clock.mark("pipeline")
    # Decoded once here; opacity and layer changes redraw from it.
    base = base_image(image) if image is not None else None
    state = {"prediction": prediction, "image": base, "focus": None}
    shown = present(prediction, base, alpha=alpha, layer=_choice_index(layer), head=_choice_index(head))
    clock.mark("draw")  # the pictures, tables and notice
    pictures = save(shown.pictures, FOLDERS.new())
    clock.mark("save")
    answer = (shown.probs, *pictures[:2], shown.words, shown.shares, shown.subsets, shown.notice, pictures[2],
              None, state)
    clock.record("predict")
    return answer


def export(state: dict | None, alpha: float, layer: str, head: str) -> str:
    """The explanation as a zip (JSON and PNGs, the pictures as the viewer sees them now), built on request."""
    if not state:
        raise gr.Error("Nothing to download yet: press Predict first.")
    shown = draw(state, alpha, layer, head)
    focused = {}
    if state.get("focus"):
        view = draw_cross(state["prediction"], state["image"], *state["focus"][:2], alpha=alpha,
                          layer=_choice_index(layer), head=_choice_index(head), direction=state["focus"][2])
        focused = {f"focus_{name}": data for name, data in view.pictures.items() if data is not None}
    path = export_zip(state["prediction"], FOLDERS.new() / "explanation.zip", image=state["image"],
                      drawn={name: data for name, data in shown.items() if data is not None}, extra=focused)
    return str(path)


class StageClock:
    """Wall and CPU milliseconds of a request's stages, appended as one JSON line to the file named by the
    `FUSION_TIMINGS` environment variable (used by `fusion.bench`), and nothing otherwise. CPU time is the
    calling thread's: with one torch thread per prediction (see `tune_for_serving`) the model's work runs in it. A
    file that cannot be written is logged once and never fails a request."""

    _lock = threading.Lock()
    _warned = False

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        self._first = (self._wall, self._cpu)

    def mark(self, stage: str) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.wall[stage], self.cpu[stage] = (wall - self._wall) * 1000, (cpu - self._cpu) * 1000
        self._wall, self._cpu = wall, cpu

    def record(self, event: str) -> None:
        path = os.environ.get("FUSION_TIMINGS")
        if not path:
            return
        self.wall["total"] = (self._wall - self._first[0]) * 1000
        self.cpu["total"] = (self._cpu - self._first[1]) * 1000
        line = json.dumps({"event": event, "wall_ms": self.wall, "cpu_ms": self.cpu})
        try:
            with self._lock, open(path, "a", encoding="utf-8") as file:
                file.write(line + "\n")
        except OSError as error:
            if not StageClock._warned:
                log.warning("cannot write request timings to FUSION_TIMINGS=%s: %s", path, error)
                StageClock._warned = True


class AnswerFolders:
    """Fresh folders for answers' files under `root`, each removed once it is older than `keep_s`.

    Gradio copies returned files into its own cache (emptied by `delete_cache`), so these are only staging.
    Pictures are returned as files rather than arrays: Gradio rewrites an array's cached file in place when two
    answers are identical, and a visitor could be sent a half-written picture (seen with 16 clients sending the
    same input), whereas a file is copied into its cache atomically.

    The folders are remembered in the order they were made, so a new one looks only at the oldest and removes
    at most `PRUNE_PER_FOLDER` of them: a request costs the same with 20,000 earlier answers as with none (the
    folder of the directory is never listed), and removal keeps pace because it outruns creation. The whole
    root goes at exit (`atexit`, which SIGTERM reaches through `main`).
    """

    def __init__(self, root: Path, keep_s: float = KEEP_OUTPUTS_S, clock=time.monotonic):
        self.root, self.keep_s, self.clock = root, keep_s, clock
        self._made: deque[tuple[float, str]] = deque()  # str: a third of a Path's memory, for an hour's answers
        self._lock = threading.Lock()
        self._cleanup_registered = False

    def __len__(self) -> int:
        return len(self._made)

    def new(self) -> Path:
        now = self.clock()
        expired: list[str] = []
        with self._lock:
            while self._made and len(expired) < PRUNE_PER_FOLDER and now - self._made[0][0] > self.keep_s:
                expired.append(self._made.popleft()[1])
            if not self._cleanup_registered:
                atexit.register(self.remove_all)
                self._cleanup_registered = True
            self.root.mkdir(parents=True, exist_ok=True)
            folder = tempfile.mkdtemp(dir=self.root)
            self._made.append((now, folder))
        for old in expired:
            shutil.rmtree(old, ignore_errors=True)
        return Path(folder)

    def remove_all(self) -> None:
        with self._lock:
            self._made.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def remove_orphaned_outputs(parent: Path) -> int:
    """Remove the answer folders of earlier app processes that no longer run (killed without cleaning up); once,
    at start-up. Returns how many were removed."""
    removed = 0
    for folder in parent.glob(f"{OUTPUTS_PREFIX}*"):
        pid = folder.name[len(OUTPUTS_PREFIX):]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


FOLDERS = AnswerFolders(Path(tempfile.gettempdir()) / f"{OUTPUTS_PREFIX}{os.getpid()}")


def draw(state: dict, alpha: float, layer: str, head: str) -> dict[str, bytes | None]:
    """The pictures for the viewer's choices (the dropdowns' 'layer 2' / 'average' strings)."""
    return draw_pictures(state["prediction"], state["image"], alpha=alpha, layer=_choice_index(layer),
                         head=_choice_index(head))


def save(pictures: dict[str, bytes | None], folder: Path) -> tuple[str | None, ...]:
    """Write the pictures into `folder`; their paths (None for a missing one) in the order given."""
    paths = []
    for name, data in pictures.items():
        if data is not None:
            (folder / name).write_bytes(data)
        paths.append(None if data is None else str(folder / name))
    return tuple(paths)


def render(state: dict | None, alpha: float, layer: str, head: str, direction: str = "from"):
    """Redraw for a changed opacity, layer, head or direction: the image and spectrogram pictures, the attention
    matrix, the words, the token × token picture and the caption. With a chosen token (`state["focus"]`), the
    pictures show its attention across the other modalities; otherwise relevance. Nothing is recomputed."""
    if not state:
        return None, None, None, None, None, FOCUS_HINT
    clock = StageClock()
    prediction = state["prediction"]
    matrix = draw(state, alpha, layer, head)
    if state.get("focus"):
        modality, at = state["focus"][:2]
        state["focus"] = (modality, at, direction)
        view = draw_cross(prediction, state["image"], modality, at, alpha=alpha, layer=_choice_index(layer),
                          head=_choice_index(head), direction=direction)
        pictures = {**view.pictures, "attention_matrix.png": matrix["attention_matrix.png"]}
        words, caption = view.words, view.caption
    else:
        pictures = {**matrix, "token_matrix.png": None}
        words, caption = prediction.explanation.text_heatmap, FOCUS_HINT
    order = ("image_overlay.png", "audio_overlay.png", "attention_matrix.png", "token_matrix.png")
    paths = save({name: pictures[name] for name in order}, FOLDERS.new())
    clock.mark("redraw")
    clock.record("render")
    return paths[0], paths[1], paths[2], words, paths[3], caption


def focus(state: dict | None, alpha: float, layer: str, head: str, direction: str, modality: str, at: Any):
    """Choose the token at `at` of `modality` and redraw every view around it."""
    if not state:
        raise gr.Error("Press Predict first, then click a place on the image, the spectrogram or a word.")
    try:
        state["prediction"].cross_attention(modality, at)  # checks the place before anything is drawn
    except ValueError as error:
        raise gr.Error(str(error)) from None
    state["focus"] = (modality, at, direction)
    return (*render(state, alpha, layer, head, direction), state)


def clicked_image(state, alpha, layer, head, direction, evt: gr.SelectData):
    """A click on the image picture: (x, y) in pixels of the image as given (the colour scale lies right of it)."""
    if not state or state.get("image") is None:
        raise gr.Error("Press Predict with an image first.")
    x, y = (int(v) for v in evt.index[:2])
    height, width = state["image"].shape[:2]
    if not (0 <= x < width and 0 <= y < height):
        raise gr.Error("Click on the image itself, not on its colour scale.")
    return focus(state, alpha, layer, head, direction, "image", (x, y))


def clicked_spectrogram(state, alpha, layer, head, direction, evt: gr.SelectData):
    """A click on the spectrogram picture: its column is a time of the clip."""
    if not state or state["prediction"].explanation.audio_spectrogram is None:
        raise gr.Error("Press Predict with audio first.")
    return focus(state, alpha, layer, head, direction, "audio",
                 spectrogram_x_to_time(state["prediction"].explanation, float(evt.index[0])))


def clicked_word(state, alpha, layer, head, direction, evt: gr.SelectData):
    """A click on a word: its index among the text's words (the gaps between words are not words)."""
    if not state or state["prediction"].explanation.text_heatmap is None:
        raise gr.Error("Press Predict with a text first.")
    pieces = state["prediction"].explanation.text_heatmap
    index = int(evt.index)
    if not 0 <= index < len(pieces) or not pieces[index][0].strip():
        raise gr.Error("Click on a word.")
    word = sum(1 for piece, _ in pieces[:index] if piece.strip())
    return focus(state, alpha, layer, head, direction, "text", word)


def unfocus(state, alpha, layer, head, direction):
    if state:
        state["focus"] = None
    return (*render(state, alpha, layer, head, direction), state)


def compare_precision(pipeline: FusionPipeline, state: dict | None) -> str:
    """On request: the answer and its maps redone with the checkpoint's fp32 weights, as a short Markdown table."""
    if not state:
        raise gr.Error("Press Predict first, then compare.")
    clock = StageClock()
    try:
        result = pipeline.compare_precision(state["prediction"])
    except ValueError as error:
        raise gr.Error(str(error)) from None
    clock.mark("compare")
    clock.record("compare")
    label = state["prediction"].label
    mine, full = result["probs"][label]
    lines = [f"**{pipeline.precision} vs fp32** (same checkpoint): P({label}) {mine:.4f} vs {full:.4f}; largest "
             f"difference over all classes {result['largest_difference']:.4f}.", "",
             "| map | rank correlation | top-10% overlap |", "|---|---|---|"]
    lines += [f"| {name} | {m['rank_correlation']:.3f} | {m['top_overlap']:.0%} |" for name, m in result["maps"].items()]
    return "\n".join(lines)


class SampleData:
    """The shipped sample (held-out images, clips of the held-out speaker, unseen phrasings) predicted and embedded
    once, in one pass, and kept for every session: the dataset view's default and the gallery "find matching"
    searches. `warm` starts that pass in the background when the app starts."""

    def __init__(self, folder: Path = EXAMPLES / "sample"):
        self.folder = folder
        self._view: DatasetView | None = None
        self._gallery: Gallery | None = None
        self._lock = threading.Lock()

    def dataset(self, pipeline: FusionPipeline) -> DatasetView:
        with self._lock:
            if self._view is None:
                if not self.folder.is_dir():
                    raise gr.Error(f"No sample to show: {self.folder} is missing.")
                self._view = DatasetView.predict(pipeline, self.folder)
            return self._view

    def gallery(self, pipeline: FusionPipeline) -> Gallery:
        view = self.dataset(pipeline)
        with self._lock:
            if self._gallery is None:
                self._gallery = gallery_of(view)
            return self._gallery

    def warm(self, pipeline: FusionPipeline) -> None:
        def run():
            try:
                self.gallery(pipeline)
            except Exception:  # the first request will report it
                log.exception("could not prepare the sample")

        threading.Thread(target=run, name="sample", daemon=True).start()


def gallery_of(view: DatasetView) -> Gallery:
    """A gallery of a dataset view's rows: each row's embedding per modality, its input and label."""
    if not any(row.get("embeddings") for row in view.rows):
        raise gr.Error("The sample has no embeddings: this checkpoint has no embedding head.")
    return Gallery.of((modality, vector, row["input"][modality], row.get("label"))
                      for row in view.rows for modality, vector in (row.get("embeddings") or {}).items())


SAMPLE = SampleData()
MATCHES = 5


def find_matching(pipeline: FusionPipeline, image, text, audio, source: str, target: str):
    """The `MATCHES` items of `target` in the sample gallery nearest to the given input of `source`: a table, the
    images (for an image search) and the best clip (for an audio search), and the matches for `open_match`."""
    given = {"image": sketch_image(image) if _has_drawing(image) else None,
             "text": text if isinstance(text, str) and text.strip() else None, "audio": audio}
    if given.get(source) is None:
        raise gr.Error(f"Give {'a' if source == 'text' else 'an'} {source} to search with (or choose another 'search with').")
    if pipeline.model.embedding_head is None:
        raise gr.Error("This checkpoint has no embedding head; train one with python -m fusion.embedding_head.")
    clock = StageClock()
    gallery = SAMPLE.gallery(pipeline)
    try:
        matches = pipeline.search({source: given[source]}, MATCHES, modality=target, gallery=gallery)
    except FusionInputError as error:
        raise gr.Error(str(error)) from None
    clock.mark("search")
    clock.record("find")
    rows = [[rank + 1, m.label, round(m.score, 3), m.item if target == "text" else Path(m.item).name if target == "audio"
             else f"image {m.index + 1} of the sample"] for rank, m in enumerate(matches)]
    pictures = [(_enlarged(m.item), f"{m.label} · {m.score:.2f}") for m in matches] if target == "image" else None
    clip = matches[0].item if target == "audio" else None
    return rows, pictures, clip, [(m.modality, m.item) for m in matches]


def _enlarged(image: Any) -> Any:
    """A small array image (MNIST's 28×28) shown 4× larger; anything else as it is."""
    if isinstance(image, np.ndarray) and max(image.shape[:2]) < 100:
        return np.kron(image, np.ones((4, 4) + (1,) * (image.ndim - 2), dtype=image.dtype))
    return image


def open_match(pipeline: FusionPipeline, matches, method, alpha, layer, head, evt: gr.SelectData):
    """A click on a match (a row of the table or a picture): that item alone, explained in the views above."""
    if not matches:
        raise gr.Error("Search first.")
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    if not 0 <= int(index) < len(matches):
        raise gr.Error("Click on a match.")
    modality, item = matches[int(index)]
    inputs = {"image": None, "text": None, "audio": None, modality: _enlarged(item)}
    return predict(pipeline, inputs["image"], inputs["text"], inputs["audio"], method, alpha, layer, head)


def similarity_rows(state: dict | None) -> list[list]:
    """The given inputs' cosine similarities in the shared space, one row per modality."""
    if not state or not state["prediction"].explanation.embeddings:
        return []
    similar = state["prediction"].explanation.similarities
    names = list(state["prediction"].explanation.embeddings)
    return [[a, *(round(similar[(a, b)], 3) if b in names else None for b in ("image", "text", "audio"))] for a in names]


ANY = "any"
# Rows per page of the app's table: Gradio's Dataframe took about a second a row to appear at 50 rows in the
# browser tests' Chromium (3.5 s for 10), so the app pages by 10; the library's pages hold 50.
DATASET_PAGE = 10


def open_dataset(pipeline: FusionPipeline, file: str | None):
    """Open predictions written by `fusion.predict` (JSONL with a `prediction` per row), a manifest to predict now
    (CSV or JSONL), or, with no file, the shipped sample; then show its first page, count and map."""
    clock = StageClock()
    try:
        if not file:
            view = SAMPLE.dataset(pipeline)
        elif file.endswith(".jsonl") and _is_predictions(file):
            view = DatasetView.load(file)
        elif file.endswith((".csv", ".jsonl")):
            view = DatasetView.predict(pipeline, file)
        else:
            raise gr.Error("Open a .jsonl of predictions (python -m fusion.predict) or a .csv/.jsonl manifest.")
    except (ValueError, FusionInputError) as error:
        raise gr.Error(str(error)) from None
    clock.mark("open")
    labels = sorted({str(v) for v in np.where(view.correct >= 0, view.labels, view.predictions)})
    state = {"view": view, "indices": np.arange(len(view)), "page": 0}
    shown = show_dataset(state)
    clock.mark("show")
    clock.record("dataset")
    return (*shown, state, gr.update(choices=[ANY, *labels], value=ANY), 1)


def _is_predictions(path: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        return "prediction" in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        return False


def show_dataset(state: dict) -> tuple:
    """The current page of the filtered rows, a line counting them, and the map of the filtered rows."""
    view, indices, page = state["view"], state["indices"], state["page"]
    wrong = int((view.correct[indices] == 0).sum())
    count = (f"{len(indices):,} of {len(view):,} items · {wrong:,} wrong · page {page + 1} of "
             f"{view.pages(indices, DATASET_PAGE)} · click a row to explain it")
    picture = save({"dataset_map.png": png_bytes(view.map_image(indices))}, FOLDERS.new())[0]
    return view.page(indices, page, DATASET_PAGE), count, picture


def filter_dataset(state: dict | None, errors: bool, disagreements: bool, label: str, subset: str, page: float | None):
    """Apply the filters and go to `page` (1-based; clamped)."""
    if not state:
        raise gr.Error("Open a dataset first.")
    view = state["view"]
    state["indices"] = view.filter(errors=errors, disagreements=disagreements, label=None if label == ANY else label,
                                   subset=None if subset == ANY else subset)
    state["page"] = min(max(int(page or 1), 1), view.pages(state["indices"], DATASET_PAGE)) - 1
    return (*show_dataset(state), state)


def explain_row(pipeline: FusionPipeline, state: dict | None, method, alpha, layer, head, evt: gr.SelectData):
    """A click on a row of the dataset table: that item, explained in the views above."""
    if not state:
        raise gr.Error("Open a dataset first.")
    row = int(evt.index[0])
    position = state["page"] * DATASET_PAGE + row
    if not 0 <= position < len(state["indices"]):
        raise gr.Error("Click on a row.")
    try:
        item = state["view"].item(int(state["indices"][position]))
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return predict(pipeline, _enlarged(item.get("image")), item.get("text"), item.get("audio"), method, alpha, layer, head)


def after_answer(pipeline: FusionPipeline, state: dict | None) -> tuple:
    """What follows each answer in its own event, so the public `predict` endpoint keeps its outputs: the maps'
    check, the previous token view and precision comparison cleared, and the inputs' similarities."""
    return check_maps(pipeline, state), None, FOCUS_HINT, "", similarity_rows(state)


def check_maps(pipeline: FusionPipeline, state: dict | None):
    """The trust figure of each map, after the answer is shown (it costs one batched pass): the explained class's
    probability drop when the map's top 10% is removed against a random 10%."""
    if not state:
        return []
    clock = StageClock()
    trust = pipeline.trust(state["prediction"])
    clock.mark("trust")
    clock.record("trust")
    rows = []
    for modality, figure in trust.items():
        verdict = {True: "yes", False: "no", None: "cannot tell"}[figure["faithful"]]
        rows.append([modality, figure["top"], figure["random"], verdict])
    return rows


def example_rows() -> list[list]:
    """[image, text, audio] rows from assets/examples/examples.tsv (paths relative to that folder)."""
    table = EXAMPLES / "examples.tsv"
    if not table.is_file():
        return []
    rows = []
    for line in table.read_text(encoding="utf-8").splitlines()[1:]:
        image, text, audio = (line.split("\t") + ["", "", ""])[:3]
        rows.append([str(EXAMPLES / image) if image else None, text or None, str(EXAMPLES / audio) if audio else None])
    return rows


class ModelThreads:
    """The threads that run the model: `size` of them, made once and kept while the app runs.

    Gradio runs each event in a worker thread of its own pool, which starts threads as requests come and ends them
    when idle. Each thread that has run the model keeps per-thread buffers of the maths libraries after it ends:
    1,000 predictions from 40 short-lived threads grew a process by 43 MB, the same from one thread by nothing.
    `pin` makes an event's function run in one of these threads instead (its caller waits), so the app's memory
    stays flat under load whatever Gradio does with its own threads. Two threads per prediction computed at once
    (`concurrency`), so that an answer and its follow-up checks can run side by side.
    """

    def __init__(self, concurrency: int = CONCURRENCY):
        self._pool = ThreadPoolExecutor(2 * concurrency, thread_name_prefix="model")

    def pin(self, function):
        """`function`, run in one of these threads; its signature stays visible to Gradio (`gr.SelectData`)."""

        @functools.wraps(function)
        def pinned(*args, **kwargs):
            return self._pool.submit(function, *args, **kwargs).result()

        return pinned

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def build_demo(pipeline: FusionPipeline, threads: ModelThreads | None = None) -> gr.Blocks:
    """The interface around `pipeline`; events that run the model run in `threads` (default: for `CONCURRENCY`)."""
    pin = (threads or ModelThreads()).pin
    layers = [AVERAGE] + [f"layer {i + 1}" for i in range(pipeline.model.config.num_hidden_layers)]
    heads = [AVERAGE] + [f"head {i + 1}" for i in range(pipeline.model.config.num_attention_heads)]
    with gr.Blocks(title="fusion", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# fusion")
        gr.Markdown(I18N("fusion_intro"))
        gr.Markdown(f"`{pipeline.description}`", elem_id="model-line")
        state = gr.State()
        with gr.Row():
            with gr.Column(scale=1):
                image = explain_unreadable_images(gr.Sketchpad(
                    label=I18N("fusion_image"), type="numpy", image_mode="RGBA", sources=["upload", "webcam", "clipboard"],
                    canvas_size=(280, 280), elem_id="image-input"))
                text = gr.Textbox(label=I18N("fusion_text"), placeholder=I18N("fusion_placeholder"), elem_id="text-input")
                audio = gr.Audio(label=I18N("fusion_audio"), sources=["upload", "microphone"], type="filepath", elem_id="audio-input")
                method = gr.Radio(list(METHODS), value="relevance", label=I18N("fusion_method"))
                submit = gr.Button(I18N("fusion_predict"), variant="primary", elem_id="predict")
            with gr.Column(scale=2):
                label = gr.Label(label=I18N("fusion_prediction"), num_top_classes=5, elem_id="prediction")
                summary = gr.Markdown(elem_id="notice")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label=I18N("fusion_opacity"))
                with gr.Row():
                    image_out = gr.Image(label=I18N("fusion_image_relevance"), type="filepath", elem_id="image-heatmap")
                    audio_out = gr.Image(label=I18N("fusion_audio_relevance"), type="filepath", elem_id="audio-heatmap")
                words = gr.HighlightedText(label=I18N("fusion_text_relevance"), elem_id="text-heatmap")
                shares = gr.Dataframe(headers=["modality", "share", "Shapley", "alone"], label=I18N("fusion_contributions"))
                subsets = gr.Dataframe(headers=["subset", "label", "confidence"], label=I18N("fusion_subsets"))
                with gr.Row():
                    layer = gr.Dropdown(layers, value=AVERAGE, label=I18N("fusion_layer"))
                    head = gr.Dropdown(heads, value=AVERAGE, label=I18N("fusion_head"))
                focus_line = gr.Markdown(I18N("fusion_focus_hint"), elem_id="focus")
                with gr.Row():
                    direction = gr.Radio([("what it attends to", "from"), ("what attends to it", "to")], value="from",
                                         label=I18N("fusion_direction"), elem_id="direction")
                    clear = gr.Button(I18N("fusion_clear"), elem_id="clear-focus")
                attention = gr.Image(label=I18N("fusion_attention"), type="filepath", elem_id="attention")
                token_matrix = gr.Image(label=I18N("fusion_token_matrix"), type="filepath", elem_id="token-matrix")
                trust = gr.Dataframe(headers=["map", "drop, top 10% removed", "drop, random 10%", "faithful here"],
                                     label=I18N("fusion_check"), elem_id="trust")
                similar = gr.Dataframe(headers=["input", "image", "text", "audio"], label=I18N("fusion_similarity"),
                                       elem_id="similarity")
                compare = gr.Button(I18N("fusion_compare"), elem_id="compare-precision")
                compared = gr.Markdown(elem_id="precision-comparison")
                prepare = gr.Button(I18N("fusion_export"), elem_id="export")
                download = gr.File(label=I18N("fusion_download"), elem_id="download")
        with gr.Accordion(I18N("fusion_find"), open=False, elem_id="find-matching"):
            with gr.Row():
                source = gr.Radio(["image", "text", "audio"], value="image", label=I18N("fusion_search_with"), elem_id="search-with")
                target = gr.Radio(["image", "text", "audio"], value="audio", label=I18N("fusion_search_for"), elem_id="search-for")
                find = gr.Button(I18N("fusion_find_button"), elem_id="find")
            found = gr.Dataframe(headers=["rank", "label", "cosine", "item"], label=I18N("fusion_matches"), elem_id="matches")
            with gr.Row():
                found_images = gr.Gallery(label=I18N("fusion_match_images"), columns=MATCHES, height=160, elem_id="match-images")
                found_clip = gr.Audio(label=I18N("fusion_match_clip"), type="filepath", elem_id="match-clip")
            matches = gr.State()
        with gr.Accordion(I18N("fusion_dataset"), open=False, elem_id="dataset"):
            with gr.Row():
                dataset_file = gr.File(label=I18N("fusion_dataset_file"), file_types=[".jsonl", ".csv"], elem_id="dataset-file")
                open_button = gr.Button(I18N("fusion_dataset_open"), elem_id="open-dataset")
            with gr.Row():
                only_errors = gr.Checkbox(label=I18N("fusion_only_errors"), elem_id="only-errors")
                only_disagreements = gr.Checkbox(label=I18N("fusion_only_disagreements"), elem_id="only-disagreements")
                label_filter = gr.Dropdown([ANY], value=ANY, label=I18N("fusion_label_filter"), elem_id="label-filter")
                subset_filter = gr.Dropdown([ANY, *SUBSET_KEYS], value=ANY, label=I18N("fusion_subset_filter"), elem_id="subset-filter")
                page_number = gr.Number(1, precision=0, minimum=1, label=I18N("fusion_page"), elem_id="page")
            dataset_count = gr.Markdown(elem_id="dataset-count")
            with gr.Row():
                dataset_table = gr.Dataframe(headers=DATASET_COLUMNS, elem_id="dataset-table", scale=3)
                dataset_map = gr.Image(label=I18N("fusion_dataset_map"), type="filepath", elem_id="dataset-map", scale=2)
            dataset_state = gr.State()
        rows = example_rows()
        if rows:
            examples = gr.Examples(rows, [image, text, audio], label=I18N("fusion_examples"))
            examples.dataset.headers = ["image / 图像", "text / 文本", "audio / 音频"]  # headers are not translated

        outputs = [label, image_out, audio_out, words, shares, subsets, summary, attention, download, state]
        after = [trust, token_matrix, focus_line, compared, similar]  # see after_answer
        submit.click(pin(lambda *a: predict(pipeline, *a)), [image, text, audio, method, alpha, layer, head], outputs,
                     api_name="predict", show_progress="full").then(
            pin(lambda s: after_answer(pipeline, s)), [state], after, api_visibility="private", show_progress="hidden")
        prepare.click(export, [state, alpha, layer, head], download, api_name="export", show_progress="minimal")
        views = [image_out, audio_out, attention, words, token_matrix, focus_line]
        for control in (alpha, layer, head, direction):
            control.change(render, [state, alpha, layer, head, direction], views, api_visibility="private",
                           show_progress="hidden")
        chosen = [state, alpha, layer, head, direction]
        for component, handler in ((image_out, clicked_image), (audio_out, clicked_spectrogram), (words, clicked_word)):
            component.select(handler, chosen, [*views, state], api_visibility="private", show_progress="hidden")
        compare.click(pin(lambda s: compare_precision(pipeline, s)), [state], compared, api_visibility="private",
                      show_progress="minimal")
        find.click(pin(lambda *a: find_matching(pipeline, *a)), [image, text, audio, source, target],
                   [found, found_images, found_clip, matches], api_name="find", show_progress="minimal")

        def open_chosen(chosen, method_, alpha_, layer_, head_, evt: gr.SelectData):
            return open_match(pipeline, chosen, method_, alpha_, layer_, head_, evt)

        for match_view in (found, found_images):
            match_view.select(pin(open_chosen), [matches, method, alpha, layer, head], outputs, api_visibility="private",
                              show_progress="full").then(
                pin(lambda s: after_answer(pipeline, s)), [state], after, api_visibility="private", show_progress="hidden")
        shown = [dataset_table, dataset_count, dataset_map]
        open_button.click(pin(lambda f: open_dataset(pipeline, f)), [dataset_file], [*shown, dataset_state, label_filter, page_number],
                          api_visibility="private", show_progress="full")
        for dataset_control in (only_errors, only_disagreements, label_filter, subset_filter, page_number):
            dataset_control.change(filter_dataset, [dataset_state, only_errors, only_disagreements, label_filter, subset_filter,
                                            page_number], [*shown, dataset_state], api_visibility="private", show_progress="hidden")

        def explain_chosen_row(chosen, method_, alpha_, layer_, head_, evt: gr.SelectData):
            return explain_row(pipeline, chosen, method_, alpha_, layer_, head_, evt)

        dataset_table.select(pin(explain_chosen_row), [dataset_state, method, alpha, layer, head], outputs, api_visibility="private",
                             show_progress="full").then(
            pin(lambda s: after_answer(pipeline, s)), [state], after, api_visibility="private", show_progress="hidden")
        clear.click(unfocus, chosen, [*views, state], api_visibility="private", show_progress="hidden")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fusion web demo")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--share", action="store_true", help="create a public link (needs --auth or --no-auth)")
    parser.add_argument("--auth", default=os.environ.get("FUSION_AUTH"), help="USER:PASSWORD, or set FUSION_AUTH")
    parser.add_argument("--no-auth", action="store_true", help="open a shared link to anyone, on purpose")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests waiting beyond this are turned away")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="predictions computed at once")
    args = parser.parse_args(argv)
    if args.share and not args.auth and not args.no_auth:
        parser.error("--share makes the demo public: give --auth USER:PASSWORD (or FUSION_AUTH), or --no-auth on purpose")
    if args.queue_size < 1 or args.concurrency < 1:
        parser.error("--queue-size and --concurrency must be at least 1")
    if args.auth and ":" not in args.auth:
        parser.error("--auth must look like USER:PASSWORD")
    return args


class GradioFiles:
    """Gradio's cached copies of this app's files (answers, uploads, examples), removed with their folders when
    the app stops. Gradio's own shutdown spares the examples and leaves each file's folder (named by its hash),
    and is skipped when its server takes longer than its five-second wait to close; the folders are noted when
    the stop is asked for (`note_folders`), before Gradio forgets the files it removes."""

    def __init__(self):  # before the demo is built, to see whether Gradio's history folder was there already
        self.demo: gr.Blocks | None = None
        self.folders: set[Path] = set()
        self.history = Path(get_upload_folder()) / "vibe_edit_history"  # an empty folder every Gradio app makes
        self.history_existed = self.history.exists()

    def _files(self) -> set[Path]:
        if self.demo is None:
            return set()
        paths = {Path(p) for files in self.demo.temp_file_sets for p in files}
        return paths | {Path(p) for block in self.demo.blocks.values() for p in getattr(block, "keep_in_cache", ())}

    def note_folders(self) -> None:
        self.folders |= {path.parent for path in self._files()}

    def remove(self) -> int:
        """Delete the files and their folders (where empty); returns how many files went."""
        removed = 0
        files = self._files()
        for path in files:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        for folder in self.folders | {path.parent for path in files} | ({self.history} if not self.history_existed else set()):
            try:
                folder.rmdir()
            except OSError:  # not empty (another app's file of the same content) or gone
                pass
        return removed


def tune_for_serving(concurrency: int) -> None:
    """Process settings for serving `concurrency` predictions at once; call before `build_demo`.

    - Each prediction gets its share of the cores: more torch threads than cores spin and slow every request,
      and one prediction gains little from a second thread.
    - Gradio recomputes its per-function latency summary (a pandas table over up to 10,000 stored events) after
      every event by default; every 100 events costs a hundredth of that, and keeping 1,000 events bounds the
      memory they take. Set in the environment beforehand to choose otherwise.
    - glibc gives each thread that allocates its own memory arena, which the worker threads grow and rarely
      return; two arenas keep resident memory flat under load at no measured cost in speed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // concurrency))
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "100")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
    if "MALLOC_ARENA_MAX" not in os.environ:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
        except (OSError, AttributeError):  # not glibc
            pass


def _stop_on_signals(files: GradioFiles) -> None:
    """SIGTERM ends the app as Ctrl-C does: Gradio closes its server, `main` removes Gradio's copies of the app's
    files, and `atexit` the answer folders."""

    def stop(signum, frame):
        files.note_folders()
        raise KeyboardInterrupt

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stop)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    removed = remove_orphaned_outputs(FOLDERS.root.parent)
    if removed:
        log.info("removed the answer folders of %d app processes that had stopped without cleaning up", removed)
    tune_for_serving(args.concurrency)
    files = GradioFiles()
    log.info("loading %s …", args.model)
    pipeline = FusionPipeline.from_pretrained(args.model, precision=args.precision, device=args.device)
    log.info("ready: %s, %d torch threads", pipeline.description, torch.get_num_threads())
    threads = ModelThreads(args.concurrency)
    demo = build_demo(pipeline, threads)
    if pipeline.model.embedding_head is not None:
        SAMPLE.warm(pipeline)  # the dataset view's default and the gallery, ready before anyone asks
    # A full queue answers at once with Gradio's "Queue is full! Please try again." instead of a long wait.
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    files.demo = demo
    _stop_on_signals(files)
    try:
        demo.launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"),
            server_port=args.port,
            share=args.share,
            auth=tuple(args.auth.split(":", 1)) if args.auth else None,
            max_file_size=MAX_FILE_SIZE,
            show_error=True,
            i18n=I18N,
            js=PLAYHEAD_JS,
        )
    finally:  # Ctrl-C or SIGTERM
        demo.close(verbose=False)
        threads.close()
        log.info("stopped; removed %d cached files", files.remove())


if __name__ == "__main__":
    main()
