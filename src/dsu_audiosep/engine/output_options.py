"""What an output file will be: container, sample format, rate and channels, and the downmix.

The container comes from the output extension: .wav, .flac, .ogg/.oga (Vorbis), .aiff/.aif
(libsndfile), and the lossy .mp3, .opus and .m4a (AAC), written through PyAV (audio_encode_av.py)
at ``output_bitrate`` kbit/s (auto: 192 MP3, 128 Opus, 192 AAC). ``output_subtype`` is a PCM
sample format: given with a lossy output it is refused (INVALID_FIELD) rather than ignored.
Lossy codecs code only some rates: the output is written at the nearest one at or above the rate
asked for (Opus: 8/12/16/24/48 kHz, so 44.1 kHz becomes 48 kHz) and the job's warnings say so.
Sample formats: PCM_16 (default), PCM_24, FLOAT. FLAC cannot store float samples: FLOAT with
.flac is refused with INVALID_FIELD (silently writing 24-bit integers would clip values above
full scale without the user having chosen it). Ogg/Vorbis is lossy and has no sample format:
the option is ignored there and the file is Vorbis, clipped like PCM.
Limits checked before opening: FLAC holds 1..8 channels up to 655350 Hz; Ogg/Vorbis up to
200 kHz (the bundled libvorbis crashes the whole process above that, measured) - both refused
with INVALID_FIELD.

Channels: ``"input"`` keeps the channel count. ``"stereo"`` writes two channels: mono is
duplicated, stereo kept, and more channels are downmixed with the usual coefficients for the
standard WAVE channel order (front left/right at 1, centre and surrounds at -3 dB to their
side or both sides, LFE dropped), each output row normalised so that its coefficients sum to 1,
which means the downmix itself can never clip. Downmixing before separating is cheaper (fewer
channels to separate) and gives a comparable result; the engine chooses where to call it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dsu_audiosep.errors import INVALID_FIELD, AudioSepError

from ..options import BY_NAME, OUTPUT_SR_RANGE

OUTPUT_SR_MAX = OUTPUT_SR_RANGE[1]  # lossy codecs take any rate asked for: encoder_samplerate maps it
from .audio_read import PathLike

__all__ = [
    "OUTPUT_FORMATS", "LOSSY_SUBTYPES", "DEFAULT_KBPS", "is_lossy", "encoder_samplerate", "resolved_kbps", "OutputOptions", "output_format_for", "check_format_limits", "container_subtype",
    "map_channels", "output_channel_count",
]

OUTPUT_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".aiff": "AIFF", ".aif": "AIFF",
                  ".mp3": "MP3", ".opus": "OPUS", ".m4a": "M4A"}
# Lossy outputs written by PyAV: format -> the codec named as the file's subtype
LOSSY_SUBTYPES = {"MP3": "MP3", "OPUS": "OPUS", "M4A": "AAC"}
DEFAULT_KBPS = {"MP3": 192, "OPUS": 128, "M4A": 192}
# Rates each codec codes (MPEG audio 1/2/2.5; Opus; AAC's sampling-frequency table)
_LOSSY_RATES = {
    "MP3": (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
    "OPUS": (8000, 12000, 16000, 24000, 48000),
    "M4A": (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000),
}
_MAX_KBPS = {"MP3": 320, "OPUS": 510, "M4A": 512}


def is_lossy(fmt: str) -> bool:
    return fmt in LOSSY_SUBTYPES


def encoder_samplerate(fmt: str, samplerate: int) -> int:
    """The rate a file of ``fmt`` is written at for ``samplerate``: itself for PCM containers and
    when the codec codes it, else the next higher rate the codec has (the highest above them)."""
    rates = _LOSSY_RATES.get(fmt)
    if rates is None:
        return int(samplerate)
    return next((r for r in rates if r >= samplerate), rates[-1])


def resolved_kbps(fmt: str, bitrate: int | str, path: str) -> int:
    """``output_bitrate`` for a lossy format: "auto" is the format's default; beyond the codec's
    highest bitrate is INVALID_FIELD."""
    if bitrate == "auto":
        return DEFAULT_KBPS[fmt]
    if int(bitrate) > _MAX_KBPS[fmt]:
        raise AudioSepError(INVALID_FIELD, f"output '{path}': {LOSSY_SUBTYPES[fmt]} goes up to {_MAX_KBPS[fmt]} "
                            f"kbit/s, not {bitrate}; choose a lower output_bitrate")
    return int(bitrate)


def output_format_for(path: PathLike) -> str:
    """libsndfile container for an output path, from its extension (case-insensitive)."""
    p = os.fsdecode(os.fspath(path))
    ext = os.path.splitext(p)[1].lower()
    fmt = OUTPUT_FORMATS.get(ext)
    if fmt is None:
        shown = f"'{ext}'" if ext else "no extension"
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{p}' has {shown}; the output type comes from the extension: use one of "
            + ", ".join(sorted(OUTPUT_FORMATS)),
        )
    return fmt


# Limits libsndfile enforces (FLAC) or, worse, crashes on (libvorbis segfaults above 200 kHz with
# the bundled libsndfile 1.2.2, measured): checked before opening anything.
_FORMAT_LIMITS = {"FLAC": (8, 655350), "OGG": (255, 200000), "MP3": (2, OUTPUT_SR_MAX),
                  "OPUS": (8, OUTPUT_SR_MAX), "M4A": (8, OUTPUT_SR_MAX)}


def check_format_limits(fmt: str, samplerate: int, channels: int, path: str) -> None:
    """Refuse a channel count or rate the container cannot hold (INVALID_FIELD)."""
    if fmt not in _FORMAT_LIMITS:
        return
    max_ch, max_sr = _FORMAT_LIMITS[fmt]
    if channels > max_ch:
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': {fmt} holds at most {max_ch} channels, not {channels}; use "
            "output_channels \"stereo\" or a .wav output",
        )
    if samplerate > max_sr:
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': {fmt} supports sample rates up to {max_sr} Hz, not {samplerate}; "
            "choose a lower output_sr or a .wav output",
        )


def container_subtype(fmt: str, subtype: str, path: str) -> str:
    """The libsndfile subtype actually written for a requested one in this container (for a
    lossy output: its codec; whether a subtype was given at all is OutputOptions' check)."""
    if fmt in LOSSY_SUBTYPES:
        return LOSSY_SUBTYPES[fmt]
    if fmt == "OGG":
        return "VORBIS"  # lossy: the requested sample format does not apply
    if fmt == "FLAC" and subtype == "FLOAT":
        raise AudioSepError(
            INVALID_FIELD,
            f"output '{path}': FLAC cannot store 32-bit float samples; choose output_subtype "
            "PCM_16 or PCM_24, or a .wav/.aiff output for FLOAT",
        )
    return subtype


@dataclass
class OutputOptions:
    """How separated audio is written. ``validate()`` normalises aliases in place and returns self."""

    samplerate: int | str = BY_NAME["output_sr"].default  # Hz, or "input" for the input's rate
    subtype: str = BY_NAME["output_subtype"].default  # "PCM_16" | "PCM_24" | "FLOAT" (or an alias)
    channels: str = BY_NAME["output_channels"].default  # "stereo" | "input"
    bitrate: int | str = BY_NAME["output_bitrate"].default  # kbit/s of a lossy output, or "auto"
    # Whether ``subtype`` was chosen by the user (a lossy output then refuses it) or is the default.
    subtype_given: bool = False

    @classmethod
    def for_job(cls, samplerate: int | str, subtype: str | None, channels: str,
                bitrate: int | str = "auto") -> "OutputOptions":
        """A job's options, where ``subtype`` None means "not given"."""
        return cls(samplerate, subtype if subtype is not None else BY_NAME["output_subtype"].default, channels,
                   bitrate, subtype_given=subtype is not None)

    def validate(self) -> "OutputOptions":
        """Each value checked and made canonical by its setting in the options table."""
        self.samplerate = BY_NAME["output_sr"].from_python(self.samplerate)
        self.subtype = BY_NAME["output_subtype"].from_python(self.subtype)
        self.channels = BY_NAME["output_channels"].from_python(self.channels)
        self.bitrate = BY_NAME["output_bitrate"].from_python(self.bitrate)
        return self

    def check_for(self, fmt: str, path: str) -> None:
        """Refuse a chosen sample format for a lossy output: it has none, and ignoring the
        choice would hide a mistake (a .mp3 where a 24-bit .wav was meant)."""
        if self.subtype_given and fmt in LOSSY_SUBTYPES:
            raise AudioSepError(
                INVALID_FIELD,
                f"output '{path}' is {LOSSY_SUBTYPES[fmt]} (lossy): output_subtype ({self.subtype}) applies to "
                ".wav/.flac/.aiff outputs only; leave it out, or set output_bitrate for the quality",
            )

    def resolved_samplerate(self, input_samplerate: int) -> int:
        return int(input_samplerate) if self.samplerate == "input" else int(self.samplerate)

    def resolved_channels(self, input_channels: int) -> int:
        return output_channel_count(input_channels, self.channels)


def output_channel_count(input_channels: int, mode: str) -> int:
    return int(input_channels) if mode == "input" else 2


_C = float(np.sqrt(0.5))  # -3 dB

# Stereo downmix rows (left, right) for the standard WAVE channel orders; LFE gets 0.
_DOWNMIX = {
    3: ([1, 0, _C], [0, 1, _C]),                                            # FL FR FC
    4: ([1, 0, _C, 0], [0, 1, 0, _C]),                                      # FL FR BL BR (quad)
    5: ([1, 0, _C, _C, 0], [0, 1, _C, 0, _C]),                              # FL FR FC BL BR
    6: ([1, 0, _C, 0, _C, 0], [0, 1, _C, 0, 0, _C]),                        # 5.1
    7: ([1, 0, _C, 0, _C, _C, 0], [0, 1, _C, 0, _C, 0, _C]),                # 6.1: ... BC SL SR
    8: ([1, 0, _C, 0, _C, 0, _C, 0], [0, 1, _C, 0, 0, _C, 0, _C]),          # 7.1: ... BL BR SL SR
}


def _downmix_matrix(n: int) -> np.ndarray:
    if n in _DOWNMIX:
        m = np.array(_DOWNMIX[n], dtype=np.float64)
    else:  # unknown layout: first two are left/right, the rest go to both sides at -3 dB
        m = np.full((2, n), _C)
        m[:, :2] = [[1, 0], [0, 1]]
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def map_channels(x: np.ndarray, mode: str) -> np.ndarray:
    """Apply the channel rule to ``x`` [channels, n]: "input" keeps it, "stereo" gives 2 channels."""
    if mode == "input":
        return x
    if mode != "stereo":
        raise AudioSepError(INVALID_FIELD, f"output_channels must be \"stereo\" or \"input\", got {mode!r}")
    c = x.shape[0]
    if c == 2:
        return x
    if c == 1:
        return np.concatenate([x, x], axis=0)
    return _downmix_matrix(c) @ np.asarray(x, dtype=np.float32)
