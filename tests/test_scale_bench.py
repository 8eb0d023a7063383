"""bench/scale.py end to end at its small shape: a random checkpoint written shard by shard, then each step in a
fresh process (load, inject until an LTM merge, answer with K0 rows retrieved, save and load the state back),
one table row per step, and the peak-RSS gate. Also the shard-by-shard writer it relies on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mplus.formats.hf_folder import read_tensors, save_shards

BENCH = Path(__file__).parents[1] / "bench" / "scale.py"


def run_bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH), "--shape", "small", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def rows(stdout: str) -> dict[str, list[str]]:
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in cells[1:]}  # below the header


@pytest.mark.slow
def test_small_shape_runs_every_step_and_the_gate_fails_a_step_over_the_limit(tmp_path):
    done = run_bench(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert list(table) == ["write", "load", "inject", "answer", "save_load"]
    for step, (seconds, rss, note) in table.items():
        assert float(seconds) >= 0 and 0 < float(rss) < 23, (step, rss)
    assert "merged: LTM rows per layer 320 -> 352" in table["inject"][2]  # K0 stored rows, one block of K = 32 more
    assert "320 of 352 pool rows retrieved" in table["answer"][2]
    assert (tmp_path / "model.safetensors.index.json").is_file()
    gated = run_bench(tmp_path, "--keep", "--max-rss-gb", "0.01")
    assert gated.returncode == 1 and list(rows(gated.stdout)) == ["load", "inject", "answer", "save_load"]
    assert all(r[1].endswith("OVER") for r in rows(gated.stdout).values())


def test_save_shards_writes_each_shard_before_the_next_is_made(tmp_path):
    made = []

    def shards():
        for i in range(3):
            assert len(made) == i  # made only on demand
            made.append({f"t{i}": torch.full((4, 2), float(i))})
            yield made[-1]
            assert len(list(tmp_path.glob("model-*.safetensors"))) == i + 1  # on disk before the next is asked
    save_shards(shards(), 3, tmp_path)
    back = read_tensors(tmp_path, ["t0", "t1", "t2"])
    assert all(torch.equal(back[f"t{i}"], made[i][f"t{i}"]) for i in range(3))
    with pytest.raises(ValueError, match="promised 2 shards and got more"):
        save_shards(iter(made), 2, tmp_path / "other")
    with pytest.raises(ValueError, match="promised 4 shards and got 3"):
        save_shards(iter(made), 4, tmp_path / "other")
    assert not (tmp_path / "other" / "model.safetensors.index.json").exists()
