"""Text query path: RoBERTa tokenizer, RoBERTa-base encoder and the CLAP text projection.

Why not ``transformers``: importing it costs about 2.7 s on top of torch and it needs four workarounds
to freeze. Everything AudioSep uses of it is a byte-level BPE tokenizer (the ``tokenizers`` library
does the work) and a plain post-LayerNorm transformer, written here in plain torch with ``state_dict``
keys exactly those of ``transformers.RobertaModel``. The tests hold both against transformers and
against the original's fixtures.

Data flow: text -> ``Tokenizer.encode`` (``<s> ... </s>``, at most 512 ids) -> ``RobertaEncoder``
(pooler output: first token, dense, tanh) -> ``text_projection`` (768 -> 512 -> 512) -> L2 norm.
The original pads every query to 512 tokens; padding only to the real length gives the same
embedding within 3e-7 for a fraction of the work, so that is what ``TextEncoder.embed`` does.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tokenizers import AddedToken
from tokenizers import Tokenizer as _BPETokenizer
from tokenizers import pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import (
    FILE_NOT_FOUND,
    INVALID_CHECKPOINT,
    INVALID_TEXT,
    PERMISSION_DENIED,
    AudioSepError,
)
from .constants import CONDITION_SIZE

# The original tokenises with ``truncation=True, max_length=512``: 510 text ids plus <s> and </s>.
MAX_TOKENS = 512
BOS, PAD, EOS, UNK, MASK = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
SPECIAL_TOKENS = (BOS, PAD, EOS, UNK, MASK)
# The mask token may be absent from vocab.json: the slow tokenizer then appends it, as we do.
REQUIRED_VOCAB_TOKENS = (BOS, PAD, EOS, UNK)

# Keys that RoBERTa checkpoints may carry but ``RobertaEncoder`` does not have (relative to the
# encoder, i.e. after ``text_branch.``). transformers < 4.31 saved ``embeddings.position_ids``
# (= arange(514)) as a persistent buffer; RoBERTa derives positions from the input ids, so the
# value is never used and a loader may drop these keys without checking them.
OPTIONAL_ROBERTA_KEYS = frozenset({"embeddings.position_ids", "embeddings.token_type_ids"})

# The slow RobertaTokenizer (what the original ran) gives <mask> ``lstrip=True`` and strips the
# text before it with Python's ``str.rstrip``; ``tokenizers`` strips with Rust's whitespace
# definition, which lacks U+001C..U+001F. Removing the run ourselves makes both agree.
_WS_BEFORE_MASK = re.compile(r"\s+(?=" + re.escape(MASK) + ")")


def drop_optional_roberta_keys(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Copy of ``state_dict`` without ``prefix + k`` for every k in ``OPTIONAL_ROBERTA_KEYS``."""
    skip = {prefix + k for k in OPTIONAL_ROBERTA_KEYS}
    return {k: v for k, v in state_dict.items() if k not in skip}


# --------------------------------------------------------------------------------------------
# File helpers: every failure names the file and says what is wrong.


def _read_text_file(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AudioSepError(FILE_NOT_FOUND, f"{what} not found: {path}") from None
    except PermissionError:
        raise AudioSepError(PERMISSION_DENIED, f"cannot read {what} {path}: permission denied") from None
    except IsADirectoryError:
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {path} is a folder, expected a file") from None
    except UnicodeDecodeError as e:
        raise AudioSepError(INVALID_CHECKPOINT, f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise AudioSepError(INVALID_CHECKPOINT, f"cannot read {what} {path}: {e.strerror or e}") from None


def _read_json(path: Path, what: str) -> Any:
    text = _read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AudioSepError(
            INVALID_CHECKPOINT, f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None


def _check_vocab(vocab: Any, path: Path) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise AudioSepError(INVALID_CHECKPOINT, f"{path}: expected a JSON object mapping tokens to ids")
    for token, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise AudioSepError(INVALID_CHECKPOINT, f"{path}: token {token!r} has id {idx!r}, expected an integer >= 0")
    missing = [t for t in REQUIRED_VOCAB_TOKENS if t not in vocab]
    if missing:
        raise AudioSepError(
            INVALID_CHECKPOINT, f"{path}: not a RoBERTa vocabulary, special token(s) {', '.join(missing)} missing"
        )
    return vocab


def _parse_merges(lines: Iterable[Any], path: Path, first_line: int = 1) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for n, line in enumerate(lines, start=first_line):
        if isinstance(line, str):
            if not line or line.startswith("#version"):
                continue
            parts = line.split()
        elif isinstance(line, list):  # tokenizer.json since tokenizers 0.20 stores pairs as lists
            parts = line
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise AudioSepError(INVALID_CHECKPOINT, f"{path}: merge rule {n} is {line!r}, expected two tokens")
        merges.append((parts[0], parts[1]))
    return merges


# --------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """RoBERTa byte-level BPE, giving the ids of the slow ``transformers.RobertaTokenizer``.

    No prefix space, ``<s> ... </s>`` framing, at most ``max_length`` ids (text ids are cut from the
    end), and the special tokens are recognised inside the text (``"a <s> b"`` contains id 0).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 max_length: int = MAX_TOKENS, source: str = "<memory>"):
        self.source = source
        self.max_length = int(max_length)
        try:
            model = BPE(vocab=vocab, merges=list(merges), dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        except Exception as e:  # tokenizers reports merges whose parts are not in the vocabulary
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: vocabulary and merges do not fit together ({e})") from None
        tok = _BPETokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.add_special_tokens([
            AddedToken(t, lstrip=(t == MASK), rstrip=False, single_word=False, normalized=False, special=True)
            for t in SPECIAL_TOKENS
        ])
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)
        self.unk_id = tok.token_to_id(UNK)
        self.mask_id = tok.token_to_id(MASK)
        tok.post_processor = processors.RobertaProcessing(
            (EOS, self.eos_id), (BOS, self.bos_id), trim_offsets=True, add_prefix_space=False)
        tok.enable_truncation(max_length=self.max_length)
        tok.no_padding()
        self._tok = tok
        # Largest id + 1: what an embedding table must cover.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path, **kw: Any) -> "Tokenizer":
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = _check_vocab(_read_json(vocab_path, "tokenizer vocabulary"), vocab_path)
        merges = _parse_merges(_read_text_file(merges_path, "tokenizer merges").split("\n"), merges_path)
        return cls(vocab, merges, source=f"{vocab_path} + {merges_path}", **kw)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kw: Any) -> "Tokenizer":
        """Only the BPE vocabulary and merges are taken; the rest is fixed to RoBERTa's pipeline."""
        path = Path(path)
        data = _read_json(path, "tokenizer file")
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise AudioSepError(INVALID_CHECKPOINT, f"{path}: expected a byte-level BPE tokenizer (model type {kind!r})")
        merges = model.get("merges")
        if not isinstance(merges, list):
            raise AudioSepError(INVALID_CHECKPOINT, f"{path}: model.merges is missing or not a list")
        return cls(_check_vocab(model.get("vocab"), path), _parse_merges(merges, path), source=str(path), **kw)

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> "Tokenizer":
        """A roberta-base folder: vocab.json + merges.txt (what the slow tokenizer reads), else tokenizer.json."""
        path = Path(path)
        if not path.is_dir():
            if path.exists():
                raise AudioSepError(INVALID_CHECKPOINT, f"RoBERTa folder {path} is a file, expected a folder")
            raise AudioSepError(FILE_NOT_FOUND, f"RoBERTa tokenizer folder not found: {path}")
        vocab, merges, tj = path / "vocab.json", path / "merges.txt", path / "tokenizer.json"
        if vocab.exists() and merges.exists():
            return cls.from_files(vocab, merges, **kw)
        if tj.exists():
            return cls.from_tokenizer_json(tj, **kw)
        missing = [p.name for p in (vocab, merges) if not p.exists()]
        raise AudioSepError(
            FILE_NOT_FOUND, f"RoBERTa folder {path} has no {' or '.join(missing)} (and no tokenizer.json)")

    def encode(self, text: str) -> list[int]:
        """Ids of ``<s> text </s>``, cut to ``max_length``. ``text`` must be a valid Unicode str."""
        if MASK in text:
            text = _WS_BEFORE_MASK.sub("", text)
        return self._tok.encode(text).ids

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RobertaConfig:
    """The fields of a roberta ``config.json`` the encoder needs; defaults are roberta-base."""
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "RobertaConfig":
        if not isinstance(d, Mapping):
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: expected a JSON object")
        model_type = d.get("model_type", "roberta")
        if model_type != "roberta":
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: model_type is {model_type!r}, expected 'roberta'")
        # Anything but exact-erf GELU and absolute positions would be another network.
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: hidden_act {act!r} is not supported (expected 'gelu')")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: position_embedding_type {pos!r} is not supported")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.type == "float":  # annotations are strings here (postponed evaluation)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            else:  # pad_token_id may be 0; every size must be at least 1
                ok = isinstance(v, int) and not isinstance(v, bool) and v >= (0 if f.name == "pad_token_id" else 1)
            if not ok:
                raise AudioSepError(INVALID_CHECKPOINT, f"{source}: {f.name} is {v!r}, expected a positive number")
            values[f.name] = float(v) if f.type == "float" else v
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise AudioSepError(INVALID_CHECKPOINT,
                                f"{source}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                                f"{cfg.num_attention_heads}")
        if cfg.max_position_embeddings <= cfg.pad_token_id + 1:
            raise AudioSepError(INVALID_CHECKPOINT, f"{source}: max_position_embeddings is too small")
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RobertaConfig":
        path = Path(path)
        return cls.from_dict(_read_json(path, "RoBERTa config"), source=str(path))

    @classmethod
    def from_dir(cls, path: str | Path) -> "RobertaConfig":
        path = Path(path)
        if not path.is_dir():
            raise AudioSepError(FILE_NOT_FOUND, f"RoBERTa folder not found: {path}")
        return cls.from_json_file(path / "config.json")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "roberta", "hidden_act": "gelu", **asdict(self)}

    @property
    def max_tokens(self) -> int:
        # Positions start after the padding index, so padding_idx + 1 slots are never used by tokens.
        return self.max_position_embeddings - self.pad_token_id - 1


# --------------------------------------------------------------------------------------------
# RoBERTa encoder. Module and attribute names reproduce transformers' key names exactly
# (``attention.self.query`` etc.); nothing else about its class layout is copied.


def roberta_position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Real tokens get pad_id+1, pad_id+2, ... in order; padding tokens get pad_id."""
    real = input_ids.ne(pad_id).to(torch.int64)
    return torch.cumsum(real, dim=1) * real + pad_id


class _Embeddings(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, **factory)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, **factory)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size, **factory)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, **factory)
        self.pad_id = c.pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = roberta_position_ids(input_ids, self.pad_id)
        # Token type is always 0 for single sequences, so row 0 is broadcast.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size, **factory)
        self.key = nn.Linear(c.hidden_size, c.hidden_size, **factory)
        self.value = nn.Linear(c.hidden_size, c.hidden_size, **factory)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                           attn_mask=mask)
        return y.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """Projection, residual add, LayerNorm: RoBERTa's post-norm sublayer output."""

    def __init__(self, d_in: int, d_out: int, eps: float, **factory: Any):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out, **factory)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps, **factory)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.self = _SelfAttention(c, **factory)
        self.output = _DenseNorm(c.hidden_size, c.hidden_size, c.layer_norm_eps, **factory)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as roberta-base's "gelu"


class _Layer(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.attention = _Attention(c, **factory)
        self.intermediate = _Intermediate(c, **factory)
        self.output = _DenseNorm(c.intermediate_size, c.hidden_size, c.layer_norm_eps, **factory)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class _Stack(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c, **factory) for _ in range(c.num_hidden_layers))


class _Pooler(nn.Module):
    def __init__(self, c: RobertaConfig, **factory: Any):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, **factory)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class RobertaEncoder(nn.Module):
    """RoBERTa (no LM head); ``forward`` returns the pooler output [B, hidden].

    Pass ``device="meta"`` to build without initialising ~125 M parameters, then
    ``load_state_dict(sd, assign=True)``.
    """

    def __init__(self, config: RobertaConfig | None = None, *, device: torch.device | str | None = None):
        super().__init__()
        self.config = config = config or RobertaConfig()
        factory = {"device": device}
        self.embeddings = _Embeddings(config, **factory)
        self.encoder = _Stack(config, **factory)
        self.pooler = _Pooler(config, **factory)

    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids`` [B, L] int; ``attention_mask`` [B, L] (1 real, 0 padding) or None for no padding."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_tokens:
            raise ValueError(f"{input_ids.shape[1]} tokens, the model takes at most {self.config.max_tokens}")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # Boolean [B, 1, 1, L]: every query row may attend to the real keys of its sequence.
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pooler(self.last_hidden_state(input_ids, attention_mask))


# --------------------------------------------------------------------------------------------
# CLAP text branch


def validate_text(text: Any) -> str:
    """The query as given, or AudioSepError(INVALID_TEXT). Control characters are allowed."""
    if not isinstance(text, str):
        raise AudioSepError(INVALID_TEXT, f"the text query must be a string, got {type(text).__name__}")
    if not text.strip():
        raise AudioSepError(INVALID_TEXT, "the text query is empty; describe the sound to separate, e.g. \"speech\"")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Reachable from JSON ("\ud800"): a lone surrogate half cannot be tokenised.
        raise AudioSepError(INVALID_TEXT,
                            f"the text query contains an invalid character (unpaired surrogate at position {e.start})") from None
    return text


class TextEncoder(nn.Module):
    """CLAP's text branch: text -> L2-normalised [embed_dim] query embedding.

    State dict keys are ``text_branch.*`` (RoBERTa) and ``text_projection.{0,2}.*``, as in the CLAP
    model (checkpoints prefix them with ``module.`` or ``query_encoder.model.``).
    """

    def __init__(self, config: RobertaConfig | None = None, tokenizer: Tokenizer | None = None, *,
                 embed_dim: int = CONDITION_SIZE, cache_size: int = 256,
                 device: torch.device | str | None = None):
        super().__init__()
        config = config or RobertaConfig()
        factory = {"device": device}
        self.text_branch = RobertaEncoder(config, **factory)
        self.text_projection = nn.Sequential(
            nn.Linear(config.hidden_size, embed_dim, **factory),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim, **factory),
        )
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.tokenizer: Tokenizer | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        # New weights make cached embeddings stale (fires for loads through a parent module too).
        self.register_load_state_dict_post_hook(lambda module, _keys: module.clear_cache())

    @property
    def config(self) -> RobertaConfig:
        return self.text_branch.config

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        c = self.config
        if tokenizer.vocab_size > c.vocab_size:
            raise AudioSepError(INVALID_CHECKPOINT,
                                f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the RoBERTa "
                                f"config has vocab_size {c.vocab_size}")
        if tokenizer.pad_id != c.pad_token_id:
            raise AudioSepError(INVALID_CHECKPOINT,
                                f"tokenizer {tokenizer.source} has <pad> = {tokenizer.pad_id} but the RoBERTa "
                                f"config has pad_token_id {c.pad_token_id}")
        if tokenizer.max_length > c.max_tokens:
            raise AudioSepError(INVALID_CHECKPOINT,
                                f"tokenizer max_length {tokenizer.max_length} exceeds the {c.max_tokens} "
                                f"positions of the RoBERTa config")
        self.tokenizer = tokenizer
        self.clear_cache()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: cached tensors would be stale
        self.clear_cache()
        return super()._apply(fn, recurse)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_branch(input_ids, attention_mask)), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, L] ids right-padded with <pad> to the longest text, and the mask (None without padding)."""
        if self.tokenizer is None:
            raise RuntimeError("TextEncoder has no tokenizer; call set_tokenizer() first")
        rows = [self.tokenizer.encode(validate_text(t)) for t in texts]
        if not rows:
            raise AudioSepError(INVALID_TEXT, "no text query given")
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_id
        ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], dtype=torch.int64)
        if all(len(r) == longest for r in rows):
            return ids, None
        mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], dtype=torch.int64)
        return ids, mask

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[B, embed_dim] L2-normalised embeddings (not cached), on the module's device and dtype."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings; use embed_one() for a single query")
        ids, mask = self.tokenize(texts)
        device = self.text_projection[0].weight.device
        with torch.inference_mode():
            out = self(ids.to(device), None if mask is None else mask.to(device))
        return out.clone()  # outside inference mode: a normal tensor callers may use anywhere

    def embed_one(self, text: str) -> torch.Tensor:
        """[embed_dim] embedding of one query, from an LRU cache keyed by the exact string."""
        validate_text(text)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit.clone()
        emb = self.embed([text])[0]
        with self._lock:
            self._cache[text] = emb
            self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb.clone()


def build_text_encoder(roberta_dir: str | Path, *, device: torch.device | str | None = "meta",
                            cache_size: int = 256) -> TextEncoder:
    """TextEncoder sized from ``roberta_dir/config.json`` with its tokenizer; weights not loaded.

    With the default ``device="meta"`` construction is free; load the CLAP weights with
    ``load_state_dict(sd, assign=True)``.
    """
    config = RobertaConfig.from_dir(roberta_dir)
    tokenizer = Tokenizer.from_dir(roberta_dir, max_length=min(MAX_TOKENS, config.max_tokens))
    return TextEncoder(config, tokenizer, cache_size=cache_size, device=device)


__all__ = [
    "MAX_TOKENS", "SPECIAL_TOKENS", "OPTIONAL_ROBERTA_KEYS", "drop_optional_roberta_keys",
    "Tokenizer", "RobertaConfig", "RobertaEncoder", "TextEncoder", "roberta_position_ids",
    "validate_text", "build_text_encoder",
]
