"""Loading and saving Hugging Face safetensors checkpoints, one copy of the weights in memory.

Loading builds the module on the meta device (no random init), reads each tensor straight from the file into
its own buffer with readinto (no memory map, so the page cache is not counted twice in the process), casts it
if asked, and assigns it with load_state_dict(strict=True, assign=True). Sharded checkpoints are driven by
model.safetensors.index.json, so a layer whose tensors straddle two shards loads like any other.

Every name and shape is checked against the module before any data is read: a missing, unexpected or
mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .config import LlamaConfig
from .io import atomic_path, atomic_write_text
from .packing import materialize, pack_for_inference

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Older checkpoints carry RoPE tables; they are derived from the config here, so they are skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint file that is malformed or does not fit the model."""


# --------------------------------------------------------------------------------------- safetensors files

def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a .safetensors file and the byte offset where its data starts; validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise WeightsError(f"{path}: header length {n} does not fit the file of {size} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, (begin, end) = [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor '{name}' has a malformed entry {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
            raise WeightsError(f"{path}: tensor '{name}' has inconsistent shape {shape} and offsets {[begin, end]}")
        if data_start + end > size:
            raise WeightsError(f"{path}: tensor '{name}' ends past the end of the file (truncated download?)")
    return header, data_start


def read_tensor(f, info: dict, data_start: int, dest: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from an open file: straight into `dest` when its dtype and layout allow, else into a
    fresh buffer (then copied and cast into `dest` if given)."""
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    direct = dest is not None and dest.dtype == dtype and dest.is_contiguous()
    t = dest if direct else torch.empty(info["shape"], dtype=dtype)
    if t.numel():
        f.seek(data_start + info["data_offsets"][0])
        view = t.view(-1).view(torch.uint8).numpy()
        if f.readinto(view) != view.nbytes:
            raise WeightsError(f"{f.name}: unexpected end of file")
    if dest is not None and not direct:
        dest.copy_(t)
        return dest
    return t


def checkpoint_index(folder: Path) -> dict[str, tuple[Path, dict, int]]:
    """Tensor name -> (file, header entry, data start) for every tensor of a checkpoint folder, driven by
    model.safetensors.index.json when there is one (a layer's tensors may then sit in two shards)."""
    index_file, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WeightsError(f"{index_file} is not a valid safetensors index (needs a 'weight_map' object)") from None
        where = {name: folder / file for name, file in weight_map.items()}
    elif single.is_file():
        where = None  # every tensor of the one file
    else:
        raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    headers = {path: read_header(path) for path in (set(where.values()) if where else {single})}
    if where is None:
        where = {name: single for name in headers[single][0]}
    index = {}
    for name, path in where.items():
        header, data_start = headers[path]
        if name not in header:
            raise WeightsError(f"the index says {path.name} holds {name!r}, but that file does not")
        index[name] = (path, header[name], data_start)
    return index


def iter_checkpoint(folder: Path, progress: bool = False) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, streamed file by file in file order."""
    index = checkpoint_index(folder)
    yield from _stream(index, list(index), {}, progress)


def read_tensors(folder: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint folder; a missing one is an error that names it."""
    index = checkpoint_index(folder)
    names = list(names)
    missing = [n for n in names if n not in index]
    if missing:
        raise WeightsError(f"checkpoint in {folder} lacks {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return dict(_stream(index, names, {}, progress=False))


def _stream(index, names: list[str], dests: dict[str, torch.Tensor], progress: bool):
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(index[name][0], []).append(name)
    total = sum(_nbytes(index[n][1]) for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for path, file_names in by_file.items():
            with open(path, "rb") as f:  # in file order: one sequential read per shard
                for name in sorted(file_names, key=lambda n: index[n][1]["data_offsets"][0]):
                    _, info, data_start = index[name]
                    t = read_tensor(f, info, data_start, dests.get(name))
                    bar.update(_nbytes(info))
                    yield name, t


def _nbytes(info: dict) -> int:
    return info["data_offsets"][1] - info["data_offsets"][0]


# --------------------------------------------------------------------------------------- modules

def load_state_into(model: torch.nn.Module, folder: Path, *,
                    rename: Callable[[str], str | None] = lambda n: n, optional: Iterable[str] = (),
                    progress: bool = False) -> None:
    """Fill a model's already allocated parameters and buffers from a checkpoint folder, strictly.

    rename maps a file name to a module name (None skips the tensor); names in `optional` may be absent
    from the file (tied weights). Every name, shape and dtype kind is checked from the file headers before
    any data is read, so a checkpoint that does not fit changes nothing. Tensors are read straight into
    their destination (cast on the way where the dtypes differ), so no second copy of the weights exists.
    """
    expected = model.state_dict(keep_vars=True)
    index = checkpoint_index(folder)
    targets = {}
    for name in index:
        if not name.endswith(IGNORED_SUFFIXES) and rename(name) is not None:
            targets[name] = rename(name)
    unexpected = sorted(n for n, t in targets.items() if t not in expected)
    missing = sorted(set(expected) - set(targets.values()) - set(optional))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise WeightsError(f"checkpoint in {folder} does not fit the model: {'; '.join(parts)}")
    for name, target in targets.items():
        info, want = index[name][1], expected[target]
        if tuple(info["shape"]) != tuple(want.shape):
            raise WeightsError(f"tensor '{name}' has shape {tuple(info['shape'])}, the model expects {tuple(want.shape)}")
        if want.dtype.is_floating_point != SAFETENSORS_DTYPES[info["dtype"]].is_floating_point:
            raise WeightsError(f"tensor '{name}' has dtype {info['dtype']}, the model expects a "
                               f"{'floating point' if want.dtype.is_floating_point else 'integer'} tensor")
    with torch.no_grad():
        for _ in _stream(index, list(targets), {n: expected[t] for n, t in targets.items()}, progress):
            pass


def load_model(cls, path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
               packed: bool = True):
    """Build `cls(config)` on the meta device, allocate its storage once, and fill it from a HF Llama folder.

    The model is for inference (eval mode, no grads). packed: store the weights in the fast decoding layout
    of packing.py (same values and names); the packed storage is allocated before any data is read, so the
    weights are never held twice.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise WeightsError(f"model folder {folder} does not exist; run `mplus fetch` or pass a HF model folder")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    from .config_sizes import check_sizes, header_shapes  # it needs WeightsError from here
    config = LlamaConfig.from_file(folder)
    check_sizes(config, header_shapes(checkpoint_index(folder)))  # before the config's sizes are allocated
    with torch.device("meta"):
        model = cls(config)
    if packed:
        pack_for_inference(model, dtype)
    materialize(model, dtype)
    tied = config.tie_word_embeddings
    load_state_into(model, folder, optional=("lm_head.weight",) if tied else (),
                    rename=(lambda n: None if n == "lm_head.weight" else n) if tied else (lambda n: n),
                    progress=progress)
    return model.eval()


def save_model(model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the weights in HF layout, atomically; sharded with an index if max_shard_bytes."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_state(state, folder, max_shard_bytes)
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")


def save_state(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None = None) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    stale = [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]
    written = []
    if len(shards) == 1 and not max_shard_bytes:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        with atomic_path(folder / file) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append(folder / file)
    if files != [SINGLE_FILE]:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        written.append(folder / INDEX_FILE)
    for old in stale:  # a leftover file of the other layout would shadow or contradict the new one
        if old not in written:
            old.unlink(missing_ok=True)
