"""One query of a separation: what to listen for, where its sound goes, extract or remove.

A ``separate`` with ``queries`` (stems) runs several of these on one read of the mixture; a plain
``separate`` is a single one. ``Query`` is immutable and small: ``what`` (how the model is asked)
is kept apart from ``output``/``mode`` (what is done with the answer), so other kinds of query
(an audio clip, a ready embedding) add fields to ``what`` and one branch to ``condition``.
Nothing here imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import DUPLICATE_OUTPUT, OUTPUT_ERROR, AudioSepError


@dataclass(frozen=True)
class QueryWhat:
    """How the model is asked: today a text description."""

    text: str

    @property
    def label(self) -> str:
        """A short human name for the query (file names, manifests, replies)."""
        return self.text


@dataclass(frozen=True)
class Query:
    what: QueryWhat
    output: str
    mode: str = "extract"  # "extract" | "remove"

    @property
    def text(self) -> str:
        return self.what.text

    @classmethod
    def of_text(cls, text: str, output: str, mode: str = "extract") -> "Query":
        return cls(QueryWhat(text), output, mode)

    def describe(self) -> dict[str, Any]:
        """The per-query details a ``done`` reply carries (its file is added by the caller)."""
        return {"text": self.what.text, "mode": self.mode}


def condition(model: Any, what: QueryWhat) -> Any:
    """The model's conditioning vector for one query."""
    return model.embed_text(what.text)


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
