"""Text query path: tokenizer ids, RoBERTa/CLAP parity, caching, validation and file errors.

Oracles:
- the parity fixtures made by the original implementation (transformers 4.30.2, slow tokenizer);
- transformers 5.24 (test-only dependency): ``RobertaTokenizer`` and ``RobertaModel``;
- ``slow_roberta_ids`` below, an independent pure-Python rendering of the slow tokenizer's
  algorithm (special-token split, ``<mask>`` lstrip, GPT-2 regex, byte map, rank-ordered BPE),
  because transformers 5 no longer ships the slow class the original ran.
"""
from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsu_audiosep.errors import FILE_NOT_FOUND, INVALID_CHECKPOINT, INVALID_TEXT, AudioSepError
from dsu_audiosep.model.text import (
    MAX_TOKENS,
    OPTIONAL_ROBERTA_KEYS,
    SPECIAL_TOKENS,
    RobertaConfig,
    RobertaEncoder,
    TextEncoder,
    Tokenizer,
    drop_optional_roberta_keys,
    build_text_encoder,
    roberta_position_ids,
    validate_text,
)
from dsu_audiosep.demo.weights import schema_of, synthetic_state_dict

import dsu_audiosep

from conftest import FIXTURES

# Shipped copy of the fixtures' tiny vocabulary (roberta-base sizes in config.json): tokenizer tests
# need no fixtures folder.
VOCAB_DIR = Path(dsu_audiosep.__file__).parent / "assets" / "demo_tokenizer"

needs_fixtures = pytest.mark.usefixtures("fixtures_dir")  # fails, never skips, when they are missing

torch.set_num_threads(min(2, torch.get_num_threads()))


# ------------------------------------------------------------------------------------------------
# Independent slow-tokenizer oracle


def _byte_to_char() -> dict[int, str]:
    # GPT-2's reversible map: printable Latin-1 bytes stand for themselves, the rest move to 256+.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=None)
def _oracle_tables(vocab_dir: Path):
    regex = pytest.importorskip("regex")  # installed with transformers

    vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (vocab_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(line for line in lines if line)}
    words = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    specials = regex.compile("|".join(regex.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))
    return vocab, ranks, words, specials, _byte_to_char()


def _bpe(symbols: list[str], ranks: dict) -> list[str]:
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def slow_roberta_ids(text: str, vocab_dir: Path = VOCAB_DIR, max_length: int = 512) -> list[int]:
    vocab, ranks, words, specials, byte_char = _oracle_tables(vocab_dir)
    pieces, last = [], 0
    for m in specials.finditer(text):
        pieces += [text[last:m.start()], m.group()]
        last = m.end()
    pieces.append(text[last:])
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:  # a special token
            ids.append(vocab[piece])
            continue
        if i + 1 < len(pieces) and pieces[i + 1] == "<mask>":
            piece = piece.rstrip()  # the slow class gives <mask> lstrip=True
        for w in words.findall(piece):
            for t in _bpe([byte_char[b] for b in w.encode("utf-8")], ranks):
                ids.append(vocab.get(t, vocab["<unk>"]))
    return [vocab["<s>"], *ids[: max_length - 2], vocab["</s>"]]


# ------------------------------------------------------------------------------------------------
# Tokenizer


TRICKY = [
    "", " ", "  ", "vocals", "a dog barking", "  leading and trailing  ", "\ttab\tseparated\t",
    "line\nbreaks\r\nand\rreturns\n\n", "\x00\x01\x02\x07\x1b[31mred\x1b[0m", "\x1c\x1d\x1e\x1f a\x1fb",
    "\x7f\x80\x85\x9f\xa0\xad", "nbsp\xa0here\u2028there\u3000ideographic", "zero\u200bwidth\u200d\ufeff",
    "héllo wörld ça va", "e\u0301 combining", "ｆｕｌｌｗｉｄｔｈ", "Ελληνικά κείμενα", "русский текст",
    "عربي نص", "עברית", "हिन्दी पाठ", "狗在叫 猫在喵喵叫", "日本語のテキスト", "한국어 텍스트",
    "🐶 barking 🎸 guitar 🥁", "👩‍👩‍👧‍👦 family", "🇫🇷 flag", "\U0001F600" * 40, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "it's they're we'll I'd you've I'm can't", "'S 'T 'RE", "123 4567 3.14 ١٢٣ ⅷ ²",
    "a <s> b </s> c", "<s><pad></s><unk><mask>", "<<s>>", "</s", "<mask", "a<mask> b", "a  <mask>",
    " <mask>", "\t<mask>\x1c<mask>", "<s> <mask>", "x <mask><mask> y", "<MASK> <Pad>",
    "Harmonica and PIANO!", "punctuation!!! ??? ... --- ***", "mixed123abc_def-ghi",
    "a" * 700, "x y " * 400, "word " * 2000, "é" * 600, "🎸" * 300, " " * 1000, "\n" * 600,
    ("The quick brown fox jumps over the lazy dog. " * 230)[:10000],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(VOCAB_DIR)


@pytest.fixture(scope="module")
def hf_slow_like():
    """transformers' tokenizer with the special-token settings the slow class used (<mask> lstrip)."""
    from tokenizers import AddedToken

    transformers = pytest.importorskip("transformers")
    return transformers.RobertaTokenizer.from_pretrained(
        str(VOCAB_DIR), mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, special=True))


@pytest.fixture(scope="module")
def hf_default():
    transformers = pytest.importorskip("transformers")
    return transformers.RobertaTokenizer.from_pretrained(str(VOCAB_DIR))


def _hf_ids(hf, text: str) -> list[int]:
    return hf(text, truncation=True, max_length=MAX_TOKENS)["input_ids"]


def _hf_strips_like_slow(text: str) -> bool:
    # tokenizers' lstrip stops at U+001C..U+001F, Python's str.rstrip (the slow class) does not.
    return re.search(r"[\x1c-\x1f]\s*<mask>", text) is None


@pytest.mark.numerics
@needs_fixtures
def test_tokenizer_matches_fixture_exactly(tokenizer):
    ref = np.load(FIXTURES / "public" / "tokenizer_check.npz")
    strings = json.loads((FIXTURES / "public" / "tokenizer_check.json").read_text())["strings"]
    assert len(strings) == len(ref["lengths"]) == 6
    for s, row, n in zip(strings, ref["input_ids"], ref["lengths"]):
        assert tokenizer.encode(s) == row[:n].tolist(), s
    # The fixture's vocabulary is the one the package ships.
    fixture_tok = Tokenizer.from_dir(FIXTURES / "roberta_tiny_vocab")
    assert [fixture_tok.encode(s) for s in strings] == [tokenizer.encode(s) for s in strings]


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tokenizer_matches_slow_algorithm_and_transformers(tokenizer, hf_slow_like, hf_default, text):
    ours = tokenizer.encode(text)
    assert ours == slow_roberta_ids(text)
    if _hf_strips_like_slow(text):
        assert ours == _hf_ids(hf_slow_like, text)
    if "<mask>" not in text:
        # Loaded from the folder as-is, transformers 5 gives <mask> no lstrip; elsewhere it agrees.
        assert ours == _hf_ids(hf_default, text)
    assert ours[0] == 0 and ours[-1] == 2 and len(ours) <= MAX_TOKENS


def test_tokenizer_mask_takes_the_space_before_it(tokenizer):
    # What the slow RobertaTokenizer (the original) does; 5.x loaded without settings does not.
    assert tokenizer.encode("a  <mask>") == tokenizer.encode("a<mask>") == [0, 68, 704, 2]
    # Python's whitespace, as str.rstrip in the slow class, includes U+001C..U+001F.
    assert tokenizer.encode("x\x1c\x1d<mask>") == tokenizer.encode("x<mask>")
    # Other special tokens strip nothing around them.
    assert tokenizer.encode("<s> x") == slow_roberta_ids("<s> x") != tokenizer.encode("<s>x")


def test_tokenizer_truncates_like_the_original(tokenizer):
    text = ("pigeons are cooing in the background " * 300)[:10000]
    ids = tokenizer.encode(text)
    assert len(ids) == MAX_TOKENS and ids[0] == 0 and ids[-1] == 2
    # Truncation keeps the beginning: the first 510 text ids of the untruncated encoding.
    full = Tokenizer.from_dir(VOCAB_DIR, max_length=100_000).encode(text)
    assert len(full) > MAX_TOKENS
    assert ids[1:-1] == full[1:MAX_TOKENS - 1]
    assert tokenizer.encode("") == [0, 2]


_pieces = st.one_of(
    st.text(max_size=12),
    st.sampled_from([*SPECIAL_TOKENS, " ", "  ", "\t", "\n", "\x1c", "\xa0", "'s", "'ll", "🎸", "é", "1"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_pieces, max_size=12).map("".join))
def test_tokenizer_property_random_text(tokenizer, hf_slow_like, text):
    ours = tokenizer.encode(text)
    assert ours == slow_roberta_ids(text)
    if _hf_strips_like_slow(text):
        assert ours == _hf_ids(hf_slow_like, text)


def test_tokenizer_from_tokenizer_json_only(tokenizer, tmp_path, hf_slow_like):
    # A folder with only tokenizer.json (e.g. a converted model folder) gives the same ids.
    hf_slow_like.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    only_json = Tokenizer.from_dir(tmp_path)
    for s in TRICKY[:40]:
        assert only_json.encode(s) == tokenizer.encode(s), s
    # Both merges encodings of tokenizer.json: "a b" strings (older files) and [a, b] pairs.
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    data["model"]["merges"] = [" ".join(m) for m in merges] if isinstance(merges[0], list) else \
        [m.split(" ") for m in merges]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    other = Tokenizer.from_dir(tmp_path)
    assert [other.encode(s) for s in TRICKY[:40]] == [tokenizer.encode(s) for s in TRICKY[:40]]


# ------------------------------------------------------------------------------------------------
# Bad tokenizer / config files


def _copy_vocab(tmp_path: Path) -> Path:
    d = tmp_path / "roberta"
    shutil.copytree(VOCAB_DIR, d)
    return d


@contextmanager
def _expect(code: str, *fragments: str):
    """AudioSepError with this code whose message names every fragment (file names, fields)."""
    with pytest.raises(AudioSepError) as info:
        yield info
    assert info.value.code == code, info.value
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))


def test_missing_folder_and_files(tmp_path):
    with _expect(FILE_NOT_FOUND, "nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    d = _copy_vocab(tmp_path)
    (d / "merges.txt").unlink()
    with _expect(FILE_NOT_FOUND, "merges.txt"):
        Tokenizer.from_dir(d)
    (d / "vocab.json").unlink()
    with _expect(FILE_NOT_FOUND, "vocab.json", "merges.txt", "tokenizer.json"):
        Tokenizer.from_dir(d)
    with _expect(INVALID_CHECKPOINT, "is a file"):
        Tokenizer.from_dir(d / "config.json")
    with _expect(FILE_NOT_FOUND, "no_such_dir"):
        RobertaConfig.from_dir(tmp_path / "no_such_dir")
    (tmp_path / "empty").mkdir()
    with _expect(FILE_NOT_FOUND, "config.json"):
        RobertaConfig.from_dir(tmp_path / "empty")


@pytest.mark.parametrize("name,content,fragments", [
    ("vocab.json", "{not json", ["vocab.json", "not valid JSON", "line 1"]),
    ("vocab.json", "[1, 2]", ["vocab.json", "JSON object"]),
    ("vocab.json", '{"a": 0, "b": 1}', ["vocab.json", "<s>", "missing"]),
    ("vocab.json", '{"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": "x"}', ["vocab.json", "<unk>"]),
    ("merges.txt", "#version: 0.2\ni n\nthree parts here\n", ["merges.txt", "rule 3"]),
    ("merges.txt", "#version: 0.2\n\u4e00 \u4e01\n", ["do not fit"]),
    ("merges.txt", b"#version: 0.2\n\xff\xfe n\n", ["merges.txt", "not UTF-8"]),
    ("tokenizer.json", '{"model": {"type": "WordPiece", "vocab": {}}}', ["tokenizer.json", "BPE"]),
    ("tokenizer.json", '{"model": {"type": "BPE", "vocab": {"<s>": 0}}}', ["tokenizer.json", "merges"]),
    ("tokenizer.json", "\x00garbage", ["tokenizer.json", "not valid JSON"]),
])
def test_corrupt_tokenizer_files(tmp_path, name, content, fragments):
    d = _copy_vocab(tmp_path)
    if name == "tokenizer.json":  # only read when vocab.json/merges.txt are absent
        (d / "vocab.json").unlink()
        (d / "merges.txt").unlink()
    target = d / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with _expect(INVALID_CHECKPOINT, *fragments):
        Tokenizer.from_dir(d)


@pytest.mark.parametrize("patch,fragment", [
    ({"model_type": "bert"}, "model_type"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_size": "768"}, "hidden_size"),
    ({"num_attention_heads": 7}, "num_attention_heads"),
    ({"max_position_embeddings": 2}, "max_position_embeddings"),
    ({"type_vocab_size": 0}, "type_vocab_size"),
    ({"layer_norm_eps": -1}, "layer_norm_eps"),
])
def test_bad_config(tmp_path, patch, fragment):
    d = _copy_vocab(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(patch)
    (d / "config.json").write_text(json.dumps(cfg))
    with _expect(INVALID_CHECKPOINT, "config.json", fragment):
        RobertaConfig.from_dir(d)


def test_config_of_the_shipped_folder_is_roberta_base():
    cfg = RobertaConfig.from_dir(VOCAB_DIR)
    assert cfg == RobertaConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (768, 12, 12, 3072)
    assert (cfg.max_position_embeddings, cfg.type_vocab_size, cfg.layer_norm_eps, cfg.pad_token_id) == (514, 1, 1e-5, 1)
    assert cfg.max_tokens == 512
    assert RobertaConfig.from_dict(cfg.to_dict()) == cfg


def test_tokenizer_and_config_must_agree():
    tok = Tokenizer.from_dir(VOCAB_DIR)
    with _expect(INVALID_CHECKPOINT, "vocab_size"):
        TextEncoder(RobertaConfig(vocab_size=500, num_hidden_layers=1), tok, device="meta")
    with _expect(INVALID_CHECKPOINT, "pad_token_id"):
        TextEncoder(RobertaConfig(pad_token_id=0, num_hidden_layers=1), tok, device="meta")


# ------------------------------------------------------------------------------------------------
# Text validation


@pytest.mark.parametrize("bad", [None, 3, b"dog", ["dog"]])
def test_text_must_be_a_string(bad):
    with _expect(INVALID_TEXT, "string"):
        validate_text(bad)


@pytest.mark.parametrize("bad", ["", " ", "\t\n  \r", "\u3000\xa0"])
def test_empty_text_is_rejected(bad):
    with _expect(INVALID_TEXT, "empty"):
        validate_text(bad)


def test_unpaired_surrogate_is_rejected():
    # json.loads('"\\ud800"') produces such a string; tokenizers would raise a TypeError.
    with _expect(INVALID_TEXT, "position 3"):
        validate_text(json.loads('"dog\\ud800"'))


def test_control_characters_are_allowed():
    assert validate_text("\x07dog\x00") == "\x07dog\x00"


# ------------------------------------------------------------------------------------------------
# Model: keys, parity with the original and with transformers


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """TextEncoder with the deterministic synthetic weights (seeded by CLAP-level key names)."""
    enc = build_text_encoder(VOCAB_DIR)  # meta device: nothing initialised
    sd = synthetic_state_dict(schema_of(enc.state_dict()))
    enc.load_state_dict(sd, strict=True, assign=True)
    return enc.eval()


@pytest.fixture(scope="module")
def hf_model(encoder):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RobertaConfig.from_pretrained(str(VOCAB_DIR))
    cfg._attn_implementation = "sdpa"
    model = transformers.RobertaModel(cfg).eval()
    result = model.load_state_dict(encoder.text_branch.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


@needs_fixtures
def test_state_dict_keys_match_the_clap_checkpoint(encoder):
    manifest = json.loads((FIXTURES / "manifest_clap_pt.json").read_text())
    want = [(e["key"], e["shape"]) for e in manifest["entries"]
            if e["key"].startswith(("text_branch.", "text_projection."))]
    got = [(k, list(v.shape)) for k, v in encoder.state_dict().items()]
    # The manifest comes from transformers 4.30.2, whose first text_branch key is position_ids.
    assert want[0][0] == "text_branch.embeddings.position_ids"
    assert got == want[1:]
    stripped = drop_optional_roberta_keys(dict(want), prefix="text_branch.")
    assert list(stripped) == [k for k, _ in got]
    assert OPTIONAL_ROBERTA_KEYS >= {"embeddings.position_ids"}


def test_state_dict_keys_match_transformers(encoder, hf_model):
    ours = encoder.text_branch.state_dict()
    theirs = hf_model.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].shape == theirs[k].shape, k
    assert set(dict(encoder.text_projection.named_parameters())) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.numerics
@needs_fixtures
def test_embedding_parity_with_the_original(encoder):
    ref = np.load(FIXTURES / "public" / "text_case1.npz")
    ids = torch.from_numpy(ref["input_ids"]).long()
    assert ids.tolist() == [0, 10, 20, 2]
    with torch.inference_mode():
        ours = encoder(ids[None])[0].numpy()
        # The original's own way: two copies padded to 512 with <pad>, mask 0 on padding.
        padded = torch.full((2, MAX_TOKENS), 1, dtype=torch.int64)
        padded[:, :4] = ids
        mask = (torch.arange(MAX_TOKENS) < 4).long().expand(2, -1)
        ours512 = encoder(padded, mask)[0].numpy()
    assert np.abs(ours - ref["embedding_nopad"]).max() < 1e-5
    assert np.abs(ours - ref["embedding_pad512"]).max() < 1e-5
    assert np.abs(ours512 - ref["embedding_pad512"]).max() < 1e-5
    assert abs(np.linalg.norm(ours) - 1) < 1e-6


PARITY_TEXTS = ["vocals", "a dog barking", "pigeons are cooing in the background",
                "Harmonica and PIANO! 🎹", "  crowd\tcheering\n", "狗叫声 <mask> end"]


@pytest.mark.numerics
def test_roberta_matches_transformers(encoder, hf_model):
    tok = encoder.tokenizer
    for text in PARITY_TEXTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.inference_mode():
            ours = encoder.text_branch(ids)
            ours_hidden = encoder.text_branch.last_hidden_state(ids)
            ref = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert (ours - ref.pooler_output).abs().max() < 1e-5, text
        assert (ours_hidden - ref.last_hidden_state).abs().max() < 1e-4, text


def test_roberta_matches_transformers_at_full_length(encoder, hf_model):
    ids = torch.tensor([encoder.tokenizer.encode("rain on a tin roof " * 200)])
    assert ids.shape[1] == MAX_TOKENS  # uses the last position embedding (index 513)
    with torch.inference_mode():
        ours = encoder.text_branch(ids)
        ref = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.numerics
def test_padded_batch_equals_single_unpadded(encoder, hf_model):
    texts = ["dog", "a dog barking in the distance while rain falls"]
    ids, mask = encoder.tokenize(texts)
    assert mask is not None and ids.shape[0] == 2
    assert ids[0, mask[0].sum():].eq(1).all()  # right-padded with <pad>
    with torch.inference_mode():
        batch = encoder.text_branch(ids, mask)
        singles = torch.cat([encoder.text_branch(torch.tensor([encoder.tokenizer.encode(t)])) for t in texts])
        ref = hf_model(input_ids=ids, attention_mask=mask).pooler_output
    assert (batch - singles).abs().max() < 1e-5
    assert (batch - ref).abs().max() < 1e-5
    emb = encoder.embed(texts)
    assert emb.shape == (2, 512)
    assert (emb[0] - encoder.embed_one(texts[0])).abs().max() < 1e-5
    assert (emb[1] - encoder.embed_one(texts[1])).abs().max() < 1e-5


def test_position_ids_like_roberta():
    ids = torch.tensor([[0, 10, 20, 2, 1, 1], [0, 5, 2, 1, 1, 1]])
    assert roberta_position_ids(ids, 1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]


def test_too_many_tokens_is_an_error(encoder):
    with pytest.raises(ValueError, match="at most 512"):
        encoder.text_branch(torch.zeros(1, 513, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# TextEncoder API: embed, cache, long text


def test_embed_one_caches_by_exact_string(encoder):
    calls = []
    handle = encoder.text_branch.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    try:
        encoder.clear_cache()
        a = encoder.embed_one("dog")
        b = encoder.embed_one("dog")
        assert len(calls) == 1 and torch.equal(a, b)
        c = encoder.embed_one("dog ")  # a different string, a different token sequence
        assert len(calls) == 2 and not torch.equal(a, c)
    finally:
        handle.remove()
    assert a.shape == (512,) and a.dtype == torch.float32
    assert abs(float(a.norm()) - 1) < 1e-6
    assert not a.is_inference()  # usable outside inference mode
    a.zero_()  # callers get copies: the cache is untouched
    assert torch.equal(encoder.embed_one("dog"), b)


def test_cache_is_lru_and_bounded(encoder):
    encoder.clear_cache()
    old = encoder.cache_size
    encoder.cache_size = 2
    try:
        for t in ["one", "two", "one", "three"]:
            encoder.embed_one(t)
        assert list(encoder._cache) == ["one", "three"]
    finally:
        encoder.cache_size = old
        encoder.clear_cache()


def test_cache_is_cleared_when_weights_change(encoder):
    before = encoder.embed_one("cat")
    assert "cat" in encoder._cache
    sd = encoder.state_dict()
    w = sd["text_projection.2.bias"].clone()
    encoder.load_state_dict({**sd, "text_projection.2.bias": w + 0.5})
    try:
        assert "cat" not in encoder._cache
        assert not torch.allclose(encoder.embed_one("cat"), before)
    finally:
        encoder.load_state_dict({**sd, "text_projection.2.bias": w})
    assert torch.allclose(encoder.embed_one("cat"), before, atol=1e-7)


def test_embed_validates_and_truncates(encoder):
    with _expect(INVALID_TEXT, "empty"):
        encoder.embed_one("   ")
    with _expect(INVALID_TEXT, "empty"):
        encoder.embed(["dog", ""])
    with pytest.raises(TypeError):
        encoder.embed("dog")
    long_text = ("birds singing at dawn " * 600)[:10000]
    emb = encoder.embed_one(long_text)
    ids = torch.tensor([encoder.tokenizer.encode(long_text)])
    assert ids.shape[1] == MAX_TOKENS
    with torch.inference_mode():
        ref = encoder(ids)[0]
    assert torch.equal(emb, ref)
    assert torch.isfinite(encoder.embed_one("\x00\x07\x1b beep")).all()


def test_optional_key_helper():
    sd = {"m.text_branch.embeddings.position_ids": 0, "m.text_branch.embeddings.word_embeddings.weight": 1}
    assert drop_optional_roberta_keys(sd, "m.text_branch.") == {"m.text_branch.embeddings.word_embeddings.weight": 1}


def test_plain_encoder_defaults_to_roberta_base():
    m = RobertaEncoder(device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert n == 124_645_632  # roberta-base with pooler
