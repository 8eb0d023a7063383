"""Stages 2 and 3 in miniature: they run on a stage-1 model, train the retriever, are deterministic and resume
exactly; the retriever's labels find the written rows; the BCE is the official balanced average (M+ §3.2.2); the retention
benchmark and the demo run end to end on the trained model."""
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mplus import MPlus
from mplus.apps.bench_retention import run
from mplus.llama.config import ConfigError
from mplus.llama.tokenizer import Tokenizer
from mplus.memory.ltm import copies_of
from mplus.train.base import BaseTrainConfig, train as train_base
from mplus.train.recall import RecallConfig, pending_from, train
from mplus.train.resume import TrainStateError
from mplus.train.stage1 import Stage1Config, train as train_stage1
from test_train_base import CONFIG as BASE
from test_train_stage1 import STAGE1

RECALL = """
stage = "{stage}"
[train]
init = "{init}"
seed = 5
steps = {steps}
lr = 5e-3
selector_lr = 5e-3
fact_ratio = 0.4
fresh_ratio = 0.2
filler_words = 10
chunk_words = 12
max_delay = {delay}
out = "{out}"
"""


def stage1_model(folder):
    (folder / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"').replace("steps = 40", "steps = 10"))
    train_base(BaseTrainConfig.from_toml(folder / "base.toml"), progress=False)
    (folder / "s1.toml").write_text(STAGE1.format(out="s1").replace("steps = 24", "steps = 4"))
    train_stage1(Stage1Config.from_toml(folder / "s1.toml"), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base, stage 1, stage 2 and a stage-3 run, trained once for this module."""
    folder = tmp_path_factory.mktemp("recall")
    stage1_model(folder)
    (folder / "s2.toml").write_text(RECALL.format(stage="memory2", init="s1", steps=8, delay=6, out="s2"))
    s2 = train(RecallConfig.from_toml(folder / "s2.toml"), progress=False)
    (folder / "once.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=20, delay=24, out="once"))
    once = train(RecallConfig.from_toml(folder / "once.toml"), progress=False)
    return folder, s2, once


def test_stages_2_and_3_run_deterministically_and_resume(runs):
    folder, s2, once = runs
    assert all(math.isfinite(x) for x in s2 + once) and any(x > 0 for x in s2)
    (folder / "split.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=20, delay=24, out="split"))
    split = RecallConfig.from_toml(folder / "split.toml")  # a second run, stopped and resumed: same losses
    first = train(split, max_steps=9, progress=False)
    saved = load_file(folder / "split" / "train_state.safetensors")  # the stop falls with questions pending, LTM full
    assert "extra.pending.0.block" in saved and saved["memory.ltm.0"].shape[0] > 0
    assert first + train(split, progress=False) == once
    a, b = (MPlus.from_pretrained(folder / n) for n in ("once", "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the retriever trained: its weights moved away from the stage-2 ones
    s2_model = MPlus.from_pretrained(folder / "s2")
    name = "model.layers.0.self_attn.query_proj.0.weight"
    assert not torch.equal(a.state_dict()[name], s2_model.state_dict()[name])
    state = a.initial_state()
    assert state.has_ltm and all(len(m) == 0 for m in state.ltm)  # shipped with an empty LTM...
    assert torch.equal(state.stm, s2_model.initial_state().stm)  # ...and the STM it started from, not the training one


def test_stage_3_ships_a_primed_memory(runs):
    folder = runs[0]
    (folder / "primed.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out="primed")
                                        + "prime_chunks = 30\n")
    train(RecallConfig.from_toml(folder / "primed.toml"), progress=False)
    model = MPlus.from_pretrained(folder / "primed")
    state, start = model.initial_state(), MPlus.from_pretrained(folder / "s2").initial_state()
    k0 = model.memory_config.ltm_retrieved
    assert all(len(m) >= k0 for m in state.ltm)  # retrieval scores the LTM from the first question
    assert not torch.equal(state.stm, start.stm)  # filler written over the STM it started from


def test_stage_3_can_ship_a_primed_stm_with_an_empty_ltm(runs):
    folder = runs[0]
    for out, extra in (("kept", ""), ("forget", "forget_primed_ltm = true\n")):
        (folder / f"{out}.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out=out)
                                            + "prime_chunks = 30\n" + extra)
        train(RecallConfig.from_toml(folder / f"{out}.toml"), progress=False)
    state = MPlus.from_pretrained(folder / "forget").initial_state()
    primed = MPlus.from_pretrained(folder / "kept").initial_state()  # the same run without forgetting
    assert all(len(m) > 0 for m in primed.ltm)
    assert all(len(m) == 0 and len(m.cache) == 0 for m in state.ltm) and state.update_step == 0
    assert torch.equal(state.stm, primed.stm)  # the same filler written over the same STM


def test_stage_3_can_refill_the_emptied_ltm_with_filler(runs):
    folder = runs[0]
    (folder / "refill.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out="refill")
                                        + "prime_chunks = 30\nforget_primed_ltm = true\nrefill_chunks = 9\n")
    train(RecallConfig.from_toml(folder / "refill.toml"), progress=False)
    model = MPlus.from_pretrained(folder / "refill")
    state = model.initial_state()  # emptied after 30 chunks, then 9 more: two merges of filler rows since
    k0 = model.memory_config.ltm_retrieved
    assert all(len(m) > k0 for m in state.ltm)
    (folder / "kept.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out="few")
                                      + f"prime_chunks = 30\nforget_primed_ltm = true\nrefill_chunks = 9\nltm_rows = {k0}\n")
    train(RecallConfig.from_toml(folder / "kept.toml"), progress=False)
    few = MPlus.from_pretrained(folder / "few").initial_state()  # the same run, K0 rows kept of each layer's LTM
    for m, full in zip(few.ltm, state.ltm):
        assert len(m) == k0
        at = [int((full.rows == r).all(-1).nonzero()[0]) for r in m.rows]  # every kept row is one of the full LTM's
        assert at == sorted(set(at)) and torch.equal(m.ages, full.ages[at]) and torch.equal(m.rf, full.rf[at])
    (folder / "few.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out="none")
                                     + f"prime_chunks = 30\nforget_primed_ltm = true\nrefill_chunks = 9\nltm_rows = {k0 - 1}\n")
    with pytest.raises(ConfigError, match="never read"):
        train(RecallConfig.from_toml(folder / "few.toml"), progress=False)
    (folder / "bad.toml").write_text(RECALL.format(stage="memory3", init="s2", steps=2, delay=24, out="bad")
                                     + "refill_chunks = 9\n")
    with pytest.raises(ConfigError, match="forget_primed_ltm"):
        RecallConfig.from_toml(folder / "bad.toml")


def test_retention_benchmark_runs_on_a_trained_model(runs):
    """Mechanics, not quality (the model is a few steps old): shapes, the token distances, and that M+ equals
    MemoryLLM while its LTM is still empty (distance 0: nothing has been dropped yet)."""
    folder = runs[0]
    model = MPlus.from_pretrained(folder / "once")
    tokenizer = Tokenizer.from_file(folder / "once")
    result = run(model, tokenizer, seed=3, episodes=3, distances=[0, 2, 12], chunk_words=12, filler_words=6,
                 progress=False)
    acc = result["accuracy"]
    assert {"mplus", "memoryllm", "no_context"} <= set(acc) and all(len(v) == 3 for v in acc.values())
    assert result["tokens"][0] == 0 and result["tokens"][0] < result["tokens"][1] < result["tokens"][2]
    assert acc["mplus"][0] == acc["memoryllm"][0]
    got, stored, _, layers = result["recall"][2]  # after 12 chunks the fact's rows have reached the LTM
    assert stored > 0 and 0 <= got <= stored and layers > 0


def test_demo_runs_on_a_trained_model(runs):
    folder = runs[0]
    out = subprocess.run([sys.executable, "-m", "mplus", "demo", "--model", str(folder / "once"), "--chunks", "6",
                          "--facts", "2", "--chunk-words", "12"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "M+ answered" in out.stdout and "retrieved" in out.stdout and "MemoryLLM" in out.stdout


def test_labels_are_the_slots_a_chunk_was_written_to():
    g = torch.Generator().manual_seed(0)
    stm = torch.randn(10, 4, generator=g)
    block = stm[[2, 7]].clone()
    assert copies_of(stm, block).nonzero().flatten().tolist() == [2, 7]
    block[1, 0] += 1e-6  # a row that differs at all is not a copy
    assert copies_of(stm, block).nonzero().flatten().tolist() == [2]


def test_retriever_loss_is_the_balanced_bce():
    from types import SimpleNamespace

    from mplus.train.recall import retriever_loss
    # one layer whose projectors are identities: weights = sigmoid(q . k) averaged over the query tokens
    model = SimpleNamespace(memory_queries=lambda l, x: x, memory_keys=lambda l, x: x)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    stm = torch.tensor([[[2.0, 0.0], [0.0, -3.0], [1.0, 1.0]]])
    labels = torch.tensor([[True, False, False]])
    w = torch.sigmoid(q @ stm[0].t()).mean(0)
    want = (-torch.log(w[0] + 1e-5) + (-torch.log(1 - w[1:] + 1e-5)).mean()) / 2
    got = retriever_loss(model, [{"layer_input": q}], stm, labels, query_len=2)
    assert torch.allclose(got, want)


def _fake_model():
    from types import SimpleNamespace
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2, hidden_size=4, vocab_size=50),
                           memory_config=SimpleNamespace(num_tokens=3), dtype=torch.float32)


def _pending(**changes):
    tensors = {"pending.0.block": torch.ones(2, 3, 4), "pending.0.sentence": torch.tensor([5, 6, 49]),
               "pending.0.targets": torch.tensor([False, True, True])}
    return {**tensors, **changes}


def test_pending_questions_come_back_with_their_query_length():
    got = pending_from(_pending(), {"pending_steps": [7]}, _fake_model())
    assert len(got) == 1 and got[0]["query_len"] == 1 and got[0]["step"] == 7
    assert torch.equal(got[0]["sentence"], torch.tensor([5, 6, 49]))


@pytest.mark.parametrize("tensors, meta, message", [
    (_pending(), {"pending_steps": "7"}, "not a list of integers"),
    (_pending(), {"pending_steps": [7, 8]}, "pending.1.block is missing"),
    (_pending(), {"pending_steps": []}, "unexpected tensors: pending.0.block"),
    (_pending(**{"pending.0.block": torch.ones(2, 4, 4)}), {"pending_steps": [7]}, "block has shape"),
    (_pending(**{"pending.0.sentence": torch.tensor([5, 6, 50])}), {"pending_steps": [7]}, "outside this model's"),
    (_pending(**{"pending.0.targets": torch.tensor([True, True])}), {"pending_steps": [7]}, "targets has shape"),
    (_pending(**{"pending.0.sentence": torch.tensor([5., 6., 7.])}), {"pending_steps": [7]}, "dtype torch.float32"),
])
def test_damaged_pending_questions_are_refused(tensors, meta, message):
    with pytest.raises(TrainStateError, match=message):
        pending_from(tensors, meta, _fake_model())


def test_recall_stages_refuse_torchrun(monkeypatch, tmp_path):
    from mplus.train.distributed import DistributedError
    from mplus.train.recall import RecallConfig, train
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = RecallConfig(ltm=False, init=tmp_path, seed=0, steps=1, lr=0.0, selector_lr=1e-3, fact_ratio=0.3,
                          fresh_ratio=0.2, filler_words=4, chunk_words=8, max_delay=2, out=tmp_path / "out")
    with pytest.raises(DistributedError, match="without torchrun"):
        train(config)
