"""Which files a ``load_model`` means: relative paths resolved, the original worker's defaults
applied, and each path checked before anything is loaded."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .. import errors
from ..engine.torch_engine import ModelPaths
from ..errors import AudioSepError
from .policy import resolve_path

# The original worker's defaults, relative to the executable's folder. A default is used only
# when the file is there; otherwise the field stays empty (and for the checkpoint, that is an
# error naming the field).
DEFAULT_CONFIG = "config/audiosep_base.yaml"
DEFAULT_CHECKPOINT = "checkpoint/audiosep_base_4M_steps.ckpt"
DEFAULT_CLAP = "checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt"
DEFAULT_ROBERTA = "roberta-base"

FOLDER_FIELDS = ("roberta_dir", "model_dir")


def _given(value: str | None) -> str | None:
    return resolve_path(value) if value else None


def _default_if_present(relative: str) -> str | None:
    candidate = resolve_path(relative)
    return candidate if os.path.exists(candidate) else None


def resolve_model_paths(args: Any) -> ModelPaths:
    """``args``: the load_model fields config_path, checkpoint_path, clap_checkpoint_path,
    roberta_dir and model_dir. A converted folder (model_dir) takes no defaults."""
    paths = {name: _given(getattr(args, name)) for name in
             ("config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir", "model_dir")}
    if paths["model_dir"] is None:
        if paths["checkpoint_path"] is None:
            paths["checkpoint_path"] = _default_if_present(DEFAULT_CHECKPOINT)
            if paths["checkpoint_path"] is None:
                raise AudioSepError(
                    errors.MISSING_FIELD,
                    "load_model needs \"checkpoint_path\" (an AudioSep .ckpt) or \"model_dir\" "
                    f"(a converted model folder); no default {DEFAULT_CHECKPOINT} was found "
                    f"at {resolve_path(DEFAULT_CHECKPOINT)}",
                )
        for name, default in (("config_path", DEFAULT_CONFIG), ("clap_checkpoint_path", DEFAULT_CLAP),
                              ("roberta_dir", DEFAULT_ROBERTA)):
            if paths[name] is None:
                paths[name] = _default_if_present(default)
    return ModelPaths(**paths)


def check_exists(paths: ModelPaths) -> None:
    """Each given path exists and is a file or a folder as its field expects."""
    for name, path in dataclasses.asdict(paths).items():
        if path is None:
            continue
        if not os.path.exists(path):
            raise AudioSepError(errors.FILE_NOT_FOUND, f"{name}: not found: {path}")
        wants_dir = name in FOLDER_FIELDS
        if wants_dir and not os.path.isdir(path):
            raise AudioSepError(errors.INVALID_FIELD, f"{name}: not a folder: {path}")
        if not wants_dir and os.path.isdir(path):
            raise AudioSepError(errors.INVALID_FIELD, f"{name}: is a folder, expected a file: {path}")
