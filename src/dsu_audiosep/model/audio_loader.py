"""Where the CLAP audio branch comes from, loaded only when the first audio query needs it.

Text-only users never pay for the ~72 M HTSAT parameters: ``load_model`` records an
``AudioBranchSource`` (which files hold the branch) and nothing is read until ``load()``. The
branch is read memory-mapped (``torch.load(mmap=True)`` or safetensors) and the tensors are
assigned, not copied, so ``AudioSep.release_audio_pages`` can hand its pages back when idle, as
for the text encoder.

Sources, as for the text branch (each later one wins in the original build order): the CLAP
checkpoint (``module.audio_branch.*``), then the AudioSep checkpoint
(``query_encoder.model.audio_branch.*``); a converted folder keeps it in ``audio_encoder.safetensors``
when written with ``convert --with-audio-branch``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import INVALID_CHECKPOINT, NO_AUDIO_BRANCH, AudioSepError
from .no_init import no_init
from .state_check import check_tensors

AUDIO_FILE = "audio_encoder.safetensors"  # in a converted folder
AUDIO_PREFIXES = ("audio_branch.", "audio_projection.")


def audio_weights(clap_level: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the embedding reads, from a CLAP-level state dict (keys without prefix)."""
    from .audio_query import is_unused_key

    return {k: v for k, v in clap_level.items() if k.startswith(AUDIO_PREFIXES) and not is_unused_key(k)}


def build_audio_encoder(weights: Mapping[str, torch.Tensor], source: str):
    """An eval-mode AudioEncoder around ``weights`` (assigned, so mapped tensors stay mapped)."""
    from .audio_query import AudioEncoder

    with no_init():
        encoder = AudioEncoder()
    expected = encoder.state_dict()
    check_tensors(expected, weights, source)
    encoder.load_state_dict(dict(weights), strict=True, assign=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


class AudioBranchSource:
    """How to read the audio branch later: ``reader()`` returns CLAP-level tensors or raises."""

    def __init__(self, reader: Callable[[], Mapping[str, torch.Tensor]], description: str):
        self._reader = reader
        self.description = description
        self._lock = threading.Lock()
        self._encoder = None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def load(self, device: torch.device | str = "cpu"):
        """The AudioEncoder, read on first use (thread-safe); AudioSepError(no_audio_branch) if absent."""
        with self._lock:
            if self._encoder is None:
                weights = audio_weights(self._reader())
                if not any(k.startswith("audio_branch.") for k in weights):
                    raise AudioSepError(NO_AUDIO_BRANCH, f"{self.description} has no CLAP audio branch "
                                        "('audio_branch.*' keys), so audio queries cannot be embedded; use a "
                                        "text query, or load a checkpoint (or a folder converted with "
                                        "--with-audio-branch) that has it")
                self._encoder = build_audio_encoder(weights, self.description).to(device)
            return self._encoder

    def unload(self) -> None:
        with self._lock:
            self._encoder = None


def from_converted(folder: str | Path) -> AudioBranchSource:
    """The branch of a converted folder (``audio_encoder.safetensors``), if it was converted with it."""
    path = Path(folder) / AUDIO_FILE

    def read() -> dict[str, torch.Tensor]:
        if not path.exists():
            return {}
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AudioSepError(INVALID_CHECKPOINT, f"{path} is truncated or corrupt ({exc})") from None
        # The branch runs in float32 (a query is embedded once); an fp16 folder is widened here.
        return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in tensors.items()}

    return AudioBranchSource(read, f"converted folder {folder}")
