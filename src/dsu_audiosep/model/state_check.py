"""Checking loaded tensors against the model's own: one error naming what is missing or misshapen."""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import INVALID_CHECKPOINT, AudioSepError


def check_tensors(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str, prefix: str = ""
) -> None:
    """Every expected key present with the expected shape, nothing unknown: else one clear error."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{prefix}{k} {tuple(given[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    wrong_dtype = [f"{prefix}{k} ({given[k].dtype})" for k in expected if k in given and not given[k].is_floating_point() and expected[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + ", ".join(prefix + k for k in missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unknown key(s): " + ", ".join(prefix + k for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: " + ", ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    if wrong_dtype:
        problems.append("non-float weights: " + ", ".join(wrong_dtype[:5]))
    if problems:
        raise AudioSepError(INVALID_CHECKPOINT, f"{source} does not match the AudioSep model: " + "; ".join(problems))
