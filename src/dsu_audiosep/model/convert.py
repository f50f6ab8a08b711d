"""Writing a converted model folder (``dsu-audiosep convert``); converted.py reads it back.

    dsu-audiosep convert --checkpoint audiosep_base_4M_steps.ckpt --roberta-dir roberta-base --out audiosep-fast
    {"cmd": "load_model", "model_dir": "audiosep-fast"}

Layout:
    model.safetensors   ss_model.* (separator + conv STFT kernels), text_encoder.* (RoBERTa + projection)
    config.json         format tag, model settings, RoBERTa sizes, storage dtype, where it came from
    tokenizer/          vocab.json, merges.txt (tokenizer.json if the source had one), config.json

``--with-audio-branch`` adds ``audio_encoder.safetensors`` (the CLAP audio branch, for audio queries),
read only when the first audio query comes.

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

from ..errors import OUTPUT_ERROR, AudioSepError
from .audio_loader import AUDIO_FILE
from .checkpoints import load_model
from .constants import CONDITION_SIZE, SAMPLE_RATE
from .converted import FORMAT, FORMAT_VERSION, TOKENIZER_FILES


def convert(*, checkpoint_path: str, out_dir: str, roberta_dir: str | None = None, clap_checkpoint_path: str | None = None,
            config_path: str | None = None, fp16: bool = False, trust_checkpoint: bool = False,
            with_audio_branch: bool = False) -> Path:
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
        if with_audio_branch:
            # A file of its own: text-only loads never map it (see audio_loader.py).
            encoder = model.load_audio_branch()
            audio = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in encoder.state_dict().items()}
            save_file(audio, str(tmp / AUDIO_FILE), metadata={"format": FORMAT})
        for name in TOKENIZER_FILES:
            if (rdir / name).exists():
                shutil.copyfile(rdir / name, tmp / "tokenizer" / name)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"model_type": "ResUNet30", "sampling_rate": SAMPLE_RATE, "condition_size": CONDITION_SIZE,
                      "input_channels": 1, "output_channels": 1},
            "roberta": model.text_encoder.config.to_dict(),
            "storage_dtype": "float16" if fp16 else "float32",
            "audio_branch": bool(with_audio_branch),
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


def convert_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsu-audiosep convert", description="Convert AudioSep checkpoints into a fast-loading folder.")
    ap.add_argument("--checkpoint", required=True, help="audiosep_base_4M_steps.ckpt")
    ap.add_argument("--clap-checkpoint", default=None, help="music_speech_audioset_epoch_15_esc_89.98.pt (optional)")
    ap.add_argument("--roberta-dir", default=None, help="roberta-base folder (tokenizer files)")
    ap.add_argument("--config", default=None, help="config/audiosep_base.yaml (optional)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--fp16", action="store_true", help="store weights as float16 (half the size)")
    ap.add_argument("--with-audio-branch", action="store_true",
                    help="also keep the CLAP audio branch (audio_encoder.safetensors, ~290 MB) for audio queries")
    ap.add_argument("--trust-checkpoint", action="store_true", help="allow pickles that run code (only for files you trust)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(checkpoint_path=args.checkpoint, out_dir=args.out, roberta_dir=args.roberta_dir,
                      clap_checkpoint_path=args.clap_checkpoint, config_path=args.config, fp16=args.fp16,
                      trust_checkpoint=args.trust_checkpoint, with_audio_branch=args.with_audio_branch)
    except AudioSepError as exc:
        print(json.dumps({"status": "error", "code": exc.code, "message": exc.message}))
        return 1
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"status": "done", "model_dir": str(out), "bytes": size, "elapsed": round(time.perf_counter() - t0, 3)}))
    return 0
