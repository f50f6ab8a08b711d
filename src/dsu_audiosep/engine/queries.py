"""One stem of a separation: what to listen for, where its sound goes, extract or remove.

A ``separate`` with ``queries`` (stems) runs several of these on one read of the mixture; a plain
``separate`` is a single one. ``Stem`` is immutable and small: ``what`` (how the model is asked:
text, example audio or an embedding, engine/query.py) is kept apart from ``output``/``mode`` (what
is done with the answer). Nothing here imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import DUPLICATE_OUTPUT, OUTPUT_ERROR, AudioSepError
from .query import Query


@dataclass(frozen=True)
class Stem:
    what: Query
    output: str
    mode: str = "extract"  # "extract" | "remove"

    @property
    def text(self) -> str | None:
        return self.what.text

    @classmethod
    def of_text(cls, text: str, output: str, mode: str = "extract") -> "Stem":
        return cls(Query.from_fields(text), output, mode)

    def describe(self) -> dict[str, Any]:
        """The per-query details a ``done`` reply carries (its file is added by the caller)."""
        details: dict[str, Any] = {"text": self.what.text, "mode": self.mode}
        if self.what.text is None:
            details["query"] = self.what.describe()
        return details


def output_key(path: str) -> str:
    """A path's identity for "two outputs name the same file" before any file exists."""
    return os.path.normcase(os.path.abspath(os.path.expanduser(path)))


def check_distinct_outputs(input_path: str | None, outputs: Iterable[str]) -> None:
    """No output twice in one command, none equal to the input (by name; the engine also checks
    the files themselves, which catches links)."""
    seen: set[str] = set()
    source = output_key(input_path) if input_path else None
    for out in outputs:
        key = output_key(out)
        if key == source:
            raise AudioSepError(OUTPUT_ERROR, f"output {out} is the input file; choose another output path")
        if key in seen:
            raise AudioSepError(DUPLICATE_OUTPUT, f"output {out} is named twice in one command; each output needs its own path")
        seen.add(key)
