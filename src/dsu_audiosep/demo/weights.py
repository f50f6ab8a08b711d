"""Deterministic synthetic weights in the real checkpoint formats.

Nobody here has the released AudioSep weights, so the loaders are exercised on files that have the
real key names, shapes and containers but weights drawn from a fixed, documented scheme (the one
``shared/fixtures/README.md`` section 2 describes, which the parity fixtures were produced with).
The same files serve the demo: they are untrained and separate nothing meaningful.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable, Mapping

import torch

# Constructor-valued keys: constants of the architecture, never drawn at random.
NATURAL_SUFFIXES = (
    ".stft.conv_real.weight",
    ".stft.conv_imag.weight",
    ".istft.conv_real.weight",
    ".istft.conv_imag.weight",
    ".istft.ola_window",
    ".stft.window",
    ".istft.window",
    "logmel_extractor.melW",
    ".attn_mask",
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}


def seed_string(key: str) -> str:
    """CLAP tensors are seeded by their CLAP-level name, so both file kinds hold identical copies."""
    for prefix in ("query_encoder.model.", "module."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def synthetic_tensor(
    key: str,
    shape: Iterable[int],
    dtype: str | torch.dtype = "float32",
    natural: Callable[[str], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """One tensor of the scheme; ``natural(key)`` supplies constructor values (None: zeros)."""
    shape = tuple(int(s) for s in shape)
    dt = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if key.endswith(NATURAL_SUFFIXES) or not dt.is_floating_point and not key.endswith("num_batches_tracked"):
        value = natural(key) if natural is not None else None
        if value is None:
            value = torch.zeros(shape, dtype=dt)
        return value.to(dt).reshape(shape).clone()
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0, dtype=torch.int64)
    if len(shape) == 0:
        return torch.tensor(math.log(1 / 0.07), dtype=dt)
    g = torch.Generator()
    g.manual_seed(zlib.crc32(seed_string(key).encode("utf-8")))
    if key.endswith("running_mean"):
        t = 0.02 * torch.randn(shape, generator=g)
    elif key.endswith("running_var"):
        t = 1 + 0.1 * torch.rand(shape, generator=g)
    elif len(shape) >= 2:
        t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    elif key.endswith(".weight"):
        t = 1 + 0.02 * torch.randn(shape, generator=g)
    elif key.endswith(".bias"):
        t = 0.02 * torch.randn(shape, generator=g)
    else:
        raise ValueError(f"the synthetic weight scheme has no rule for {key!r}")
    return t.to(dt)


def synthetic_state_dict(
    schema: Iterable[tuple[str, Iterable[int], str | torch.dtype]],
    natural: Callable[[str], torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """``schema`` is (key, shape, dtype) in file order, e.g. from a model's state_dict or a manifest."""
    return {k: synthetic_tensor(k, s, d, natural) for k, s, d in schema}


def schema_of(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[tuple[str, tuple, torch.dtype]]:
    return [(prefix + k, tuple(v.shape), v.dtype) for k, v in state_dict.items()]
