"""The options table is the one place a setting is defined: the README's table, the protocol's
records, the policy file, the environment and the flags all come from it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dsu_audiosep import options
from dsu_audiosep.errors import AudioSepError
from dsu_audiosep.worker import policy
from dsu_audiosep.worker import protocol as P

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "dsu_audiosep"


def test_docs_table_is_the_generated_one():
    doc = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- settings table: begin -->\n(.*?)<!-- settings table: end -->", doc, re.S)
    assert found, "docs/settings.md lost its settings table markers"
    assert found.group(1) == options.markdown_table(), \
        "docs/settings.md's table is stale: python -m dsu_audiosep.options docs/settings.md"


@pytest.mark.parametrize("setting", options.SETTINGS, ids=lambda s: s.name)
def test_every_default_is_a_valid_value_of_its_setting(setting):
    if setting.default is not None:
        assert setting.from_json(setting.default) == setting.default
        assert setting.from_text(str(setting.default).lower() if isinstance(setting.default, bool) else str(setting.default)) \
            == setting.default


def test_records_and_layers_follow_the_table():
    assert [f for f in P.LoadModelArgs.__dataclass_fields__] == [s.name for s in options.for_command("load_model")]
    assert set(P.SeparateArgs.__dataclass_fields__) == {s.name for s in options.for_command("separate")}
    assert set(policy.DEFAULTS) == {s.name for s in options.WORKER_SETTINGS}
    env = {s.env: "1" for s in options.WORKER_SETTINGS if s.kind is options.COUNT}
    assert policy.read_env(env) == {s.name: 1 for s in options.WORKER_SETTINGS if s.kind is options.COUNT}


def test_json_is_strict_and_text_is_lenient():
    mmap = options.BY_NAME["mmap"]
    assert mmap.from_text("on") is True and mmap.from_text(0) is False
    with pytest.raises(AudioSepError) as err:
        mmap.from_json("on")
    assert err.value.code == "invalid_field" and '"mmap"' in err.value.message
    subtype = options.BY_NAME["output_subtype"]
    assert subtype.from_json("pcm24") == "PCM_24" and subtype.from_json("Float") == "FLOAT"
    rate = options.BY_NAME["output_sr"]
    assert rate.from_text("48000") == 48000 and rate.from_json(48000.0) == 48000 and rate.from_json("INPUT") == "input"
    for bad in ("48000", 999, 768001, True, 44100.5):
        with pytest.raises(AudioSepError):
            rate.from_json(bad)
    with pytest.raises(ValueError):
        options.BY_NAME["chunk_seconds"].from_text("0")


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


@pytest.mark.parametrize("module", ["worker/protocol.py", "worker/policy.py", "cli.py"])
def test_setting_names_are_spelled_only_in_the_table(module):
    spelled = set()
    for text in _string_constants(PACKAGE / module):
        for s in options.SETTINGS:
            # the name as a whole string or quoted in a message, its flag, its environment variable
            marks = [f'"{s.name}"', f"'{s.name}'", s.flag] + ([s.env] if s.env else [])
            if text == s.name or any(re.search(rf"{re.escape(m)}(?![\w-])", text) for m in marks):
                spelled.add((s.name, text[:60]))
    assert not spelled, f"{module} spells settings the table defines: {sorted(spelled)}"
