"""The fusion web demo: draw or upload a digit, type a phrase, speak or upload a clip; see the answer.

    python app.py [--model DIR] [--precision auto|int8|fp16|bf16|fp32] [--device cpu|cuda] [--port N]
                  [--share --auth USER:PASSWORD | --no-auth]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import gradio as gr

from fusion import FusionInputError, FusionPipeline

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "assets" / "fusion-digits"
MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 64


def predict(pipeline: FusionPipeline, image, text, audio):
    """The main event: returns the label's confidences and a status line, or raises a page error."""
    image = image if _has_drawing(image) else None
    try:
        prediction = pipeline(image=image, text=text or None, audio=audio)
    except FusionInputError as error:
        raise gr.Error(str(error)) from None
    used = " + ".join(prediction.modalities)
    return {label: p for label, p in prediction.top(len(prediction.probs))}, f"answer from {used}"


def _has_drawing(value) -> bool:
    """An untouched sketchpad sends a dict with no layers and no background."""
    if isinstance(value, dict):
        return value.get("background") is not None or bool(value.get("layers"))
    return value is not None


def build_demo(pipeline: FusionPipeline) -> gr.Blocks:
    with gr.Blocks(title="fusion") as demo:
        gr.Markdown("# fusion\nGive any mix of a handwritten digit, a phrase and a spoken digit.")
        with gr.Row():
            with gr.Column():
                image = gr.Sketchpad(label="Image: draw or upload", type="numpy", image_mode="RGBA",
                                     sources=["upload", "webcam", "clipboard"], canvas_size=(280, 280))
                text = gr.Textbox(label="Text", placeholder="seven, 七, sieben, 3 plus 4, …")
                audio = gr.Audio(label="Audio: record or upload", sources=["microphone", "upload"], type="filepath")
                submit = gr.Button("Predict", variant="primary")
            with gr.Column():
                label = gr.Label(label="Prediction", num_top_classes=5)
                status = gr.Markdown()
                gr.Markdown(f"`{pipeline.description}`")
        submit.click(lambda i, t, a: predict(pipeline, i, t, a), [image, text, audio], [label, status], api_name="predict")
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
    args = parser.parse_args(argv)
    if args.share and not args.auth and not args.no_auth:
        parser.error("--share makes the demo public: give --auth USER:PASSWORD (or FUSION_AUTH), or --no-auth on purpose")
    if args.auth and ":" not in args.auth:
        parser.error("--auth must look like USER:PASSWORD")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"loading {args.model} …", file=sys.stderr)
    pipeline = FusionPipeline.from_pretrained(args.model, precision=args.precision, device=args.device)
    print(f"ready: {pipeline.description}", file=sys.stderr)
    demo = build_demo(pipeline)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=4)
    demo.launch(
        server_name="0.0.0.0" if args.share or os.environ.get("SPACE_ID") else "127.0.0.1",
        server_port=args.port,
        share=args.share,
        auth=tuple(args.auth.split(":", 1)) if args.auth else None,
        max_file_size=MAX_FILE_SIZE,
        show_error=True,
    )


if __name__ == "__main__":
    main()
