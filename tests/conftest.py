"""Shared fixtures: tiny random configs and a tokenizer trained in the test session (nothing downloaded)."""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion import FusionConfig, FusionForClassification
from fusion.bench import free_port
from fusion.data import phrases
from fusion.data.sources import list_fsdd
from fusion.processing import FusionProcessor
from fusion.tokenization import build_tokenizer

LABELS = {i: str(i) for i in range(10)}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> FusionConfig:
    """Hidden size 32, 2 layers, 4 heads everywhere: a ResNet for images, BERT for text, AST for audio."""
    settings = dict(
        image_config={"model_type": "resnet", "num_channels": 1, "embedding_size": 8, "hidden_sizes": [8, 16],
                      "depths": [1, 1], "layer_type": "basic", "downsample_in_first_stage": False},
        text_config={"model_type": "bert", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64},
        audio_config={"model_type": "audio-spectrogram-transformer", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "intermediate_size": 64, "num_mel_bins": 32, "max_length": 100,
                      "patch_size": 8, "frequency_stride": 8, "time_stride": 8},
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, id2label=LABELS,
    )
    settings.update(overrides)
    return FusionConfig(**settings)


def tiny_model(tokenizer, **overrides) -> FusionForClassification:
    """A tiny random model (eval mode, seed 0) whose text encoder reads `tokenizer`'s vocabulary."""
    torch.manual_seed(0)
    text = dict(tiny_config().text_config.to_dict(), vocab_size=len(tokenizer))
    return FusionForClassification(tiny_config(text_config=text, **overrides)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(phrases.corpus(random.Random(0), count=500), vocab_size=300)


@pytest.fixture(scope="session")
def processor(tokenizer):
    return FusionProcessor(tokenizer)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return FusionForClassification(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer, processor):
    """A saved random tiny model with its processor: a self-describing checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny_model(tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def launch_app(checkpoint, *extra, env=None) -> tuple[subprocess.Popen, str]:
    """`app.py` serving `checkpoint` in a subprocess on a free port, once it accepts connections: (process, URL)."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    # Its output goes to a file, not a pipe: nobody reads a pipe while the app serves (a whole session, for the
    # shared app), and a full pipe would block the app.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "app.py", "--model", str(checkpoint), "--port", str(port), *extra],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"http://127.0.0.1:{port}/"
        except OSError:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read().decode(errors="replace"))
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the app did not start within 120 s")


@pytest.fixture(scope="session")
def shipped_app():
    """The app serving the shipped checkpoint in fp32, started once for the tests that talk to a running app
    (gradio_client and the browser journeys)."""
    process, url = launch_app(ROOT / "assets" / "fusion-digits", "--precision", "fp32")
    yield url
    process.terminate()
    process.wait(timeout=30)


def random_inputs(batch: int = 3, *, text_length: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(batch, 1, 28, 28, generator=generator),
        "input_ids": torch.randint(5, 300, (batch, text_length), generator=generator),
        "attention_mask": torch.ones(batch, text_length, dtype=torch.long),
        "audio_values": torch.randn(batch, 32, 100, generator=generator),
    }


@pytest.fixture()
def digit_image():
    """A white-on-black 28×28 'seven' drawn with strokes, like an MNIST digit."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[6:9, 7:21] = 255
    for row in range(9, 23):
        col = 20 - (row - 9) // 2
        image[row, col - 1 : col + 2] = 255
    return image


@pytest.fixture()
def tone():
    """Half a second of a 440 Hz tone at 16 kHz inside a second of silence, as float32."""
    rate = 16000
    t = np.arange(rate // 2) / rate
    samples = np.zeros(rate, dtype=np.float32)
    samples[rate // 4 : rate // 4 + rate // 2] = 0.5 * np.sin(2 * np.pi * 440 * t)
    return rate, samples


SAMPLE_DATA = Path(__file__).resolve().parents[1] / "assets" / "examples" / "sample"


@pytest.fixture(scope="session")
def two_speakers(tmp_path_factory):
    """The sample's data with its clips split between the test speaker and a second one, "nicolas"."""
    folder = tmp_path_factory.mktemp("speakers")
    shutil.copytree(SAMPLE_DATA / "mnist", folder / "mnist")
    (folder / "fsdd").mkdir()
    for i, clip in enumerate(list_fsdd(SAMPLE_DATA)):
        speaker = "nicolas" if i % 2 else clip.speaker
        shutil.copyfile(clip.path, folder / "fsdd" / f"{clip.label}_{speaker}_{i}.wav")
    return folder
