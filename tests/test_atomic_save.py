"""Saving over an existing model is all-or-nothing: a save stopped at any point (a failing rename or deletion, or
kill -9 at a random moment) leaves the old or the new content, never a mix; a damaged shard is detected on load;
leftovers of killed saves go at the next save; files get the mode a plain open() gives."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import mplus
import save_worker
from conftest import OFFICIAL_TINY
from mplus import ConfigError, Llama, MPlus, WeightsError
from mplus.memory.state_file import StateError
from tiny import tiny_llama

INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}.*\.safetensors")  # HF's shard names, and those with a suffix
SHARD = 30_000  # bytes: the tiny Llama (~200 kB) in 10 shards


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("old_sharded, new_sharded", [(True, True), (False, True), (True, False), (False, False)])
def test_a_save_stopped_at_any_step_leaves_the_old_or_the_new_model(tmp_path, monkeypatch, old_sharded, new_sharded):
    # Failing the k-th rename or deletion leaves the folder as a kill just before that step would.
    old, new = tiny_llama(seed=1), tiny_llama(seed=2)
    old.save_pretrained(tmp_path / "old", max_shard_bytes=SHARD if old_sharded else None)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what this test is about; speed is
    real_replace, real_unlink = os.replace, os.unlink
    seen = Counter()
    for k in range(1, 100):
        folder = shutil.copytree(tmp_path / "old", tmp_path / str(k))
        steps = []

        def step(real):
            def run(*args, **kwargs):
                steps.append(args[0])
                if len(steps) == k:
                    raise OSError("stopped here")
                return real(*args, **kwargs)
            return run

        monkeypatch.setattr(os, "replace", step(real_replace))
        monkeypatch.setattr(os, "unlink", step(real_unlink))
        try:
            new.save_pretrained(folder, max_shard_bytes=SHARD if new_sharded else None)
            finished = True
        except OSError:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(os, "unlink", real_unlink)
        got = Llama.from_pretrained(folder, packed=False).state_dict()
        outcome = "new" if same(got, new.state_dict()) else "old" if same(got, old.state_dict()) else "a mix"
        assert outcome != "a mix", f"stopped at step {k} ({steps[-1]}): the folder mixes the two models"
        seen[outcome] += 1
        if finished:
            assert outcome == "new"
            break
    assert seen["old"] >= 1 + new_sharded and seen["new"] >= 1  # both sides of the commit were exercised


def test_a_damaged_or_foreign_shard_is_detected_on_load(tmp_path):
    tiny_llama(seed=3).save_pretrained(tmp_path, max_shard_bytes=SHARD)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor's data: its header still fits
    shard.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=f"{shard.name} does not match the sha256 its index records"):
        Llama.from_pretrained(tmp_path)


def test_leftovers_of_killed_saves_go_at_the_next_save_and_nothing_else(tmp_path):
    folder = tmp_path / "model"
    tiny_llama(seed=4).save_pretrained(folder, max_shard_bytes=SHARD)
    stale = [folder / ".model.safetensors.k3j_9x2a.mplus-tmp",  # a killed save's temporary files
             folder / "model-00002-of-00002-0123456789abcdef.safetensors"]  # a shard no index names
    kept = [folder / "notes.txt", folder / ".backup.tmp", folder / ".config.json.abcdefgh.tmp",  # not ours
            folder / "sub" / ".model.safetensors.k3j_9x2a.mplus-tmp"]  # ours, but in another folder
    live = folder / ".config.json.livewrit.mplus-tmp"  # a save running in another process
    (folder / "sub").mkdir()
    for path in stale + kept + [live]:
        path.write_bytes(b"x")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        tiny_llama(seed=5).save_pretrained(folder)
        assert live.exists()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert not list(folder.glob("model-*")) and (folder / "model.safetensors").exists()


def test_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        tiny_llama(seed=6).save_pretrained(tmp_path / "llama")
        tiny_llama(seed=6).save_pretrained(tmp_path / "sharded", max_shard_bytes=SHARD)
        model = MPlus.from_pretrained(OFFICIAL_TINY / "checkpoint")
        model.save_pretrained(tmp_path / "mplus")
        model.initial_state().save(tmp_path / "state.safetensors")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 10 and {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o640)}


# --------------------------------------------------------------------------------------- kill -9


def leftovers(folder: Path) -> tuple[list[str], list[str]]:
    """(temporary files, shard files the index does not name) in a folder."""
    names = os.listdir(folder)
    temps = [n for n in names if n.endswith(".mplus-tmp") or n.startswith(".tmp")]  # ours, the safetensors library's
    index = folder / INDEX_FILE
    named = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else set()
    return temps, [n for n in names if SHARD_NAME.fullmatch(n) and n not in named]


@pytest.mark.slow
@pytest.mark.parametrize("kind, kills", [("llama", 10), ("mplus", 5), ("state", 5)])
def test_kill_9_at_random_moments_leaves_the_old_or_the_new_content(tmp_path, kind, kills):
    contents, save = save_worker.build(kind)
    folder = tmp_path / "out"
    save(0, folder, sharded=False)  # the existing content
    src, tests = Path(mplus.__file__).parents[1], Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(tests), os.environ.get("PYTHONPATH", "")])}
    g = torch.Generator().manual_seed(10)
    outcomes = Counter()
    for trial in range(kills):
        worker = subprocess.Popen([sys.executable, str(tests / "save_worker.py"), kind, str(folder)],
                                  stdout=subprocess.PIPE, env=env)
        try:
            assert worker.stdout.readline().strip() == b"ready"
            time.sleep(0.05 + 1.5 * float(torch.rand((), generator=g)))  # a few saves in, mid-save mostly
        finally:
            worker.kill()
            worker.wait()
        try:
            got = save_worker.loaded(kind, folder)
            outcomes[next((i for i, c in enumerate(contents) if same(got, c)), "a mix")] += 1
        except (WeightsError, ConfigError, StateError):
            outcomes["a project error"] += 1
        assert outcomes["a mix"] == 0, f"kill {trial}: the folder holds neither the old nor the new content"
        temps, orphans = leftovers(folder)  # at most what the one killed save had written
        assert len(temps) <= 1 and len(orphans) <= 20, (temps, orphans)
    save(0, folder, sharded=False)
    assert leftovers(folder) == ([], [])
    print(f"{kind}: {dict(outcomes)}")
