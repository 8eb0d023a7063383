"""Training resume state: an exact round trip as plain data, and a TrainStateError (never code run, never a
half-restored run) for a planted torch.save file, a damaged file or a file from a different run. Runs are built
directly from small random tensors; no training is needed, except in the CLI test (a few seconds)."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mplus.train.resume as ts
from mplus.memory.ltm import DroppedRows, LayerLTM
from mplus.memory.state import MemoryState
from mplus.train.resume import Run, TrainStateError, resume, save

L, N, D, D_S = 2, 4, 6, 3
LTM_SIZES, CACHE_SIZES = (3, 0), (1, 2)  # an empty LTM layer and a cache in both layers
SRC = Path(__file__).resolve().parents[1] / "src"


def make_memory(seed: int, n: int = N) -> MemoryState:
    g = torch.Generator().manual_seed(seed)
    rows = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    ages = lambda s: torch.randint(0, 99, (s,), generator=g)  # noqa: E731
    drops = torch.Generator().manual_seed(seed + 1)
    torch.rand(3, generator=drops)  # a generator that has moved on from its seed
    stm, stm_ages = rows(L, n, D), torch.randint(0, 99, (L, n), generator=g)
    fields = [[rows(s, D) for s in LTM_SIZES], [rows(s, D_S) for s in LTM_SIZES], [ages(s) for s in LTM_SIZES],
              [rows(s).double() for s in LTM_SIZES], [rows(c, D) for c in CACHE_SIZES],
              [rows(c, D_S) for c in CACHE_SIZES], [ages(c) for c in CACHE_SIZES]]
    ltm = [LayerLTM(*f[:4], DroppedRows(*f[4:])) for f in zip(*fields)]
    return MemoryState(stm=stm, stm_ages=stm_ages, ltm=ltm, update_step=4, generator=drops)


def make_run(seed: int, width: int = D, n: int = N, memory: bool = True) -> Run:
    """Three weights, AdamW after three steps in which the last weight never had a gradient (so it has no
    optimiser state), two moved-on generators, a random.Random and an M+ memory."""
    g = torch.Generator().manual_seed(seed)
    params = {name: torch.nn.Parameter(torch.randn(*shape, generator=g))
              for name, shape in (("a.weight", (4, width)), ("a.bias", (4,)), ("b.weight", (2, 4)))}
    optim = torch.optim.AdamW(params.values(), lr=0.1)
    for _ in range(3):
        params["a.weight"].grad, params["a.bias"].grad = torch.randn(4, width, generator=g), torch.randn(4, generator=g)
        optim.step()
    gens = {"batches": torch.Generator().manual_seed(seed + 2), "drops": torch.Generator().manual_seed(seed + 3)}
    torch.rand(5, generator=gens["batches"])
    rng = random.Random(seed)
    rng.random(), rng.gauss(0, 1)  # gauss leaves a cached second value in the state
    return Run(params, optim, gens, rng, make_memory(seed, n) if memory else None)


def snapshot(run: Run) -> dict:
    """Every value resume restores, as plain tensors and Python values."""
    out = {f"param.{n}": p.detach().clone() for n, p in run.params.items()}
    out |= {f"generator.{n}": g.get_state() for n, g in run.generators.items()}
    out |= {f"optim.{i}.{k}": v.clone() for i, s in run.optim.state_dict()["state"].items() for k, v in s.items()}
    out["rng"] = run.rng.getstate()
    m = run.memory
    out |= {"stm": m.stm, "stm_ages": m.stm_ages, "update_step": m.update_step, "drops": m.generator.get_state()}
    for l, layer in enumerate(m.ltm):
        out |= layer.tensors(l)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_round_trip_restores_everything_and_training_goes_on_identically(tmp_path):
    saved, fresh = make_run(0), make_run(1)
    save(tmp_path, saved, 17)
    assert resume(tmp_path, fresh, 40) == (17, None)
    assert_same(snapshot(fresh), snapshot(saved))
    for run in (saved, fresh):  # one more optimiser step from the same gradient: Adam moments and step counts
        run.params["a.weight"].grad = torch.ones(4, D)
        run.optim.step()
    assert torch.equal(saved.params["a.weight"], fresh.params["a.weight"])
    assert torch.equal(torch.rand(4, generator=saved.generators["batches"]),
                       torch.rand(4, generator=fresh.generators["batches"]))
    assert saved.rng.gauss(0, 1) == fresh.rng.gauss(0, 1)


def test_no_resume_file_is_a_fresh_start(tmp_path):
    run = make_run(0)
    before = snapshot(run)
    assert resume(tmp_path, run, 40) == (0, None)
    assert_same(snapshot(run), before)


def test_extras_reach_the_trainer_unchanged(tmp_path):
    extra = {"pending.0.sentence": torch.arange(5)}
    save(tmp_path, make_run(0), 3, extra, {"pending_steps": [2]})
    got = resume(tmp_path, make_run(1), 40, lambda tensors, meta: (tensors, meta))[1]
    assert got[0].keys() == extra.keys() and torch.equal(got[0]["pending.0.sentence"], torch.arange(5))
    assert got[1] == {"pending_steps": [2]}


class Payload:
    """Unpickling this runs os.mkdir(marker): the shape of a hostile train_state.pt."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "step": 0}, path)


def test_the_planted_payload_is_armed(tmp_path):
    """The check the refusal tests rely on: loading the planted file the old way does run its code."""
    plant(tmp_path / "train_state.pt", tmp_path / "marker")
    torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert (tmp_path / "marker").is_dir()


@pytest.mark.parametrize("name, message", [("train_state.pt", "torch.save's format.*delete it"),
                                           ("train_state.safetensors", "not a readable safetensors file")])
def test_a_planted_torch_save_file_is_refused_unread(tmp_path, name, message):
    plant(tmp_path / "run" / name, tmp_path / "marker")
    run = make_run(0)
    before = snapshot(run)
    with pytest.raises(TrainStateError, match=message):
        resume(tmp_path / "run", run, 40)
    assert not (tmp_path / "marker").exists()
    assert_same(snapshot(run), before)


def test_a_legacy_file_is_refused_even_beside_a_good_one(tmp_path):
    save(tmp_path, make_run(0), 3)
    plant(tmp_path / "train_state.pt", tmp_path / "marker")
    with pytest.raises(TrainStateError, match="older mplus"):
        resume(tmp_path, make_run(1), 40)
    assert not (tmp_path / "marker").exists()


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[-40:]
    elif how == "flipped byte":  # in the last tensor's data, after the JSON header
        data[-3] ^= 0x10
    elif how == "empty":
        data = bytearray()
    elif how == "garbage header":
        data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [("truncated", "not a readable safetensors"),
                                          ("flipped byte", "checksum does not match"),
                                          ("empty", "not a readable safetensors"),
                                          ("garbage header", "not a readable safetensors")])
def test_damaged_files_are_refused_and_leave_the_run_unchanged(tmp_path, how, message):
    save(tmp_path, make_run(0), 3)
    damage(tmp_path / "train_state.safetensors", how)
    run = make_run(1)
    before = snapshot(run)
    with pytest.raises(TrainStateError, match=f"{message}.*delete it"):
        resume(tmp_path, run, 40)
    assert_same(snapshot(run), before)


def test_a_safetensors_file_that_is_not_a_train_state_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "train_state.safetensors")
    with pytest.raises(TrainStateError, match="holds no mplus training state"):
        resume(tmp_path, make_run(0), 40)


@pytest.mark.parametrize("saved, resumed, message", [
    (dict(width=D), dict(width=D + 1), r"param.a.weight has shape \[4, 6\], expected \[4, 7\]"),
    (dict(n=N), dict(n=N + 1), r"memory.stm has shape \[2, 4, 6\], expected \[2, 5, 6\]"),
    (dict(memory=True), dict(memory=False), "different memory setting"),
])
def test_a_file_from_a_different_run_is_refused(tmp_path, saved, resumed, message):
    save(tmp_path, make_run(0, **saved), 3)
    run = make_run(1, **resumed)
    with pytest.raises(TrainStateError, match=message):
        resume(tmp_path, run, 40)


def test_a_file_saved_further_than_the_run_goes_is_refused(tmp_path):
    save(tmp_path, make_run(0), 30)
    with pytest.raises(TrainStateError, match="saved at step 30, but this run has 20 steps"):
        resume(tmp_path, make_run(1), 20)


def rewrite(path: Path, edit) -> None:
    """Apply edit(tensors, meta) and save again with a matching checksum: a hostile file that passes the hash."""
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()[ts.META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    meta["sha256"] = ts._digest(meta, tensors)
    save_file(tensors, path, metadata={ts.META_KEY: json.dumps(meta)})


def _set(d: dict, key: str, value) -> None:
    d[key] = value


@pytest.mark.parametrize("edit, message", [
    (lambda t, m: _set(m, "step", "3"), "saved at step '3'"),
    (lambda t, m: _set(m, "optim", [0, 7]), "not indices of this optimiser's 3 parameters"),
    (lambda t, m: _set(m, "rng", [3, [0] * 624 + [625], None]), "random.Random state"),
    (lambda t, m: _set(m, "rng", None), "different random setup"),
    (lambda t, m: _set(m["memory"], "update_step", -1), "update_step"),
    (lambda t, m: _set(t, "optim.0.step", torch.tensor(-2.0)), "step count -2.0"),
    (lambda t, m: _set(t, "optim.1.exp_avg_sq", -torch.ones(4)), "exp_avg_sq 1 has negative"),
    (lambda t, m: _set(t, "optim.0.exp_avg", torch.zeros(4, D, dtype=torch.float64)), "dtype torch.float64"),
    (lambda t, m: _set(t, "memory.ltm_keys.0", torch.zeros(2, D_S)),  # its layer's LTM has 3 rows
     r"ltm_keys.0 has shape \[2, 3\], expected \[3, 3\]"),
    (lambda t, m: _set(t, "memory.cache_ages.1", torch.zeros(5, dtype=torch.int64)), "cache_ages.1 has shape"),
    (lambda t, m: _set(t, "generator.batches", torch.zeros(7, dtype=torch.uint8)), "generator.batches has shape"),
    (lambda t, m: t.pop("param.b.weight"), "tensors missing: param.b.weight"),
    (lambda t, m: _set(t, "param.c", torch.zeros(1)), "unexpected tensors: param.c"),
])
def test_a_consistent_but_wrong_file_is_refused_before_anything_changes(tmp_path, edit, message):
    save(tmp_path, make_run(0), 3)
    rewrite(tmp_path / "train_state.safetensors", edit)
    run = make_run(1)
    before = snapshot(run)
    with pytest.raises(TrainStateError, match=message):
        resume(tmp_path, run, 40)
    assert_same(snapshot(run), before)


def test_mplus_train_refuses_a_planted_file_cleanly(tmp_path):
    """The command a user runs: an error line naming the file and the fix, no traceback, the payload never run."""
    from test_train_base import CONFIG
    (tmp_path / "base.toml").write_text(CONFIG.replace("corpus_docs = 150", "corpus_docs = 20"))
    plant(tmp_path / "run" / "train_state.pt", tmp_path / "marker")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "mplus", "train", "--config", str(tmp_path / "base.toml"),
                          "--max-steps", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "train_state.pt is a resume file from an older mplus" in out.stderr and "delete it" in out.stderr
    assert not (tmp_path / "marker").exists()


def test_no_source_file_unpickles():
    """Loading a pickle can run code; the sources must not do it anywhere (torch.load, pickle, weights_only)."""
    pattern = re.compile(r"torch\.load\(|\bpickle\b|weights_only|\bdill\b|\bjoblib\b")
    hits = [f"{p.relative_to(SRC)}:{i}" for p in sorted(SRC.rglob("*.py"))
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits
