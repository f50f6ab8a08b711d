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

# Where a models folder keeps each file. The first layout is the parent app's installer and the
# original worker's defaults beside its executable (one definition for both); the second is the
# seed's flat folder. A folder is recognised by its checkpoint; the other fields take what is there.
NESTED_LAYOUT = {"config_path": "config/audiosep_base.yaml",
                 "checkpoint_path": "checkpoint/audiosep_base_4M_steps.ckpt",
                 "clap_checkpoint_path": "checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt",
                 "roberta_dir": "roberta-base"}
FLAT_LAYOUT = {"config_path": "audiosep_base.yaml",
               "checkpoint_path": "audiosep_base_4M_steps.ckpt",
               "clap_checkpoint_path": "music_speech_audioset_epoch_15_esc_89.98.pt",
               "roberta_dir": "roberta-base"}
LAYOUTS = (("config/, checkpoint/, roberta-base/", NESTED_LAYOUT), ("flat", FLAT_LAYOUT))
# A RoBERTa folder is also found inside checkpoint/ (where the seed's README puts it).
ROBERTA_ALTERNATIVES = ("checkpoint/roberta-base",)

DEFAULT_CONFIG = NESTED_LAYOUT["config_path"]
DEFAULT_CHECKPOINT = NESTED_LAYOUT["checkpoint_path"]
DEFAULT_CLAP = NESTED_LAYOUT["clap_checkpoint_path"]
DEFAULT_ROBERTA = NESTED_LAYOUT["roberta_dir"]

FOLDER_FIELDS = ("roberta_dir", "model_dir")
# A converted folder (dsu-audiosep convert): DIR itself or one folder in it, recognised by these files.
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


def places_looked(models_dir: str) -> list[str]:
    """What a models folder is searched for, in order: for the error that lists them."""
    folder = resolve_path(models_dir)
    places = [os.path.join(folder, layout["checkpoint_path"]) for _, layout in LAYOUTS]
    places.append(os.path.join(folder, "{,*/}" + " + ".join(CONVERTED_MARKS) + " (a converted folder)"))
    return places


def _from_models_dir(paths: dict[str, str | None], models_dir: str) -> bool:
    """A load_model that names no weights: the first layout whose checkpoint is in ``models_dir``,
    else a converted folder there; fields it finds nothing for keep their defaults. True when found."""
    folder = resolve_path(models_dir)
    for _, layout in LAYOUTS:
        if not os.path.isfile(os.path.join(folder, layout["checkpoint_path"])):
            continue
        for name, relative in layout.items():
            candidates = [relative] + (list(ROBERTA_ALTERNATIVES) if name == "roberta_dir" else [])
            found = next((os.path.join(folder, c) for c in candidates if os.path.exists(os.path.join(folder, c))), None)
            paths[name] = paths[name] or found
        return True
    converted = _converted_in(folder)
    if converted is not None:
        paths["model_dir"] = converted
        return True
    return False


def resolve_model_paths(args: Any, models_dir: str | None = None) -> ModelPaths:
    """``args``: the load_model fields config_path, checkpoint_path, clap_checkpoint_path,
    roberta_dir and model_dir. A converted folder (model_dir) takes no defaults. ``models_dir``
    (the worker's --models-dir) is looked in first when neither weights field is given."""
    paths = {name: _given(getattr(args, name)) for name in
             ("config_path", "checkpoint_path", "clap_checkpoint_path", "roberta_dir", "model_dir")}
    looked: list[str] = []
    if models_dir and paths["checkpoint_path"] is None and paths["model_dir"] is None:
        if not _from_models_dir(paths, models_dir):
            looked = places_looked(models_dir)
    if paths["model_dir"] is None:
        if paths["checkpoint_path"] is None:
            paths["checkpoint_path"] = _default_if_present(DEFAULT_CHECKPOINT)
            if paths["checkpoint_path"] is None:
                looked.append(resolve_path(DEFAULT_CHECKPOINT))
                raise AudioSepError(
                    errors.MISSING_FIELD,
                    "load_model needs \"checkpoint_path\" (an AudioSep .ckpt) or \"model_dir\" "
                    "(a converted model folder); no model was found in any of these places: "
                    + "; ".join(looked),
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
