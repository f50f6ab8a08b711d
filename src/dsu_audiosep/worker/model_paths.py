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
# What --models-dir DIR holds, by the seed's file names (a converted folder: DIR itself or one
# folder in it, recognised by these two files).
SEED_FILES = {"checkpoint_path": "audiosep_base_4M_steps.ckpt",
              "clap_checkpoint_path": "music_speech_audioset_epoch_15_esc_89.98.pt",
              "roberta_dir": "roberta-base"}
CONVERTED_MARKS = ("config.json", "model.safetensors")


def _given(value: str | None) -> str | None:
    return resolve_path(value) if value else None


def _default_if_present(relative: str) -> str | None:
    candidate = resolve_path(relative)
    return candidate if os.path.exists(candidate) else None


def _converted_in(folder: str) -> str | None:
    """``folder`` itself when it is a converted model folder, else its first sub-folder that is."""
    def converted(path: str) -> bool:
        return all(os.path.isfile(os.path.join(path, m)) for m in CONVERTED_MARKS)

    if converted(folder):
        return folder
    subs = sorted(e.path for e in os.scandir(folder) if e.is_dir()) if os.path.isdir(folder) else []
    return next((s for s in subs if converted(s)), None)


def _from_models_dir(paths: dict[str, str | None], models_dir: str) -> None:
    """A load_model that names no weights: the seed's files in ``models_dir``, else a converted
    folder there; fields it finds nothing for keep their defaults."""
    folder = resolve_path(models_dir)
    found = {name: os.path.join(folder, f) for name, f in SEED_FILES.items() if os.path.exists(os.path.join(folder, f))}
    if "checkpoint_path" in found:
        for name, path in found.items():
            paths[name] = paths[name] or path
    elif (converted := _converted_in(folder)) is not None:
        paths["model_dir"] = converted


def resolve_model_paths(args: Any, models_dir: str | None = None) -> ModelPaths:
    """``args``: the load_model fields config_path, checkpoint_path, clap_checkpoint_path,
    roberta_dir and model_dir. A converted folder (model_dir) takes no defaults. ``models_dir``
    (the worker's --models-dir) is looked in first when neither weights field is given."""
    paths = {name: _given(getattr(args, name)) for name in
             ("config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir", "model_dir")}
    if models_dir and paths["checkpoint_path"] is None and paths["model_dir"] is None:
        _from_models_dir(paths, models_dir)
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
