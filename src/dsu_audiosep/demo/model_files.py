"""Write untrained AudioSep files in the exact formats users bring (demo and tests).

Key names, order, shapes, dtypes and containers are those of the released files:
- ``write_audiosep_checkpoint``: Lightning ``{"state_dict": ...}`` with ``ss_model.*`` and
  ``query_encoder.model.*`` (optionally the legacy ``text_branch.embeddings.position_ids``);
- ``write_clap_checkpoint``: ``{"state_dict": {"module." + key: ...}}``;
- ``write_roberta_dir``: tokenizer files + ``config.json`` (+ optional weights).

By default the key set is what our runtime reads (separator + CLAP text branch + the small CLAP
heads). Given a manifest (``shared/fixtures/manifest_*.json``) the file holds every released key,
the HTSAT audio branch included; constructor-valued tensors the runtime never reads (HTSAT masks
and filterbanks) are written as zeros of the right shape.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

from ..model.constants import N_FFT
from ..model.no_init import no_init
from .weights import schema_of, synthetic_state_dict

# Package data of dsu_audiosep itself (the frozen build and the wheel ship it there).
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_TOKENIZER = ASSETS / "demo_tokenizer"
UNTRAINED_NOTE = "UNTRAINED demo weights (deterministic random scheme); not the released AudioSep model"


def _natural(key: str) -> torch.Tensor | None:
    from ..model.stft import dft_kernels

    short = key.split("ss_model.base.")[-1]
    if short in ("stft.window", "istft.window"):
        return torch.hann_window(N_FFT)
    if short.startswith(("stft.", "istft.")):
        return dft_kernels()[short]
    if key.endswith("embeddings.position_ids"):
        return torch.arange(514)[None]
    return None


def _manifest_schema(manifest: str | os.PathLike, section: str | None = None) -> list[tuple[str, tuple, str]]:
    doc = json.loads(Path(manifest).read_text())
    entries = doc["entries"] if section is None else doc[section]["ss_model_entries"]
    return [(e["key"], tuple(e["shape"]), e["dtype"]) for e in entries]


def runtime_schema(use_torch_stft: bool = False, position_ids: bool = True) -> list[tuple[str, tuple, torch.dtype]]:
    """The AudioSep-checkpoint keys the runtime reads, in released order."""
    from ..model.resunet import ResUNet30
    from ..model.text import RobertaConfig, TextEncoder

    with no_init():
        ss = schema_of(ResUNet30(use_torch_stft=use_torch_stft).state_dict(), "ss_model.")
        text = schema_of(TextEncoder(RobertaConfig.from_dir(DEMO_TOKENIZER)).state_dict(), "query_encoder.model.")
    extra = [("query_encoder.model.text_branch.embeddings.position_ids", (1, 514), torch.int64)] if position_ids else []
    scales = [("query_encoder.model.logit_scale_a", (), torch.float32), ("query_encoder.model.logit_scale_t", (), torch.float32)]
    return ss + scales + extra + text


def _save_atomic(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def write_audiosep_checkpoint(
    path: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    use_torch_stft: bool = False,
    position_ids: bool = True,
    drop: Iterable[str] = (),
) -> Path:
    """A Lightning-format AudioSep checkpoint with synthetic weights."""
    if manifest is not None:
        schema = _manifest_schema(manifest)
        if use_torch_stft:
            ss = _manifest_schema(manifest, "torch_stft_variant")
            schema = ss + [e for e in schema if not e[0].startswith("ss_model.")]
    else:
        schema = runtime_schema(use_torch_stft, position_ids)
    if not position_ids:
        schema = [e for e in schema if not e[0].endswith("embeddings.position_ids")]
    dropped = set(drop)
    sd = synthetic_state_dict([e for e in schema if e[0] not in dropped], natural=_natural)
    return _save_atomic({"state_dict": sd, "epoch": 0, "global_step": 0, "note": UNTRAINED_NOTE}, Path(path))


def write_clap_checkpoint(path: str | os.PathLike, *, manifest: str | os.PathLike | None = None, position_ids: bool = True) -> Path:
    """A LAION-CLAP-format checkpoint (``module.`` prefix) with the same synthetic CLAP tensors."""
    if manifest is not None:
        schema = _manifest_schema(manifest)
    else:
        schema = [(k[len("query_encoder.model."):], s, d) for k, s, d in runtime_schema(False, True) if k.startswith("query_encoder.model.")]
    if not position_ids:
        schema = [e for e in schema if not e[0].endswith("embeddings.position_ids")]
    sd = synthetic_state_dict(schema, natural=_natural)
    return _save_atomic({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 15}, Path(path))


def write_roberta_dir(path: str | os.PathLike, *, with_weights: bool = False) -> Path:
    """A roberta folder: the tiny demo vocabulary (real roberta-base sizes in config.json)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for f in DEMO_TOKENIZER.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    if with_weights:
        schema = [(k[len("query_encoder.model."):], s, d) for k, s, d in runtime_schema(False, False) if k.startswith("query_encoder.model.text_branch.")]
        sd = synthetic_state_dict(schema, natural=_natural)
        from safetensors.torch import save_file

        save_file({"roberta." + k[len("text_branch."):]: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def write_demo_model(folder: str | os.PathLike) -> dict[str, str]:
    """Everything ``load_model`` needs, in one folder; returns the paths by their protocol names."""
    folder = Path(folder)
    ckpt = folder / "audiosep_demo_UNTRAINED.ckpt"
    if not ckpt.exists():
        write_audiosep_checkpoint(ckpt)
    roberta = write_roberta_dir(folder / "roberta-base")
    (folder / "README.txt").write_text(
        UNTRAINED_NOTE + ".\nIt exercises the real loading and separation code; its output is not a meaningful separation.\n"
    )
    return {"checkpoint_path": str(ckpt), "roberta_dir": str(roberta)}
