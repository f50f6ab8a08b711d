"""Reading a converted model folder: one safetensors file with only what inference reads, loaded in ms.

convert.py writes it (layout and reasons there); ``load_model(model_dir=...)`` comes here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import FILE_NOT_FOUND, INVALID_CHECKPOINT, AudioSepError
from .no_init import no_init
from .state_check import check_tensors

FORMAT = "dsu-audiosep-converted"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "config.json", "tokenizer_config.json")


def load_converted(model_dir: str | os.PathLike, *, device: str = "cpu", use_torch_stft: bool = False,
                   precision: str = "fp32"):
    """Load a folder written by ``convert``; safetensors maps the weights, so this takes milliseconds."""
    from .audiosep import AudioSep, check_precision
    from .resunet import ResUNet30
    from .text import RobertaConfig, TextEncoder, Tokenizer

    folder = Path(model_dir)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not folder.is_dir():
        raise AudioSepError(FILE_NOT_FOUND, f"model_dir not found: {folder}")
    for p in (cfg_path, weights):
        if not p.exists():
            raise AudioSepError(INVALID_CHECKPOINT, f"{folder} is not a converted model folder: {p.name} is missing (create one with 'dsu-audiosep convert')")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AudioSepError(INVALID_CHECKPOINT, f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AudioSepError(INVALID_CHECKPOINT, f"{cfg_path} is not a dsu-audiosep converted model config")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise AudioSepError(INVALID_CHECKPOINT, f"{folder} was written by a newer dsu-audiosep (format {meta.get('format_version')})")
    dtype = check_precision(precision)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AudioSepError(INVALID_CHECKPOINT, f"{weights} is truncated or corrupt ({exc})") from None
    if meta.get("storage_dtype") == "float16" and dtype != torch.float16:
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    rcfg = RobertaConfig.from_dict(meta.get("roberta") or {}, str(cfg_path))
    tokenizer = Tokenizer.from_dir(folder / "tokenizer")
    ss = {k[len("ss_model."):]: v for k, v in sd.items() if k.startswith("ss_model.")}
    conv = {k[len("base."):]: ss.pop(k) for k in list(ss) if k.startswith(("base.stft.", "base.istft."))}
    text = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    with no_init():
        ref_ss = {k: v for k, v in ResUNet30(use_torch_stft=True).state_dict().items() if not k.startswith(("base.stft.", "base.istft."))}
        ref_text = TextEncoder(rcfg).state_dict()
    check_tensors(ref_ss, ss, str(weights), "ss_model.")
    check_tensors(ref_text, text, str(weights), "text_encoder.")
    model = AudioSep.from_weights(ss, conv or None, text, tokenizer, rcfg, use_torch_stft=use_torch_stft)
    model.sources = {"model_dir": str(folder), "roberta_dir": str(folder / "tokenizer")}
    from .audio_loader import from_converted

    model.audio_source = from_converted(folder)
    return model.to_device(device, precision)
