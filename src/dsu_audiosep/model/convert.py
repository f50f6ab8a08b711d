"""A converted model folder: one safetensors file with only what inference reads, loaded in ms.

    dsu-audiosep convert --checkpoint audiosep_base_4M_steps.ckpt --roberta-dir roberta-base --out audiosep-fast
    {"cmd": "load_model", "model_dir": "audiosep-fast"}

Layout:
    model.safetensors   ss_model.* (separator + conv STFT kernels), text_encoder.* (RoBERTa + projection)
    config.json         format tag, model settings, RoBERTa sizes, storage dtype, where it came from
    tokenizer/          vocab.json, merges.txt (tokenizer.json if the source had one), config.json

Compared with the original files (1.76 GB across two pickles) it drops the HTSAT audio branch, the
contrastive heads and the duplicate CLAP copy, is not a pickle (nothing can run code on load) and
maps straight into memory. ``--fp16`` halves it again; weights are widened back to float32 on load
unless the model runs in fp16, so the only cost is fp16 rounding of the stored weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .skeleton import skeleton

from ..errors import FILE_NOT_FOUND, INVALID_CHECKPOINT, OUTPUT_ERROR, AudioSepError

FORMAT = "dsu-audiosep-converted"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "config.json", "tokenizer_config.json")


def convert(*, checkpoint_path: str, out_dir: str, roberta_dir: str | None = None, clap_checkpoint_path: str | None = None,
            config_path: str | None = None, fp16: bool = False, trust_checkpoint: bool = False) -> Path:
    from .checkpoints import load_model

    model = load_model(config_path=config_path, checkpoint_path=checkpoint_path, clap_checkpoint_path=clap_checkpoint_path,
                       roberta_dir=roberta_dir, device="cpu", mmap=True, use_torch_stft=False, trust_checkpoint=trust_checkpoint)
    rdir = Path(model.sources["roberta_dir"])  # the folder the loader settled on
    out = Path(out_dir)
    if out.exists() and not (out / "config.json").exists() and any(out.iterdir()):
        raise AudioSepError(OUTPUT_ERROR, f"{out} exists and is not a converted model folder; choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    try:
        dtype = torch.float16 if fp16 else torch.float32
        tensors = {}
        for prefix, module in (("ss_model.", model.ss_model), ("text_encoder.", model.text_encoder)):
            for k, v in module.state_dict().items():
                tensors[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        for name in TOKENIZER_FILES:
            if (rdir / name).exists():
                shutil.copyfile(rdir / name, tmp / "tokenizer" / name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"model_type": "ResUNet30", "sampling_rate": 32000, "condition_size": 512,
                      "input_channels": 1, "output_channels": 1},
            "roberta": model.text_encoder.config.to_dict(),
            "storage_dtype": "float16" if fp16 else "float32",
            "source": {"checkpoint_path": str(checkpoint_path), "clap_checkpoint_path": clap_checkpoint_path,
                       "roberta_dir": str(rdir), "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_converted(model_dir: str | os.PathLike, *, device: str = "cpu", mmap: bool = True,
                   use_torch_stft: bool = False, precision: str = "fp32"):
    from .audiosep import AudioSep
    from .checkpoints import check_precision, check_tensors
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
    with skeleton():
        ref_ss = {k: v for k, v in ResUNet30(use_torch_stft=True).state_dict().items() if not k.startswith(("base.stft.", "base.istft."))}
        ref_text = TextEncoder(rcfg).state_dict()
    check_tensors(ref_ss, ss, str(weights), "ss_model.")
    check_tensors(ref_text, text, str(weights), "text_encoder.")
    model = AudioSep.from_weights(ss, conv or None, text, tokenizer, rcfg, use_torch_stft=use_torch_stft)
    model.sources = {"model_dir": str(folder), "roberta_dir": str(folder / "tokenizer")}
    return model.to_device(device, precision)


def convert_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsu-audiosep convert", description="Convert AudioSep checkpoints into a fast-loading folder.")
    ap.add_argument("--checkpoint", required=True, help="audiosep_base_4M_steps.ckpt")
    ap.add_argument("--clap-checkpoint", default=None, help="music_speech_audioset_epoch_15_esc_89.98.pt (optional)")
    ap.add_argument("--roberta-dir", default=None, help="roberta-base folder (tokenizer files)")
    ap.add_argument("--config", default=None, help="config/audiosep_base.yaml (optional)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    ap.add_argument("--trust-checkpoint", action="store_true", help="allow pickles that run code (only for files you trust)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(checkpoint_path=args.checkpoint, out_dir=args.out, roberta_dir=args.roberta_dir,
                      clap_checkpoint_path=args.clap_checkpoint, config_path=args.config, fp16=args.fp16,
                      trust_checkpoint=args.trust_checkpoint)
    except AudioSepError as exc:
        print(json.dumps({"status": "error", "code": exc.code, "message": exc.message}))
        return 1
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"status": "done", "model_dir": str(out), "bytes": size, "elapsed": round(time.perf_counter() - t0, 3)}))
    return 0
