"""Hugging Face checkpoint folders: the tensor index over model.safetensors or its shards, loading into a
module with one copy of the weights in memory, and all-or-nothing saving.

Loading builds the module on the meta device (no random init), reads each tensor straight from the file into
its own buffer with readinto (no memory map, so the page cache is not counted twice in the process), casts it
if asked, and assigns it with load_state_dict(strict=True, assign=True). Sharded checkpoints are driven by
model.safetensors.index.json, so a layer whose tensors straddle two shards loads like any other.

Every name and shape is checked against the module before any data is read: a missing, unexpected or
mis-shaped tensor is an error that names it.

Saving over an existing checkpoint is all-or-nothing at every instant, so a kill at any moment leaves the old
or the new model, never a mix: see save_tensors.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from mplus.formats.atomic import atomic_path, atomic_write_text, commit, fsync_dir, remove_stale_temps, temp_path
from mplus.formats.safetensors import DTYPES, WeightsError, parse_json, read_header, read_tensor, short, write_file

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Older checkpoints carry RoPE tables; they are derived from the config here, so they are skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_INDEX_BYTES = 100 << 20  # an 8B model's index is ~25 kB
DIGESTS_KEY = "mplus_sha256"  # index metadata: shard file -> sha256 of its bytes, written by save_tensors
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}(-[0-9a-f]{16})?\.safetensors")  # HF's, or save_tensors's
FORMAT_METADATA = {"format": "pt"}  # what transformers expects in a safetensors header


# --------------------------------------------------------------------------------------- checkpoint folders

def checkpoint_index(folder: Path, verify: bool = False) -> dict[str, tuple[Path, dict, int]]:
    """Tensor name -> (file, header entry, data start) for every tensor of a checkpoint folder, driven by
    model.safetensors.index.json when there is one (a layer's tensors may then sit in two shards).

    Every file must lie inside the folder (no path, no link out of it). verify: check each shard against the
    sha256 its index records (indexes written by save_tensors; official ones record none), before any data is read.
    """
    index_file, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_file.is_file():
        weight_map, digests = _read_index(folder)
        paths = {file: _inside(folder, file) for file in set(weight_map.values())}
        where = {name: paths[file] for name, file in weight_map.items()}
    elif single.is_file():
        where, digests = None, {}  # every tensor of the one file
        _inside(folder, SINGLE_FILE)
    else:
        raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    headers = {path: read_header(path) for path in (set(where.values()) if where else {single})}
    if verify:
        for file, digest in digests.items():
            if _sha256(folder / file) != digest:
                raise WeightsError(f"{folder / file} does not match the sha256 its index records: the file is "
                                   "damaged or from another save; save the model again or restore the folder")
    if where is None:
        where = {name: single for name in headers[single][0]}
    index = {}
    for name, path in where.items():
        header, data_start = headers[path]
        if name not in header:
            raise WeightsError(f"the index says {path.name} holds {short(name)}, but that file does not")
        index[name] = (path, header[name], data_start)
    return index


def _sha256(path: Path) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buffer)
    try:
        with open(path, "rb") as f:
            while n := f.readinto(buffer):  # one reused buffer: 1.6x faster than read() chunks
                digest.update(view[:n])
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror})") from None
    return digest.hexdigest()


def _read_index(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The weight map of an index file (tensor -> shard file name) and the shard sha256s it records, validated."""
    path = _inside(folder, INDEX_FILE)
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise WeightsError(f"{path} is larger than {MAX_INDEX_BYTES >> 20} MB; it is not a safetensors index")
        raw = path.read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the file ({e.strerror})") from None
    index = parse_json(raw, str(path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightsError(f"{path} is not a valid safetensors index (needs a 'weight_map' object of file names)")
    metadata = index.get("metadata") or {}
    digests = metadata.get(DIGESTS_KEY, {}) if isinstance(metadata, dict) else None
    if not isinstance(digests, dict) or not all(isinstance(d, str) and re.fullmatch("[0-9a-f]{64}", d)
                                                for d in digests.values()) or set(digests) - set(weight_map.values()):
        raise WeightsError(f"{path}: metadata.{DIGESTS_KEY} must map the index's shard files to sha256 hex digests")
    return weight_map, digests


def _inside(folder: Path, file: str) -> Path:
    """folder / file, refusing a name that is not a plain file name or a link leading out of the folder."""
    if not file or file in (".", "..") or any(c in file for c in "/\\\0"):
        raise WeightsError(f"the index of {folder} names the shard {short(file)}, which is not a plain file name "
                           "in the model folder; refusing it")
    path = folder / file
    if not path.is_file():
        raise WeightsError(f"the index of {folder} names the shard {short(file)}, which is not in the folder "
                           "(incomplete download or interrupted copy?)")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise WeightsError(f"{path} is a link to a file outside the model folder; refusing it (copy the file "
                           "into the folder instead)")
    return path


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
    index = checkpoint_index(folder, verify=True)
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
        if want.dtype.is_floating_point != DTYPES[info["dtype"]].is_floating_point:
            raise WeightsError(f"tensor '{name}' has dtype {info['dtype']}, the model expects a "
                               f"{'floating point' if want.dtype.is_floating_point else 'integer'} tensor")
    with torch.no_grad():
        for _ in _stream(index, list(targets), {n: expected[t] for n, t in targets.items()}, progress):
            pass


def save_tensors(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None = None) -> None:
    """Write `state` into `folder` as model.safetensors, or as shards of at most max_shard_bytes with an index.

    The file that decides what the folder holds is replaced last, by one rename: model.safetensors unsharded,
    the index sharded (the loader reads an index before a single file). Shards get names of their own content
    (`model-00001-of-00003-<sha256 prefix>.safetensors`), so the files the old index names are never overwritten
    and a kill before the index is renamed leaves the old model whole; the index records each shard's sha256,
    which loading verifies. Files of the old layout go after the commit; leftovers of killed saves (temporary
    files, shards no index names) at the start of the next save.
    """
    if max_shard_bytes:
        shards = _split(state, max_shard_bytes)
        save_shards(iter(shards), len(shards), folder)
        return
    _prepare(folder)
    with atomic_path(folder / SINGLE_FILE) as tmp:
        write_file(tmp, state, FORMAT_METADATA)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # an old index would shadow the new file: drop it next
    _remove_unused_shards(folder, set())


def save_shards(shards: Iterable[dict[str, torch.Tensor]], count: int, folder: Path) -> None:
    """Write `count` shards, each made only when the previous one is on disk, then their index (the commit), as
    save_tensors does: a checkpoint larger than memory can be written shard by shard (bench/scale.py)."""
    _prepare(folder)
    weight_map, digests, total = {}, {}, 0
    for shard in shards:  # not enumerate: its reused result tuple would keep the last shard alive into the next
        if len(digests) == count:
            raise ValueError(f"save_shards was promised {count} shards and got more; nothing was committed")
        stem = f"model-{len(digests) + 1:05d}-of-{count:05d}"
        with temp_path(folder, f"{stem}.safetensors") as tmp:
            digest = write_file(tmp, shard, FORMAT_METADATA, sha256=True)
            file = f"{stem}-{digest[:16]}.safetensors"
            commit(tmp, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
        digests[file] = digest
        total += sum(t.numel() * t.element_size() for t in shard.values())
        del shard  # before the next shard is made
    if len(digests) != count:
        raise ValueError(f"save_shards was promised {count} shards and got {len(digests)}; nothing was committed")
    index = {"metadata": {"total_size": total, DIGESTS_KEY: digests}, "weight_map": weight_map}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")  # the commit
    (folder / SINGLE_FILE).unlink(missing_ok=True)
    _remove_unused_shards(folder, set(digests))


def _prepare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    _remove_unused_shards(folder, _named_shards(folder))


def _split(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _named_shards(folder: Path) -> set[str] | None:
    """The shard files the folder's index names (none without an index; None if the index cannot be read)."""
    if not (folder / INDEX_FILE).is_file():
        return set()
    try:
        return set(_read_index(folder)[0].values())
    except WeightsError:
        return None  # not ours to judge: leave every file as it is


def _remove_unused_shards(folder: Path, keep: set[str] | None) -> None:
    if keep is None:
        return
    for path in folder.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name not in keep and not path.is_symlink() and path.is_file():
            path.unlink(missing_ok=True)
    fsync_dir(folder)
