"""The fusion web demo: draw or upload a digit, type a phrase, speak or upload a clip; see the answer and why.

    python app.py [--model DIR] [--precision auto|int8|fp16|bf16|fp32] [--device cpu|cuda] [--port N]
                  [--share --auth USER:PASSWORD | --share --no-auth]
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr

from fusion import FusionInputError, FusionPipeline
from fusion.explain import METHODS
from fusion.processing import open_image
from fusion.render import (
    attention_image,
    base_image,
    export_zip,
    image_overlay,
    png_bytes,
    select_attention,
    spectrogram_image,
)

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "fusion-digits"
EXAMPLES = ROOT / "assets" / "examples"
MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 64
CONCURRENCY = 2
OUTPUTS = Path(tempfile.gettempdir()) / f"fusion-outputs-{os.getpid()}"
KEEP_OUTPUTS_S = 3600
AVERAGE = "average"
log = logging.getLogger("fusion.app")

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
    },
)


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

    component.preprocess = preprocess
    return component


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
    """The main event: one explained prediction, as every output component wants it."""
    image = image if _has_drawing(image) else None
    text = text if isinstance(text, str) and text.strip() else None
    if image is None and text is None and audio is None:
        raise gr.Error("Nothing to answer: draw or upload an image, type a text, or record or upload audio.")
    if method not in METHODS:
        raise gr.Error(f"Unknown explanation method {method!r}; choose one of {', '.join(METHODS)}.")
    try:
        prediction = pipeline(image=image, text=text, audio=audio, explain=True, method=method)
    except FusionInputError as error:
        raise gr.Error(str(error)) from None
    except Exception:  # keep serving; the log has the details
        log.exception("prediction failed")
        raise gr.Error("The model failed on this input; the error was logged. Try another input.") from None
    # Decoded once here; opacity and layer changes redraw from it.
    state = {"prediction": prediction, "image": base_image(image) if image is not None else None}
    shown = draw(state, alpha, layer, head)
    folder = output_folder()
    pictures = save(shown, folder)
    explanation = prediction.explanation
    rows = [[m, round(explanation.modality_shares.get(m, 0.0), 3), round(explanation.shapley.get(m, 0.0), 3),
             f"{explanation.counterfactuals[m][0]} ({explanation.counterfactuals[m][1]:.0%})"]
            for m in prediction.modalities]
    subsets = [[key, label, round(confidence, 3)] for key, (label, confidence) in explanation.counterfactuals.items()]
    # The zip holds the pictures as first shown; the heatmaps without overlay are drawn for it.
    download = export_zip(prediction, folder / "explanation.zip", image=state["image"],
                          drawn={name: data for name, data in shown.items() if data is not None})
    return (
        {label: p for label, p in prediction.top(len(prediction.probs))},
        *pictures[:2],
        explanation.text_heatmap,
        rows,
        subsets,
        notice(prediction),
        pictures[2],
        str(download),
        state,
    )


def output_folder() -> Path:
    """A fresh folder for one answer's files; folders older than `KEEP_OUTPUTS_S` go as new ones are made.

    Gradio copies returned files into its own cache (emptied by `delete_cache`), so these are only staging.
    Pictures are returned as files rather than arrays: Gradio rewrites an array's cached file in place when two
    answers are identical, and a visitor could be sent a half-written picture (seen with 16 clients sending the
    same input), whereas a file is copied into its cache atomically.
    """
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in OUTPUTS.iterdir():
        try:
            if now - old.stat().st_mtime > KEEP_OUTPUTS_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by a concurrent call
            pass
    return Path(tempfile.mkdtemp(dir=OUTPUTS))


atexit.register(shutil.rmtree, OUTPUTS, ignore_errors=True)


def draw(state: dict, alpha: float, layer: str, head: str) -> dict[str, bytes | None]:
    """The pictures that depend on the viewer's choices as PNG bytes, named as in the zip export: image overlay,
    spectrogram, attention matrix (None where the input lacks the modality)."""
    prediction, explanation = state["prediction"], state["prediction"].explanation
    matrix = select_attention(explanation, layer=_choice_index(layer), head=_choice_index(head))
    pictures = {
        "image_overlay.png": image_overlay(state["image"], explanation, alpha=alpha) if explanation.image_heatmap is not None else None,
        "audio_overlay.png": spectrogram_image(explanation, alpha=alpha) if explanation.audio_heatmap is not None else None,
        "attention_matrix.png": attention_image(matrix, prediction.modalities),
    }
    return {name: None if picture is None else png_bytes(picture) for name, picture in pictures.items()}


def save(pictures: dict[str, bytes | None], folder: Path) -> tuple[str | None, ...]:
    """Write the pictures into `folder`; their paths (None for a missing one) in the order given."""
    paths = []
    for name, data in pictures.items():
        if data is not None:
            (folder / name).write_bytes(data)
        paths.append(None if data is None else str(folder / name))
    return tuple(paths)


def render(state: dict | None, alpha: float, layer: str, head: str):
    """Redraw for a changed opacity, layer or head: paths of the image overlay, spectrogram and attention."""
    if not state:
        return None, None, None
    return save(draw(state, alpha, layer, head), output_folder())


def notice(prediction) -> str:
    """One line on agreement, method and anything adapted."""
    explanation = prediction.explanation
    used = " + ".join(prediction.modalities)
    lines = [f"**{prediction.label}** ({prediction.confidence:.0%}) from {used}, explained by {explanation.method}."]
    agreement = explanation.agreement
    if not agreement["agree"]:
        said = ", ".join(f"{m} says {label}" for m, label in agreement["labels"].items())
        lines.append(f"⚠️ The modalities disagree: {said}. "
                     f"Disagreeing with the combined answer: {', '.join(agreement['disagreeing']) or 'none'}.")
    lines += [f"ℹ️ {note}" for note in explanation.notes]
    return "\n\n".join(lines)


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


def build_demo(pipeline: FusionPipeline) -> gr.Blocks:
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
                attention = gr.Image(label=I18N("fusion_attention"), type="filepath", elem_id="attention")
                download = gr.File(label=I18N("fusion_download"), elem_id="download")
        rows = example_rows()
        if rows:
            examples = gr.Examples(rows, [image, text, audio], label=I18N("fusion_examples"))
            examples.dataset.headers = ["image / 图像", "text / 文本", "audio / 音频"]  # headers are not translated

        outputs = [label, image_out, audio_out, words, shares, subsets, summary, attention, download, state]
        submit.click(lambda *a: predict(pipeline, *a), [image, text, audio, method, alpha, layer, head], outputs,
                     api_name="predict", show_progress="full")
        for control in (alpha, layer, head):
            control.change(render, [state, alpha, layer, head], [image_out, audio_out, attention], api_name=False,
                           show_progress="hidden")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="fusion web demo")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder")
    parser.add_argument("--precision", default="auto", choices=("auto", "int8", "fp16", "bf16", "fp32"))
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log.info("loading %s …", args.model)
    pipeline = FusionPipeline.from_pretrained(args.model, precision=args.precision, device=args.device)
    log.info("ready: %s", pipeline.description)
    demo = build_demo(pipeline)
    # A full queue answers at once with Gradio's "Queue is full! Please try again." instead of a long wait.
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"),
        server_port=args.port,
        share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        max_file_size=MAX_FILE_SIZE,
        show_error=True,
        i18n=I18N,
    )


if __name__ == "__main__":
    main()
