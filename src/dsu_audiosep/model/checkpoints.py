"""Loading the files users actually have, and refusing the ones that are wrong.

Accepted inputs (any combination that yields a full model):
- ``audiosep_base_4M_steps.ckpt``: a Lightning checkpoint ``{"state_dict": {...}}`` with
  ``ss_model.*`` (separator) and ``query_encoder.model.*`` (the whole CLAP model);
- ``music_speech_audioset_epoch_15_esc_89.98.pt``: a LAION CLAP checkpoint, keys ``module.*``;
- a ``roberta-base`` folder: tokenizer files, ``config.json``, optionally weights;
- a converted folder (``model_dir``): ``model.safetensors`` + ``config.json`` + tokenizer files,
  written by :func:`dsu_audiosep.model.convert.convert`.

Text-branch precedence follows the original build order, where each later load overwrites the
earlier: roberta folder weights < CLAP file < AudioSep file. Only the tensors inference uses are
kept (the contrastive heads are skipped; the HTSAT audio branch is read only on the first audio
query, see audio_loader.py).

Pickles are opened with ``weights_only=True``. A file that needs arbitrary code to unpickle is
refused with ``unsafe_checkpoint`` unless the caller passes ``trust_checkpoint=True``, in which case
a warning is printed to stderr.
"""
from __future__ import annotations

import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..devices import resolve_device
from ..errors import (
    FILE_NOT_FOUND,
    INVALID_CHECKPOINT,
    INVALID_CONFIG,
    INVALID_FIELD,
    PERMISSION_DENIED,
    UNSAFE_CHECKPOINT,
    AudioSepError,
)
from .audiosep import check_precision
from .constants import CONDITION_SIZE, SAMPLE_RATE
from .converted import load_converted
from .no_init import no_init
from .state_check import check_tensors

CONV_STFT_KEYS = (
    "stft.conv_real.weight",
    "stft.conv_imag.weight",
    "istft.conv_real.weight",
    "istft.conv_imag.weight",
    "istft.ola_window",
)
TORCH_STFT_KEYS = ("stft.window", "istft.window")
# Written by transformers < 4.31 as a persistent buffer; newer versions do not save it.
OPTIONAL_TEXT_KEYS = ("text_branch.embeddings.position_ids",)


@dataclass(frozen=True)
class ModelConfig:
    sampling_rate: int = SAMPLE_RATE
    condition_size: int = CONDITION_SIZE
    model_type: str = "ResUNet30"
    input_channels: int = 1
    output_channels: int = 1


def read_config(path: str | os.PathLike | None) -> ModelConfig:
    """The ``model``/``data`` sections of an AudioSep YAML config (None: the base model's values)."""
    if path is None:
        return ModelConfig()
    p = _existing_file(path, "config")
    import yaml

    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AudioSepError(INVALID_CONFIG, f"config {p} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise AudioSepError(INVALID_CONFIG, f"config {p} has no 'model' section (expected an AudioSep config such as config/audiosep_base.yaml)")
    model, data = doc["model"], doc.get("data") or {}
    try:
        cfg = ModelConfig(
            sampling_rate=int(data.get("sampling_rate", SAMPLE_RATE)),
            condition_size=int(model.get("condition_size", CONDITION_SIZE)),
            model_type=str(model.get("model_type", "ResUNet30")),
            input_channels=int(model.get("input_channels", 1)),
            output_channels=int(model.get("output_channels", 1)),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise AudioSepError(INVALID_CONFIG, f"config {p} has a malformed value: {exc}") from None
    if cfg.model_type != "ResUNet30":
        raise AudioSepError(INVALID_CONFIG, f"config {p}: model_type {cfg.model_type!r} is not supported (only ResUNet30)")
    if (cfg.sampling_rate, cfg.condition_size, cfg.input_channels, cfg.output_channels) != (SAMPLE_RATE, CONDITION_SIZE, 1, 1):
        raise AudioSepError(INVALID_CONFIG, f"config {p}: only the AudioSep base settings are supported (32 kHz, condition 512, 1 in / 1 out channel), got {cfg}")
    return cfg


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioSepError(FILE_NOT_FOUND, f"{what} file not found: {p}")
    if p.is_dir():
        raise AudioSepError(INVALID_CHECKPOINT if what != "config" else INVALID_CONFIG, f"{what} path is a folder, not a file: {p}")
    if not os.access(p, os.R_OK):
        raise AudioSepError(PERMISSION_DENIED, f"no permission to read {what} file {p}")
    return p


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise AudioSepError(FILE_NOT_FOUND, f"{what} folder not found: {p}")
    if not p.is_dir():
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} must be a folder, but {p} is a file")
    return p


def torch_load(path: str | os.PathLike, what: str, mmap: bool = False, trust: bool = False) -> dict[str, Any]:
    """``torch.load`` on CPU with weights_only, turning every failure into a named, readable error."""
    p = _existing_file(path, what)
    if p.stat().st_size == 0:
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {p} is empty (0 bytes)")
    # mmap needs the zip format; the legacy format is loaded normally.
    use_mmap = bool(mmap) and zipfile.is_zipfile(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "GLOBAL" in text or "Unsupported global" in text:
            detail = _unsupported_global(text)
            raise AudioSepError(
                UNSAFE_CHECKPOINT,
                f"{what} {p} contains Python objects that would run code when loaded{detail}; it was not "
                "loaded. If you trust this file, load it with trust_checkpoint=true (or convert it once "
                "with 'dsu-audiosep convert --trust-checkpoint').",
            ) from None
        reason = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported")), text.splitlines()[0] if text else "")
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {p} is not a PyTorch checkpoint ({reason[:200]})") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch.load fails in many ways on damaged files (IndexError, EOFError, ...)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {p} is truncated, corrupt or not a PyTorch checkpoint ({first})") from None
    if trust:
        print(f"dsu-audiosep: WARNING: {p} was unpickled without weights_only (trusted by the caller)", file=sys.stderr)
    if not isinstance(obj, Mapping):
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {p} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj  # type: ignore[return-value]


def _unsupported_global(text: str) -> str:
    for line in text.splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return f" ({line.strip()[:200]})"
    return ""


def state_dict_of(ckpt: Mapping[str, Any], path: Path, what: str) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping) or not sd:
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {path} has no state_dict")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {path} contains no tensors")
    return tensors


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def separator_weights(sd: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Split ``ss_model.*`` into the network weights (either STFT variant) and the conv STFT kernels, if stored."""
    from .resunet import ResUNet30

    ss = _sub(sd, "ss_model.")
    if not ss:
        hint = ""
        if any(k.startswith(("module.text_branch", "text_branch", "module.audio_branch")) for k in sd):
            hint = " It looks like a CLAP checkpoint: pass it as clap_checkpoint_path."
        raise AudioSepError(INVALID_CHECKPOINT, f"{source} contains no AudioSep separator weights (no 'ss_model.*' keys).{hint}")
    conv = {}
    for k in CONV_STFT_KEYS:
        if "base." + k in ss:
            conv[k] = ss.pop("base." + k)
    for k in TORCH_STFT_KEYS:
        ss.pop("base." + k, None)  # a window is a constant; ours is built in
    with no_init():
        reference = ResUNet30(use_torch_stft=True).state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith(("base.stft.", "base.istft."))}
    check_tensors(expected, ss, source, "ss_model.")
    if conv:
        with no_init():
            ref_conv = {k[len("base."):]: v for k, v in ResUNet30(use_torch_stft=False).state_dict().items() if k[len("base."):] in CONV_STFT_KEYS}
        if len(conv) != len(CONV_STFT_KEYS):
            conv_missing = [k for k in CONV_STFT_KEYS if k not in conv]
            raise AudioSepError(INVALID_CHECKPOINT, f"{source} has an incomplete conv STFT (missing ss_model.base.{conv_missing[0]})")
        check_tensors(ref_conv, conv, source, "ss_model.base.")
    return ss, (conv or None)


def text_weights(sources: list[tuple[str, Mapping[str, torch.Tensor]]], reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge text-branch tensors from (source name, CLAP-level dict) pairs; later sources win."""
    merged: dict[str, torch.Tensor] = {}
    for _, sd in sources:
        for k, v in sd.items():
            if k in reference:
                merged[k] = v
    missing = [k for k in reference if k not in merged]
    if missing:
        names = " + ".join(s for s, _ in sources) or "no file"
        raise AudioSepError(
            INVALID_CHECKPOINT,
            f"the text encoder is incomplete: {len(missing)} tensor(s) such as {missing[0]!r} were found in none of: {names}. "
            "Give the AudioSep checkpoint (it holds the CLAP text branch), or a CLAP checkpoint as clap_checkpoint_path.",
        )
    check_tensors(reference, merged, " + ".join(s for s, _ in sources))
    return merged


def clap_level(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A LAION CLAP state_dict as CLAP-level names: the ``module.`` prefix stripped as LAION's loader does."""
    keys = list(sd)
    if keys and keys[0].startswith("module"):
        sd = {k[7:]: v for k, v in sd.items()}
    if not any(k.startswith("text_branch.") for k in sd):
        hint = " It looks like an AudioSep checkpoint: pass it as checkpoint_path." if any(k.startswith("ss_model.") for k in keys) else ""
        raise AudioSepError(INVALID_CHECKPOINT, f"{source} is not a CLAP checkpoint (no 'text_branch.*' keys).{hint}")
    return {k: v for k, v in sd.items() if k not in OPTIONAL_TEXT_KEYS}


def roberta_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face ``roberta-base`` folder, if it has any, as ``text_branch.*`` names."""
    sd: Mapping[str, torch.Tensor] | None = None
    st = folder / "model.safetensors"
    pt = folder / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        try:
            sd = load_file(str(st))
        except Exception as exc:  # safetensors raises its own error types
            raise AudioSepError(INVALID_CHECKPOINT, f"roberta weights {st} are corrupt ({exc})") from None
    elif pt.exists():
        sd = state_dict_of(torch_load(pt, "roberta weights"), pt, "roberta weights")
    if not sd:
        return {}
    out = {}
    for k, v in sd.items():
        name = k[len("roberta."):] if k.startswith("roberta.") else k
        if name.startswith(("embeddings.", "encoder.", "pooler.")) and name not in ("embeddings.position_ids",):
            out["text_branch." + name] = v
    return out


def _hf_cache_roberta() -> list[Path]:
    """Where transformers keeps ``roberta-base`` once downloaded: users of the original have it."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    snapshots = Path(hub) / "models--roberta-base" / "snapshots"
    try:
        return sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []


def find_roberta_dir(roberta_dir: str | os.PathLike | None, near: list[Path]) -> Path:
    """The tokenizer folder: as given, else a ``roberta-base`` folder beside the checkpoint or the
    program, else the Hugging Face cache's ``roberta-base`` (what the original code loads)."""
    if roberta_dir is not None:
        return _existing_dir(roberta_dir, "roberta_dir")
    candidates = [base / "roberta-base" for base in near] + _hf_cache_roberta()
    for cand in candidates:
        if (cand / "vocab.json").exists() or (cand / "tokenizer.json").exists():
            return cand
    raise AudioSepError(
        FILE_NOT_FOUND,
        "no roberta tokenizer folder: pass roberta_dir (a 'roberta-base' folder with vocab.json and merges.txt); "
        "looked for roberta-base/ in " + ", ".join(str(b) for b in near) + " and in the Hugging Face cache",
    )


def load_model(
    *,
    config_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    clap_checkpoint_path: str | os.PathLike | None = None,
    roberta_dir: str | os.PathLike | None = None,
    model_dir: str | os.PathLike | None = None,
    device: str | None = "cpu",
    mmap: bool = False,
    use_torch_stft: bool = False,
    precision: str = "fp32",
    trust_checkpoint: bool = False,
):
    """Build an :class:`AudioSep` from the user's files. Every failure is an ``AudioSepError``."""
    from .audiosep import AudioSep
    from .text import RobertaConfig, TextEncoder, Tokenizer

    dev = resolve_device(device)
    check_precision(precision)
    read_config(config_path)
    if model_dir is not None:
        return load_converted(model_dir, device=dev, use_torch_stft=use_torch_stft, precision=precision)
    if checkpoint_path is None:
        raise AudioSepError(INVALID_FIELD, "checkpoint_path (the AudioSep .ckpt) or model_dir (a converted folder) is required")

    ckpt_path = Path(checkpoint_path)
    main_sd = state_dict_of(torch_load(ckpt_path, "AudioSep checkpoint", mmap, trust_checkpoint), ckpt_path, "AudioSep checkpoint")
    ss, conv = separator_weights(main_sd, f"AudioSep checkpoint {ckpt_path}")

    exe_dir = Path(sys.executable).resolve().parent
    rdir = find_roberta_dir(roberta_dir, list(dict.fromkeys([ckpt_path.absolute().parent, ckpt_path.resolve().parent, exe_dir])))
    tokenizer = Tokenizer.from_dir(rdir)
    rcfg = RobertaConfig.from_dir(rdir)
    with no_init():
        text_ref = TextEncoder(rcfg).state_dict()
    text_ref = {k: v for k, v in text_ref.items() if k not in OPTIONAL_TEXT_KEYS}

    sources: list[tuple[str, Mapping[str, torch.Tensor]]] = []
    audiosep_text = {k: v for k, v in _sub(main_sd, "query_encoder.model.").items() if k not in OPTIONAL_TEXT_KEYS}
    complete_in_main = all(k in audiosep_text for k in text_ref)
    if not complete_in_main:
        folder_sd = roberta_folder_weights(rdir)
        if folder_sd:
            sources.append((f"roberta folder {rdir}", folder_sd))
    if clap_checkpoint_path is not None:
        cp = Path(clap_checkpoint_path)
        # Read it even when the AudioSep file wins, so a wrong file is reported, not ignored;
        # mmap makes that a key scan rather than an 800 MB read.
        clap_sd = clap_level(state_dict_of(torch_load(cp, "CLAP checkpoint", True, trust_checkpoint), cp, "CLAP checkpoint"), f"CLAP checkpoint {cp}")
        if not complete_in_main:
            sources.append((f"CLAP checkpoint {cp}", clap_sd))
    if audiosep_text:
        sources.append((f"AudioSep checkpoint {ckpt_path}", audiosep_text))
    text_sd = text_weights(sources, text_ref)

    model = AudioSep.from_weights(ss, conv, text_sd, tokenizer, rcfg, use_torch_stft=use_torch_stft)
    model.sources = {"checkpoint_path": str(ckpt_path), "clap_checkpoint_path": None if clap_checkpoint_path is None else str(clap_checkpoint_path),
                     "roberta_dir": str(rdir)}
    model.audio_source = audio_branch_source(ckpt_path, clap_checkpoint_path, trust_checkpoint)
    return model.to_device(dev, precision)


def audio_branch_source(checkpoint_path: str | os.PathLike, clap_checkpoint_path: str | os.PathLike | None,
                        trust: bool = False):
    """Where the first audio query reads the CLAP audio branch: the AudioSep checkpoint when it has
    it (its copy wins in the original build order), else the CLAP checkpoint; mapped, not read."""
    from .audio_loader import AudioBranchSource

    def read() -> dict[str, torch.Tensor]:
        ckpt = Path(checkpoint_path)
        main = state_dict_of(torch_load(ckpt, "AudioSep checkpoint", True, trust), ckpt, "AudioSep checkpoint")
        found = _sub(main, "query_encoder.model.")
        if any(k.startswith("audio_branch.") for k in found) or clap_checkpoint_path is None:
            return found
        cp = Path(clap_checkpoint_path)
        return clap_level(state_dict_of(torch_load(cp, "CLAP checkpoint", True, trust), cp, "CLAP checkpoint"),
                          f"CLAP checkpoint {cp}")

    names = str(checkpoint_path) + (f" (and {clap_checkpoint_path})" if clap_checkpoint_path else "")
    return AudioBranchSource(read, f"checkpoint {names}")
