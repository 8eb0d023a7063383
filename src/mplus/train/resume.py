"""The resume state of a training run as plain data: one safetensors file, `train_state.safetensors`.

A trainer stopped early (max_steps) writes what it needs to go on as if it had never stopped: the trained
tensors, AdamW's moments and step counts, its torch generators, Python's random.Random, the memory state it
trains with and a few trainer-specific tensors. Tensors go into the file; the step, the random.Random state
and the other scalars go into its JSON metadata ("mplus_train_state"), with a sha256 over that document and
every tensor, so a damaged file is detected. The optimiser's hyperparameters are not saved: they come from the
config, as every other setting of the run does.

Tensor names: `param.{name}`, `optim.{i}.{exp_avg,exp_avg_sq,step}` (i: the parameter's index in the optimiser),
`generator.{name}`, `memory.{stm,stm_ages,generator}`, `memory.{field}.{l}` (M+ only: LTM and cache rows of
layer l, as in state_io), `extra.{name}`.

Loading checks every name, shape, dtype and JSON value against the run being resumed before it changes
anything. A `train_state.pt` left by older versions (torch.save's format, which can run any code when it is
loaded) is refused unread.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mplus.formats.atomic import atomic_path
from mplus.memory.ltm import LayerLTM
from mplus.memory.state import MemoryState

FILE, LEGACY_FILE = "train_state.safetensors", "train_state.pt"
FORMAT, VERSION, META_KEY = "mplus-train-state", 1, "mplus_train_state"
MOMENTS = ("exp_avg", "exp_avg_sq")


class TrainStateError(ValueError):
    """A resume file that is damaged, unsafe (an old torch.save file) or made for a different run."""


@dataclasses.dataclass
class Run:
    """What a trainer checkpoints. resume() restores all of it in place; memory keeps its object, its fields
    are replaced (the trainer goes on using the same MemoryState)."""
    params: dict[str, torch.Tensor]  # named tensors that train: model weights or adapters
    optim: torch.optim.Optimizer  # AdamW (amsgrad off) over tensors of the same shapes and dtypes
    generators: dict[str, torch.Generator]
    rng: random.Random | None = None
    memory: MemoryState | None = None


def save(folder: Path, run: Run, step: int, extra: Mapping[str, torch.Tensor] = {}, extra_meta: Mapping = {}
         ) -> None:
    """Write folder/train_state.safetensors atomically; extra tensors and JSON values are the trainer's own."""
    tensors = {f"param.{n}": p for n, p in run.params.items()}
    tensors |= {f"generator.{n}": g.get_state() for n, g in run.generators.items()}
    tensors |= {f"extra.{n}": t for n, t in extra.items()}
    optim = run.optim.state_dict()["state"]
    for i, s in optim.items():
        if set(s) != {"step", *MOMENTS}:
            raise TrainStateError(f"cannot save optimiser state with entries {sorted(s)}; use AdamW without amsgrad")
        tensors |= {f"optim.{i}.{k}": v for k, v in s.items()}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "step": step, "optim": sorted(optim),
                            "rng": _rng_to_json(run.rng), "extra": dict(extra_meta), "memory": None}
    if run.memory is not None:
        tensors |= _memory_tensors(run.memory)
        meta["memory"] = {"update_step": int(run.memory.update_step)}
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # no shared storage
    meta["sha256"] = _digest(meta, tensors)
    with atomic_path(folder / FILE) as tmp:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def resume(folder: Path, run: Run, steps: int,
           parse_extra: Callable[[dict[str, torch.Tensor], dict], Any] | None = None) -> tuple[int, Any]:
    """(step to go on from, parse_extra's result) after restoring `run` from folder's resume file; (0, None)
    when there is none. parse_extra(tensors, meta) checks the trainer's extras (raising TrainStateError) before
    anything is changed. `steps` is the run's length: a file further on is refused."""
    path = folder / FILE
    if (folder / LEGACY_FILE).exists():
        raise TrainStateError(f"{folder / LEGACY_FILE} is a resume file from an older mplus, in torch.save's "
                              "format, which mplus no longer loads because loading it can run any code; delete it "
                              "(or the whole run folder) to train this stage again from step 0")
    if not path.exists():
        return 0, None
    try:
        tensors, meta = _read(path)
        _check(tensors, meta, run, steps)
        extra = {k.removeprefix("extra."): t for k, t in tensors.items() if k.startswith("extra.")}
        parsed = parse_extra(extra, meta["extra"]) if parse_extra else None
    except TrainStateError as e:
        raise TrainStateError(f"{path}: {e}; delete it (or the whole run folder) to train this stage again "
                              "from step 0") from None
    _restore(tensors, meta, run)
    return meta["step"], parsed


def named(model: torch.nn.Module, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """params under their names in model: the names a resume file stores them by."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p for p in params}


def check_tensor(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: list[int | None]
                 ) -> torch.Tensor:
    """tensors[name], which must exist with this dtype and shape (None: any size in that dimension)."""
    t = tensors.get(name)
    _need(t is not None, f"the tensor {name} is missing")
    _need(t.dtype == dtype, f"the tensor {name} has dtype {t.dtype}, expected {dtype}")
    _need(t.ndim == len(shape) and all(w is None or w == s for w, s in zip(shape, t.shape)),
          f"the tensor {name} has shape {list(t.shape)}, expected {['*' if s is None else s for s in shape]}")
    return t


# ------------------------------------------------------------------------------------------------------ helpers

def _need(ok: bool, problem: str) -> None:
    if not ok:
        raise TrainStateError(problem)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainStateError(f"it is not a readable safetensors file ({e})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        meta = None
    _need(isinstance(meta, dict) and meta.get("format") == FORMAT, "it holds no mplus training state")
    _need(meta.get("version") == VERSION, f"it has format version {meta.get('version')!r}, this mplus reads {VERSION}")
    _need(meta.get("sha256") == _digest(meta, tensors), "its checksum does not match: the file was modified or damaged")
    return tensors, meta


def _check(tensors: dict[str, torch.Tensor], meta: dict, run: Run, steps: int) -> None:
    """Raise TrainStateError unless meta and tensors hold a state `run` can go on from."""
    step = meta.get("step")
    _need(type(step) is int and 0 <= step <= steps,
          f"it was saved at step {step!r}, but this run has {steps} steps; set steps to at least that")
    _need(isinstance(meta.get("extra"), dict), "its trainer fields are not a JSON object")
    expected: dict[str, tuple[torch.dtype, list]] = {
        f"param.{n}": (p.dtype, list(p.shape)) for n, p in run.params.items()}
    expected |= {f"generator.{n}": (torch.uint8, list(g.get_state().shape)) for n, g in run.generators.items()}
    params = [p for group in run.optim.param_groups for p in group["params"]]
    indices = meta.get("optim")
    _need(isinstance(indices, list) and all(type(i) is int and 0 <= i < len(params) for i in indices)
          and len(set(indices)) == len(indices), f"its optimiser entries {indices!r} are not indices of "
          f"this optimiser's {len(params)} parameters: a run with a different model or config")
    for i in indices:
        expected |= {f"optim.{i}.{k}": (params[i].dtype, list(params[i].shape)) for k in MOMENTS}
        expected[f"optim.{i}.step"] = (torch.float32, [])
    memory = meta.get("memory")
    _need((memory is None) == (run.memory is None), "it was saved by a trainer with a different memory setting")
    if run.memory is not None:
        _need(isinstance(memory, dict) and type(memory.get("update_step")) is int and memory["update_step"] >= 0,
              f"its memory update_step {memory!r} is not an integer >= 0")
        expected |= _memory_expected(run.memory, tensors)
    names = {k for k in tensors if not k.startswith("extra.")}
    missing, stray = sorted(expected.keys() - names), sorted(names - expected.keys())
    _need(not missing, f"tensors missing: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                       "(a run with a different model or config?)")
    _need(not stray, f"unexpected tensors: {', '.join(stray[:4])}{' ...' if len(stray) > 4 else ''} "
                     "(a run with a different model or config?)")
    for name, (dtype, shape) in expected.items():
        check_tensor(tensors, name, dtype, shape)
    for i in indices:
        s = float(tensors[f"optim.{i}.step"])
        _need(s >= 1 and s == int(s), f"optimiser step count {s} of parameter {i} is not a whole number >= 1")
        _need(bool((tensors[f"optim.{i}.exp_avg_sq"] >= 0).all()), f"optimiser exp_avg_sq {i} has negative entries")
    for name in [k for k in expected if k == "memory.generator" or k.startswith("generator.")]:
        try:  # on a scratch generator: nothing is changed until every check has passed
            torch.Generator().set_state(tensors[name])
        except RuntimeError as e:
            raise TrainStateError(f"the generator state {name} is not valid ({e})") from None
    _need((run.rng is None) == (meta.get("rng") is None), "it was saved by a trainer with a different random setup")
    if run.rng is not None:
        _rng_from_json(meta["rng"])


def _restore(tensors: dict[str, torch.Tensor], meta: dict, run: Run) -> None:
    with torch.no_grad():
        for n, p in run.params.items():
            p.copy_(tensors[f"param.{n}"])
    for n, g in run.generators.items():
        g.set_state(tensors[f"generator.{n}"])
    if run.rng is not None:
        run.rng.setstate(_rng_from_json(meta["rng"]))
    state = {i: {k: tensors[f"optim.{i}.{k}"] for k in ("step", *MOMENTS)} for i in meta["optim"]}
    run.optim.load_state_dict({"state": state, "param_groups": run.optim.state_dict()["param_groups"]})
    if (m := run.memory) is not None:
        m.stm, m.stm_ages, m.update_step, m.stm_kv = tensors["memory.stm"], tensors["memory.stm_ages"], \
            meta["memory"]["update_step"], None
        m.generator.set_state(tensors["memory.generator"])
        if m.has_ltm:
            m.ltm = [LayerLTM.from_tensors(tensors, l, "memory.") for l in range(m.num_layers)]


def _memory_tensors(state: MemoryState) -> dict[str, torch.Tensor]:
    out = {"memory.stm": state.stm, "memory.stm_ages": state.stm_ages, "memory.generator": state.generator.get_state()}
    if state.has_ltm:
        for l, m in enumerate(state.ltm):
            out |= m.tensors(l, "memory.")
    return out


def _memory_expected(template: MemoryState, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, list]]:
    """Names, dtypes and shapes of a saved memory that fits `template`: its STM exactly; LTM and cache rows with
    the template's row size and any row count, shared by the fields of one layer's LTM (and of its cache)."""
    out = {"memory.stm": (template.stm.dtype, list(template.stm.shape)),
           "memory.stm_ages": (template.stm_ages.dtype, list(template.stm_ages.shape)),
           "memory.generator": (torch.uint8, list(template.generator.get_state().shape))}
    if not template.has_ltm:
        return out
    for l, m in enumerate(template.ltm):
        for name, like in m.tensors(l).items():  # the LTM's fields share the rows' count, the cache's theirs
            lead = tensors.get(f"memory.{'cache_rows' if name.startswith('cache') else 'ltm'}.{l}")
            rows = lead.shape[0] if lead is not None and lead.ndim else None  # the lead's own count, any
            out[f"memory.{name}"] = (like.dtype, [rows, *like.shape[1:]])
    return out


def _rng_to_json(rng: random.Random | None) -> list | None:
    if rng is None:
        return None
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_json(x) -> tuple:
    """random.Random's state (3, 625 words of 32 bits, the last a position <= 624, gauss_next) from JSON."""
    ok = (isinstance(x, list) and len(x) == 3 and x[0] == 3 and isinstance(x[1], list) and len(x[1]) == 625
          and all(type(v) is int and 0 <= v < 2**32 for v in x[1]) and x[1][-1] <= 624
          and (x[2] is None or type(x[2]) is float))
    _need(ok, "its random.Random state is not a valid Mersenne Twister state")
    return x[0], tuple(x[1]), x[2]


def _digest(meta: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (without its own hash) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name} {t.dtype} {list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes without a copy; also works for bfloat16
    return h.hexdigest()
