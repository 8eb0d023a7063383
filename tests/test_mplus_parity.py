"""Parity with the official M+ implementation: replay the recorded call sequence of
tests/fixtures/official-mplus-tiny/ and compare every fixture (floats within 1e-4 in fp32; indices, sizes,
ages, recall frequencies and generated ids exactly). The expected values are read from the fixture files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import OFFICIAL_TINY
from mplus import ConfigError, MemoryConfig
from mplus.memory.stm import draw_drop
from mplus.memory.mplus import MPlus
from parity import Diffs, exact, greedy_with_logits

FIXTURES = OFFICIAL_TINY
DIFFS = Diffs(tol=1e-4)  # worst float difference per fixture family, printed at the end (pytest -s)
close = DIFFS.close


@pytest.fixture(scope="module")
def fx():
    if not FIXTURES.is_dir():
        pytest.fail(f"fixtures not found at {FIXTURES}")
    files = {n: load_file(FIXTURES / f"{n}.safetensors") for n in
             ("a_forward_initial", "a2_forward_small_ltm_cyclic", "b_injections", "c_ltm_states",
              "d_forward_retrieval", "e_generate")}
    return json.loads((FIXTURES / "fixtures.json").read_text()), files


@pytest.fixture(scope="module")
def model():
    return MPlus.from_pretrained(FIXTURES / "checkpoint")


def check_retrieval(record, f, prefix):
    for l, r in enumerate(record):
        exact(f"{prefix} layer {l} source", r["retrieved"].source, f[f"{prefix}/retrieval/layer{l}/final_source"])
        exact(f"{prefix} layer {l} index", r["retrieved"].index, f[f"{prefix}/retrieval/layer{l}/final_index"])


def check_forward(model, state, f, prefix, name):
    rec = []
    logits = model(state, f[f"{prefix}/input_ids"], record=rec)
    close(f"{name} logits", logits, f[f"{prefix}/logits"])
    for l, r in enumerate(rec):
        close(f"{name} hidden states", r["layer_input"][None], f[f"{prefix}/hidden_states.{l}"])
    check_retrieval(rec, f, prefix)


def check_state(state, c, prefix):
    close("stm", state.stm, c[f"{prefix}/memory"])
    exact(f"{prefix} stm ages", state.stm_ages, c[f"{prefix}/memory_ages"])
    for l, m in enumerate(state.ltm):
        close("ltm rows", m.rows, c[f"{prefix}/ltm.{l}"])
        close("ltm keys", m.keys, c[f"{prefix}/ltm_keys.{l}"])
        exact(f"{prefix} ltm ages {l}", m.ages, c[f"{prefix}/ltm_ages.{l}"])
        exact(f"{prefix} ltm rf {l}", m.rf, c[f"{prefix}/ltm_recall_frequencies.{l}"])
    if f"{prefix}/cached_dropped_memories" in c:
        close("cache rows", torch.stack([m.cache.rows for m in state.ltm]), c[f"{prefix}/cached_dropped_memories"])
        close("cache keys", torch.stack([m.cache.keys for m in state.ltm]), c[f"{prefix}/cached_dropped_keys"])
        exact(f"{prefix} cache ages", torch.stack([m.cache.ages for m in state.ltm]),
              c[f"{prefix}/cached_dropped_memory_ages"])
    else:
        assert all(len(m.cache) == 0 for m in state.ltm)


def test_rope_frequencies(model, fx):
    close("rope", model.inv_freq, fx[1]["a_forward_initial"]["rope_inv_freq"])


def test_initial_forward_and_state(model, fx):
    meta, f = fx
    state = model.initial_state()
    check_state(state, f["c_ltm_states"], "state0")
    check_forward(model, state, f["a_forward_initial"], "a", "forward")


def test_small_ltm_cyclic_fill(model, fx):
    _, f = fx
    state = model.initial_state()
    for m in state.ltm:  # every LTM truncated to 12 rows, as recorded
        m.rows, m.keys, m.ages, m.rf = m.rows[:12], m.keys[:12], m.ages[:12], m.rf[:12]
    check_forward(model, state, f["a2_forward_small_ltm_cyclic"], "a2", "cyclic forward")


def test_injections_merges_retrieval_and_generation(model, fx):
    meta, f = fx
    b, c, d, e = (f[k] for k in ("b_injections", "c_ltm_states", "d_forward_retrieval", "e_generate"))
    state = model.initial_state()
    K, N = model.memory_config.num_tokens, model.memory_config.stm_size
    for i, seed in enumerate(meta["inject_seeds"], start=1):
        p = f"inj{i}"
        # The recorded seeds reproduce the recorded permutations (one randperm(N) per layer, layer 0 first).
        g = torch.Generator().manual_seed(seed)
        draws = [draw_drop(N, K, g) for _ in range(state.num_layers)]
        exact(f"{p} remaining", torch.stack([k for k, _ in draws]), b[f"{p}/remaining_indices"])
        exact(f"{p} dropped", torch.stack([x for _, x in draws]), b[f"{p}/dropped_indices"])
        chunk = b[f"{p}/context_ids"]
        delta = model.inject(state, chunk, generator=torch.Generator().manual_seed(seed),
                             allow_short=chunk.shape[1] < 16)
        close("delta memory", delta[None], b[f"{p}/delta_memory"])
        close("stm", state.stm, b[f"{p}/memory_after"])
        exact(f"{p} stm ages", state.stm_ages, b[f"{p}/memory_ages_after"])
        check_state(state, c, f"after_inj{i}")
        assert state.update_step == meta["fixtures"]["c_ltm_states"][i - 1]["update_step"]
        check_forward(model, state, d, f"after_inj{i}", "retrieval forward")
        if f"after_inj{i}/prompt_ids" in e:
            prompt = e[f"after_inj{i}/prompt_ids"]
            new, logits = greedy_with_logits(model, state, prompt, 8)
            exact(f"generate after {i}", torch.tensor(prompt[0].tolist() + new), e[f"after_inj{i}/sequences"][0])
            close("generation step logits", logits, e[f"after_inj{i}/step_logits"])


def test_report_worst_differences():
    """Prints the worst float difference per fixture family (run with -s to see it)."""
    DIFFS.report("worst |diff| against the official M+ fixtures:")


def test_merged_read_adapter_reads_the_same(fx):
    f = fx[1]["d_forward_retrieval"]
    merged = MPlus.from_pretrained(FIXTURES / "checkpoint")
    merged.merge_read_adapter()
    plain = MPlus.from_pretrained(FIXTURES / "checkpoint")
    ids = f["after_inj1/input_ids"]
    assert (merged(merged.initial_state(), ids) - plain(plain.initial_state(), ids)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="merged"):
        merged.inject(merged.initial_state(), torch.arange(20))


def test_document_injection_chunks_from_the_end(model):
    state, ref = model.initial_state(), model.initial_state()
    ids = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(0))
    # cut from the end: 10 + 40 + 40; the 10-token first piece (< 16) joins the next chunk: 50 + 40
    assert model.inject_document(state, ids, chunk_size=40, progress=False) == 2
    for piece in (ids[:50], ids[50:]):
        model.inject(ref, piece)
    assert torch.equal(state.stm, ref.stm)


BF16_TOL = 0.05  # bf16 against the fp32 fixtures: |diff| <= 5 % of the largest |value| (measured <= 2.9 %)


def test_bf16_forward_and_injection_follow_the_fp32_fixtures(fx):
    """The dtype of the released models: a bf16 load answers and writes as the fp32 official run, within bf16
    rounding (8 significant bits through 3 layers), and retrieves the same rows in the same order."""
    meta, f = fx
    a, b, d = f["a_forward_initial"], f["b_injections"], f["d_forward_retrieval"]
    model = MPlus.from_pretrained(FIXTURES / "checkpoint", dtype=torch.bfloat16)
    state = model.initial_state()

    def near(name, got, want):
        diff, scale = (got.double() - want.double()).abs().max().item(), want.abs().max().item()
        assert got.shape == want.shape and diff <= BF16_TOL * scale, f"{name}: max |diff| {diff:.3g}, scale {scale:.3g}"

    for prefix, fixture in (("a", a), ("after_inj1", d)):
        if prefix == "after_inj1":
            delta = model.inject(state, b["inj1/context_ids"], generator=torch.Generator().manual_seed(
                meta["inject_seeds"][0]), allow_short=True)
            near("bf16 delta memory", delta[None], b["inj1/delta_memory"])
            near("bf16 stm", state.stm, b["inj1/memory_after"])
        rec = []
        logits = model(state, fixture[f"{prefix}/input_ids"], record=rec)
        near(f"bf16 {prefix} logits", logits, fixture[f"{prefix}/logits"])
        check_retrieval(rec, fixture, prefix)


def test_bf16_load_rounds_ltm_ages_and_recall_frequencies_as_the_official_loader(tmp_path):
    """The official bf16 path casts the stored LTM to bf16 before taking ages as integers and recall frequencies
    as fp32 (arXiv 2502.00592 code, `put_ltm_to_numpy`). Ages 1024 + 8k + 1 become 1024 + 8k in bf16 and tie with
    their neighbour 1024 + 8k, so the retrieved rows of each pair swap places (ties: the later row first), which
    moves their RoPE positions and changes the answer."""
    tensors = {k: v.bfloat16() if v.is_floating_point() else v
               for k, v in load_file(FIXTURES / "checkpoint" / "model.safetensors").items()}
    exact_ages = torch.tensor([1024 + 8 * (i // 2) + (1 - i % 2) for i in range(20)], dtype=torch.float32)
    tensors["ltm_ages.0"] = exact_ages  # stored in fp32, exactly, beside bf16 weights
    tensors["ltm_recall_frequencies.0"] = torch.full((20,), 3.3)  # 3.296875 in bf16
    folder = shutil.copytree(FIXTURES / "checkpoint", tmp_path / "bf16", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, folder / "model.safetensors")

    model = MPlus.from_pretrained(folder, dtype=torch.bfloat16)
    state = model.initial_state()
    exact("bf16 ages", state.ltm[0].ages, torch.tensor([1024 + 8 * (i // 2) for i in range(20)]))
    exact("bf16 rf", state.ltm[0].rf, torch.full((20,), 3.296875))
    assert state.ltm[0].rf.dtype == torch.float64 and state.ltm[0].ages.dtype == torch.int64

    as_stored = state.copy()
    as_stored.ltm[0].ages = exact_ages.long()
    ids, rounded, stored = torch.arange(3, 12), [], []
    logits_rounded, logits_stored = model(state, ids, record=rounded), model(as_stored, ids, record=stored)
    assert set(rounded[0]["retrieved"].index.tolist()) == set(stored[0]["retrieved"].index.tolist())  # the same rows...
    assert not torch.equal(rounded[0]["retrieved"].index, stored[0]["retrieved"].index)  # ...fed in another order
    assert not torch.equal(logits_rounded, logits_stored)


def test_mplus_drops_per_layer_whatever_the_config_says(tmp_path, fx):
    """The official M+ stores drop_memory_per_layer but never reads it: one permutation per layer, always."""
    meta, f = fx
    folder = shutil.copytree(FIXTURES / "checkpoint", tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "drop_memory_per_layer": False}))
    model = MPlus.from_pretrained(folder)
    state = model.initial_state()
    model.inject(state, f["b_injections"]["inj1/context_ids"], generator=torch.Generator().manual_seed(
        meta["inject_seeds"][0]), allow_short=True)
    close("stm", state.stm, f["b_injections"]["inj1/memory_after"])
    with pytest.raises(ConfigError, match="MemoryLLM only"):
        MemoryConfig(kind="mplus", num_tokens=8, num_blocks=6, num_ltm_blocks=2, drop_memory_per_layer=False)
