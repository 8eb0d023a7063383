"""The fuzz targets: for each loader, valid seed files, a strategy that damages them into a Case, and the call
that loads a case. Shared by tests/test_fuzz.py (which asserts) and tests/fuzz_survey.py (which counts).

A Case is a set of files written into a fresh folder (`@OUTSIDE@` in a file's bytes becomes the absolute path of
a sibling folder holding `outside`), plus must_fail: the input is certainly invalid, so success is a bug too.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import struct
import tempfile
from pathlib import Path
from typing import Callable

import torch
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from conftest import gguf_bytes
from fuzz_mutations import dumps, hostile_values, mutated_bytes, mutated_json, mutated_safetensors
from tiny import tiny_llama

REPO = Path(__file__).resolve().parents[1]
TINY_MPLUS = REPO / "checkpoints" / "tiny-mplus"
OUTSIDE = b"@OUTSIDE@"


@dataclasses.dataclass
class Case:
    files: dict[str, bytes]  # relative path -> bytes; a path ending in "/" is an empty folder
    outside: dict[str, bytes] = dataclasses.field(default_factory=dict)
    must_fail: bool = False
    note: str = ""  # what was done, for the report

    def __repr__(self) -> str:
        return f"Case({self.note!r}{', must fail' if self.must_fail else ''})"

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a failing draw: not the file bytes
        printer.text(repr(self))

    def write(self, root: Path) -> Path:
        folder, outside = root / "case", root / "outside"
        for base, files in ((outside, self.outside), (folder, self.files)):
            base.mkdir(parents=True, exist_ok=True)
            for rel, data in files.items():
                if rel.endswith("/"):
                    (base / rel).mkdir(parents=True, exist_ok=True)
                    continue
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                (base / rel).write_bytes(data.replace(OUTSIDE, str(outside).encode()))
        return folder


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    cases: Callable[["Seeds"], st.SearchStrategy]
    call: Callable[[Path, "Seeds"], object]


# ------------------------------------------------------------------------------------------------ seed files

class Seeds:
    """Valid files every strategy starts from, built once per process."""

    def __init__(self):
        from mplus.memory.mplus import MPlus
        from mplus.llama.checkpoint import save_model
        self._tmp = tempfile.TemporaryDirectory(prefix="mplus-fuzz-")
        root = Path(self._tmp.name)
        save_model(tiny_llama(), root / "single")
        save_model(tiny_llama(), root / "sharded", max_shard_bytes=40_000)
        self.config = (root / "single" / "config.json").read_bytes()
        self.single = (root / "single" / "model.safetensors").read_bytes()
        self.sharded = {p.name: p.read_bytes() for p in (root / "sharded").iterdir() if p.name != "config.json"}
        self.mplus_config = (TINY_MPLUS / "config.json").read_bytes()
        self.tokenizer = (TINY_MPLUS / "tokenizer.json").read_bytes()
        self.gguf_spec = GGUF_SPEC
        self.gguf = gguf_bytes(*GGUF_SPEC)
        self.model = MPlus.from_pretrained(TINY_MPLUS)
        self.state_spec = self.model.state_spec()
        state, g = self.model.initial_state(seed=0), torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        for _ in range(self.model.memory_config.update_ltm_frequency + 1):  # one merge: LTM and cache both filled
            self.model.inject(state, torch.randint(2, vocab, (24,), generator=g))
        state.save(root / "state.safetensors")
        self.state = (root / "state.safetensors").read_bytes()
        with safe_open(root / "state.safetensors", "pt") as f:
            self.state_meta = json.loads(f.metadata()["mplus_state"])
            self.state_tensors = {k: f.get_tensor(k) for k in f.keys()}


@functools.cache
def seeds() -> Seeds:
    return Seeds()


GGUF_SPEC = (
    {"general.architecture": (8, "llama"), "general.alignment": (4, 32), "llama.block_count": (4, 2),
     "tokenizer.ggml.tokens": (9, (8, ["a", "b", "<s>"])), "tokenizer.ggml.scores": (9, (6, [0.0, -1.0, 2.5])),
     "nested": (9, (9, [(4, [1, 2]), (8, ["x"])]))},
    [("f32", [4, 2], 0, struct.pack("<8f", *range(8))), ("f16", [4], 1, b"\0<" * 4),
     ("q8_0", [32], 8, b"\0<" + bytes(range(32))), ("q4_0", [32, 2], 2, (b"\0<" + bytes(range(16))) * 2),
     ("bf16", [2], 30, b"\x80?\x00@")],
)


# ------------------------------------------------------------------------------------------------ weights

@st.composite
def safetensors_cases(draw, s: Seeds) -> Case:
    log: list[str] = []
    return Case({"config.json": s.config, "model.safetensors": draw(mutated_safetensors(s.single, log))},
                note=" ".join(log))


@st.composite
def index_cases(draw, s: Seeds) -> Case:
    files = {"config.json": s.config, **s.sharded}
    index = json.loads(s.sharded["model.safetensors.index.json"])
    shards = sorted(n for n in s.sharded if n.endswith(".safetensors"))
    name = draw(st.sampled_from(sorted(index["weight_map"])))
    kind = draw(st.sampled_from(["json", "json", "bytes", "escape", "escape", "path", "drop-shard", "shard"]))
    case, log = Case(files), [kind]
    if kind == "json":
        files["model.safetensors.index.json"] = dumps(draw(mutated_json(index, log=log))).encode()
    elif kind == "bytes":
        files["model.safetensors.index.json"] = draw(mutated_bytes(files["model.safetensors.index.json"], log))
    elif kind == "escape":  # the file exists and is valid, but outside the model folder
        shard = index["weight_map"][name]
        case.outside = {shard: s.sharded[shard]}
        index["weight_map"][name] = draw(st.sampled_from([f"../outside/{shard}", f"@OUTSIDE@/{shard}"]))
        log.append(f"{name} -> {index['weight_map'][name]}")
        files["model.safetensors.index.json"] = json.dumps(index).encode()
        case.must_fail = True
    elif kind == "path":
        index["weight_map"][name] = draw(st.sampled_from(
            ["", ".", "..", "/", "missing.safetensors", "config.json", "sub/", "/dev/zero", "/proc/self/mem",
             "model.safetensors.index.json", *shards]))
        log.append(f"{name} -> {index['weight_map'][name]!r}")
        case.must_fail = index["weight_map"][name] != json.loads(s.sharded["model.safetensors.index.json"])[
            "weight_map"][name]  # a folder, a file outside, or a shard that does not hold the tensor
        files["model.safetensors.index.json"] = json.dumps(index).encode()
        files["sub/"] = b""
    elif kind == "drop-shard":
        del files[draw(st.sampled_from(shards))]
    else:
        shard = draw(st.sampled_from(shards))
        files[shard] = draw(mutated_safetensors(s.sharded[shard], log))
    case.note = " ".join(log)
    return case


def load_llama(folder: Path, s: Seeds):
    from mplus.llama.model import Llama
    return Llama.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ config.json

@st.composite
def config_cases(draw, s: Seeds) -> Case:
    base = draw(st.sampled_from(["llama", "mplus"]))
    text = s.config if base == "llama" else s.mplus_config
    log = [base]
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated_bytes(text, log))
    else:
        data = dumps(draw(mutated_json(json.loads(text), log=log))).encode("utf-8", "surrogatepass")
    return Case({f"{base}/config.json": data}, note=" ".join(log))


def load_config(folder: Path, s: Seeds):
    """What a model load does first: Llama.from_pretrained reads a LlamaConfig; MPlus.from_pretrained reads the
    same fields through mplus_checkpoint.read_config, plus the memory fields."""
    from mplus.llama.config import LlamaConfig
    from mplus.memory.config import MemoryConfig
    from mplus.memory.checkpoint import read_config
    if (folder / "llama").is_dir():
        return LlamaConfig.from_file(folder / "llama")
    raw = read_config(folder / "mplus")
    return LlamaConfig.from_dict(raw), MemoryConfig.from_dict(raw)


# ------------------------------------------------------------------------------------------------ GGUF

@st.composite
def gguf_cases(draw, s: Seeds) -> Case:
    if draw(st.booleans()):
        log: list[str] = []
        return Case({"model.gguf": draw(mutated_bytes(s.gguf, log))}, note=" ".join(log))
    metadata, tensors = dict(s.gguf_spec[0]), list(s.gguf_spec[1])
    version, alignment = 3, 32
    kind = draw(st.sampled_from(["version", "alignment", "dims", "shape", "type", "nesting", "value-type",
                                 "duplicate", "string"]))
    i = draw(st.integers(0, len(tensors) - 1))
    name, ne, gtype, data = tensors[i]
    if kind == "version":
        version = draw(st.sampled_from([0, 1, 4, 2**24, 2**32 - 1]))
        detail = version
    elif kind == "alignment":
        detail = metadata["general.alignment"] = draw(st.sampled_from(
            [(4, 0), (4, 3), (4, 2**31), (8, "32"), (6, 32.0), (10, 2**64 - 1)]))
    elif kind == "dims":
        tensors[i] = (name, draw(st.sampled_from([[], [4, 1, 1, 1, 1], [1] * 9])), gtype, data)
        detail = (name, tensors[i][1])
    elif kind == "shape":
        tensors[i] = (name, [draw(st.sampled_from([0, 3, 2**32, 2**62, 2**64 - 1]))] + ne[1:], gtype, data)
        detail = (name, tensors[i][1])
    elif kind == "type":
        tensors[i] = (name, ne, draw(st.sampled_from([4, 7, 12, 99, 2**32 - 1])), data)
        detail = (name, tensors[i][2])
    elif kind == "nesting":
        payload, detail = (4, [1]), draw(st.integers(8, 40))
        for _ in range(detail):  # an array of arrays of ... of u32
            payload = (9, [payload])
        metadata["deep"] = (9, payload)
    elif kind == "value-type":
        metadata["odd"] = (4, 1)  # written as a u32, then its value type patched to one that does not exist
        blob = gguf_bytes(metadata, tensors)
        at = blob.index(b"odd") + 3
        vtype = draw(st.sampled_from([13, 99, 2**32 - 1]))
        return Case({"model.gguf": blob[:at] + struct.pack("<I", vtype) + blob[at + 4:]}, note=f"{kind} {vtype}")
    elif kind == "duplicate":
        tensors.append(tensors[i])
        detail = name
    else:
        detail = draw(st.sampled_from(["general.name", b"\xff key"]))
        metadata[detail] = (8, b"\xff\xfe bad utf-8")
    try:
        return Case({"model.gguf": gguf_bytes(metadata, tensors, alignment, version)}, note=f"{kind} {detail!r}")
    except (struct.error, UnicodeEncodeError, OverflowError):  # the writer cannot express it; damage bytes instead
        log = []
        return Case({"model.gguf": draw(mutated_bytes(s.gguf, log))}, note=" ".join(log))


def load_gguf(folder: Path, s: Seeds):
    from mplus.formats.gguf import GGUFFile
    g = GGUFFile(folder / "model.gguf")
    return [g.tensor(name) for name in g.tensors]


# ------------------------------------------------------------------------------------------------ memory states

@st.composite
def state_cases(draw, s: Seeds) -> Case:
    """A saved state of the shipped tiny M+, damaged as bytes, in its safetensors header, in its metadata document
    (with the checksum recomputed, so the damage reaches the checks behind it) or in its tensors (likewise)."""
    from mplus.memory import state_file as state_io
    kind = draw(st.sampled_from(["bytes", "header", "meta", "meta", "meta-unsigned", "tensors", "tensors"]))
    log = [kind]
    if kind == "bytes":
        return Case({"state.safetensors": draw(mutated_bytes(s.state, log))}, note=" ".join(log))
    if kind == "header":
        return Case({"state.safetensors": draw(mutated_safetensors(s.state, log))}, note=" ".join(log))
    meta, tensors = dict(s.state_meta), dict(s.state_tensors)
    if kind.startswith("meta"):
        meta = draw(mutated_json(meta, allow_raw=kind == "meta-unsigned", log=log))
    else:
        name = draw(st.sampled_from(sorted(tensors)))
        change = draw(st.sampled_from(["drop", "extra", "dtype", "shape", "bytes"]))
        log.append(f"{change} {name}")
        t = tensors[name]
        if change == "drop":
            del tensors[name]
        elif change == "extra":
            tensors[draw(st.sampled_from(["ltm.99", "stm2", "ltm.-1", "cache_rows.2"]))] = t.clone()
        elif change == "dtype":
            tensors[name] = t.to(draw(st.sampled_from([torch.float16, torch.int32, torch.uint8, torch.float64])))
        elif change == "shape":
            tensors[name] = t.reshape(-1)[: max(0, t.numel() - 1)].clone() if t.numel() else torch.zeros(3, dtype=t.dtype)
        else:
            flat = t.reshape(-1).view(torch.uint8).clone()
            if flat.numel():
                flat[draw(st.integers(0, flat.numel() - 1))] ^= 0xFF
            tensors[name] = flat.view(t.dtype).reshape(t.shape)
    if kind != "meta-unsigned" and isinstance(meta, dict):
        meta["sha256"] = state_io._digest(meta, tensors)  # a fresh checksum: the damage must be caught by _check
    text = dumps(meta) if kind == "meta-unsigned" else json.dumps(meta)
    return Case({"state.safetensors": save_bytes(tensors, metadata={"mplus_state": text})}, note=" ".join(log))


def load_state(folder: Path, s: Seeds):
    from mplus.memory.state import MemoryState
    state = MemoryState.load(folder / "state.safetensors", expect=s.state_spec)
    return state.describe()


# ------------------------------------------------------------------------------------------------ tokenizer.json

TOKENIZER_FIELDS = [("model", "type"), ("model", "vocab"), ("model", "merges"), ("model", "unk_token"),
                    ("model", "dropout"), ("model", "byte_fallback"), ("added_tokens",), ("added_tokens", 0, "id"),
                    ("added_tokens", 1, "content"), ("pre_tokenizer", "type"), ("decoder",), ("normalizer",),
                    ("post_processor",), ("truncation",), ("padding",), ("version",)]


@st.composite
def tokenizer_cases(draw, s: Seeds) -> Case:
    kind = draw(st.sampled_from(["bytes", "json", "field", "field"]))
    log: list[str] = []
    if kind == "bytes":
        return Case({"tokenizer.json": draw(mutated_bytes(s.tokenizer, log))}, note=" ".join(log))
    doc = json.loads(s.tokenizer)
    if kind == "json":
        doc = draw(mutated_json(doc, log=log))
    else:
        *path, last = draw(st.sampled_from(TOKENIZER_FIELDS))
        node = doc
        for key in path:
            node = node[key]
        node[last] = copy.deepcopy(draw(st.one_of(hostile_values(), st.sampled_from(
            ["Unigram", "WordPiece", "WordLevel", "BPE", "Nope", {"type": "Nope"}, {"type": "BPE"},
             [{"id": -1, "content": "x"}], [{"id": 2**40, "content": "<big>", "special": True}]]))))
        shown = repr(node[last])
        log.append(f"set {[*path, last]} to {shown[:60]}")
    return Case({"tokenizer.json": dumps(doc).encode("utf-8", "surrogatepass")}, note=" ".join(log))


def load_tokenizer(folder: Path, s: Seeds):
    from mplus.llama.tokenizer import Tokenizer
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    return tok.decode(tok.encode("Hello, world. 123 <|eos|>"))


TARGETS = [
    Target("safetensors", safetensors_cases, load_llama),
    Target("index", index_cases, load_llama),
    Target("config", config_cases, load_config),
    Target("gguf", gguf_cases, load_gguf),
    Target("state", state_cases, load_state),
    Target("tokenizer", tokenizer_cases, load_tokenizer),
]
