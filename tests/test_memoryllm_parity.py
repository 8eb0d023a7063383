"""Parity with the official MemoryLLM class (arXiv 2402.04624): replay the call sequence recorded in
tests/fixtures/official-memoryllm-tiny/ (its README, section 5) and compare every fixture: forwards, the 8
injections (block, every layer's outputs, the pool after each), both greedy generations with the logits of every
step, the uninitialized pool and the shared-permutation drop. Floats within 1e-4 in fp32; permutations,
kept/dropped indices and generated ids exactly. The expected values are read from the fixture files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import OFFICIAL_MEMORYLLM_TINY as FIXTURES
from mplus import ConfigError
from mplus.memory.stm import draw_drop
from mplus.memory.mplus import MPlus
from mplus.llama.rope import default_inv_freq, rope_cos_sin
from mplus.memory.state import MemoryState
from parity import Diffs, exact, greedy_with_logits

DIFFS = Diffs(tol=1e-4)  # worst float difference per fixture file and quantity, printed at the end (pytest -s)
FILES = ("a_forward_initial", "b_injections", "d_forward_after_injection", "e_generate", "s_shared_drop",
         "u_uninitialized")


@pytest.fixture(scope="module")
def fx():
    return json.loads((FIXTURES / "fixtures.json").read_text()), {n: load_file(FIXTURES / f"{n}.safetensors")
                                                                  for n in FILES}


@pytest.fixture(scope="module")
def model():
    return MPlus.from_pretrained(FIXTURES / "checkpoint")


def checkpoint_copy(tmp_path, edit_config=None, edit_tensors=None):
    """The fixture checkpoint copied to tmp_path, with its config and tensors edited in place."""
    folder = shutil.copytree(FIXTURES / "checkpoint", tmp_path / "ckpt")
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors")
    return folder


def check_forward(model, state, f, prefix, file):
    """Logits, every layer's input, the last layer's output and the final norm of a recorded forward."""
    record = []
    logits = model(state, f[f"{prefix}/input_ids"], record=record)
    DIFFS.close(f"{file}: logits", logits, f[f"{prefix}/logits"])
    for l, r in enumerate(record):
        DIFFS.close(f"{file}: hidden states", r["layer_input"][None], f[f"{prefix}/hidden_states.{l}"])
    last = record[-1]["layer_output"][None]  # [1, T, d]
    DIFFS.close(f"{file}: layer outputs", last, f[f"{prefix}/layer_output.{len(record) - 1}"])
    DIFFS.close(f"{file}: hidden states", model.model.norm(last), f[f"{prefix}/hidden_states.{len(record)}"])


def check_injection(model, state, f, prefix, file, seed=None, draws_per_injection=3):
    """One recorded inject_memory: the seed's permutations, the returned block, every layer's outputs, the pool."""
    K, N = model.memory_config.num_tokens, model.memory_config.stm_size
    if seed is not None:  # the recorded seed reproduces the recorded permutations (one randperm(N) per draw)
        g = torch.Generator().manual_seed(seed)
        perms = torch.stack([torch.randperm(N, generator=g) for _ in range(draws_per_injection)])
        exact(f"{prefix} randperm", perms, f[f"{prefix}/randperm"])
        g = torch.Generator().manual_seed(seed)
        draws = [draw_drop(N, K, g) for _ in range(draws_per_injection)]
        exact(f"{prefix} remaining", torch.stack([k for k, _ in draws]), f[f"{prefix}/remaining_indices"])
        exact(f"{prefix} dropped", torch.stack([x for _, x in draws]), f[f"{prefix}/dropped_indices"])
    chunk, record = f[f"{prefix}/context_ids"], []
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    before = generator.get_state()
    delta = model.inject(state, chunk, generator=generator, allow_short=True, record=record)
    if seed is None:  # the uninitialized pool is tiled: no random draw at all
        assert torch.equal(generator.get_state(), before)
    DIFFS.close(f"{file}: delta memory", delta[None], f[f"{prefix}/delta_memory"])
    for l, r in enumerate(record):
        DIFFS.close(f"{file}: layer outputs", r["layer_output"][None], f[f"{prefix}/layer_output.{l}"])
    DIFFS.close(f"{file}: memory after", state.stm, f[f"{prefix}/memory_after"])


def test_checkpoint_loads_as_memoryllm(model, fx):
    assert model.memory_config.kind == "memoryllm" and model.memory_config.drop_memory_per_layer
    state = model.initial_state()
    assert not state.has_ltm and state.initialized
    DIFFS.close("a_forward_initial: memory", state.stm, fx[1]["a_forward_initial"]["a/memory"])


def test_rope_is_linear_scaling_of_the_official_frequencies(model, fx):
    meta, f = fx
    want = f["a_forward_initial"]["rope_inv_freq"]
    exact("rope inv_freq", default_inv_freq(model.config.head_dim, model.config.rope_theta), want)
    positions = torch.arange(0, 64)  # every position the fixtures use (at most 33 + 9 + 16)
    angles = (positions.float() / meta["rope_position_scaling_factor"])[:, None] * want[None]  # official order
    cos, sin = rope_cos_sin(model.inv_freq, positions)
    DIFFS.close("a_forward_initial: rope cos", cos, torch.cat((angles, angles), -1).cos())
    DIFFS.close("a_forward_initial: rope sin", sin, torch.cat((angles, angles), -1).sin())


def test_forwards_injections_and_generations(model, fx):
    meta, f = fx
    b, d, e = f["b_injections"], f["d_forward_after_injection"], f["e_generate"]
    state = model.initial_state()
    check_forward(model, state, f["a_forward_initial"], "a", "a_forward_initial")
    for i, seed in enumerate(meta["inject_seeds"], start=1):
        check_injection(model, state, b, f"inj{i}", "b_injections", seed)
        check_forward(model, state, d, f"after_inj{i}", "d_forward_after_injection")
        if f"after_inj{i}/prompt_ids" in e:
            prompt = e[f"after_inj{i}/prompt_ids"]
            new, logits = greedy_with_logits(model, state, prompt, 16)
            exact(f"generate after {i}", torch.tensor(prompt[0].tolist() + new), e[f"after_inj{i}/sequences"][0])
            DIFFS.close("e_generate: step logits", logits, e[f"after_inj{i}/step_logits"])


def test_uninitialized_pool_reads_nothing_then_tiles_the_first_block(model, fx):
    u = fx[1]["u_uninitialized"]
    state = model.initial_state()
    state.initialized = False  # as the official `model.initialized.zero_()`
    check_forward(model, state, u, "u/before", "u_uninitialized")
    check_injection(model, state, u, "u/inj", "u_uninitialized")
    assert state.initialized
    check_forward(model, state, u, "u/after", "u_uninitialized")


def test_checkpoint_initialized_flag_sets_the_state(tmp_path, fx):
    folder = checkpoint_copy(tmp_path, edit_tensors=lambda t: t.update(initialized=torch.tensor(0, dtype=torch.uint8)))
    model = MPlus.from_pretrained(folder)
    state = model.initial_state()
    assert not state.initialized
    check_forward(model, state, fx[1]["u_uninitialized"], "u/before", "u_uninitialized")
    model.save_pretrained(tmp_path / "saved", state)
    assert load_file(tmp_path / "saved" / "model.safetensors")["initialized"].item() == 0
    state.save(tmp_path / "state.safetensors")  # a state file keeps the flag too
    assert not MemoryState.load(tmp_path / "state.safetensors", expect=model.state_spec()).initialized


def test_shared_drop_uses_one_permutation_for_all_layers(tmp_path, fx):
    meta, f = fx
    folder = checkpoint_copy(tmp_path, edit_config=lambda c: c.update(drop_memory_per_layer=False))
    model = MPlus.from_pretrained(folder)
    state = model.initial_state()
    for j, seed in enumerate(meta["shared_drop_seeds"], start=1):
        check_injection(model, state, f["s_shared_drop"], f"s/inj{j}", "s_shared_drop", seed, draws_per_injection=1)
        check_forward(model, state, f["s_shared_drop"], f"s/after_inj{j}", "s_shared_drop")


def test_block_counts_whose_official_drop_is_not_one_block_are_refused(tmp_path):
    # int(49 * 8 * (1 / 49)) == 7 in floating point: the official pool would grow by a row at every update
    folder = checkpoint_copy(tmp_path, edit_config=lambda c: c.update(num_blocks=49))
    with pytest.raises(ConfigError, match="drop 7 rows per update instead of 8"):
        MPlus.from_pretrained(folder)


def test_official_layout_saves_back_identically(model, tmp_path):
    model.save_pretrained(tmp_path)
    original = load_file(FIXTURES / "checkpoint" / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert set(original) == set(saved)
    for name, t in original.items():
        assert torch.equal(t, saved[name]), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MemoryLLM"] and "ltm_initial_size" not in config


def test_report_worst_differences():
    """Prints the worst float difference per fixture file and quantity (run with -s to see it)."""
    DIFFS.report("worst |diff| against the official MemoryLLM fixtures:")
