"""The checks MPlus runs on what it is given before it reads or writes a memory: token ids and a memory state.

Notation: L layers, N STM rows, d hidden size, d_s key size.
"""
from __future__ import annotations

import torch

from mplus.llama.generate import prompt_tensor


def check_ids(model, ids, strip_bos: bool, what: str) -> torch.Tensor:
    """ids (a list, or a [T] / [1, T] tensor) as a CPU tensor [T] without the BOS, or ValueError naming the problem."""
    try:
        ids = prompt_tensor(ids)[0].cpu()  # [T]
    except ValueError:
        raise ValueError(f"the {what} must be a non-empty list of token ids (or a [T] / [1, T] tensor)") from None
    bos = model.config.bos_token_id
    # A model trained on chat prompts (task "people", SmolLM2's ChatML) reads them whole: there the BOS id is
    # <|im_start|>, which opens every chat turn, the first one included.
    if bos is not None and int(ids[0]) == bos and not (model.memory_config.task == "people" and not strip_bos):
        if not strip_bos:
            raise ValueError(f"the {what} starts with BOS ({bos}); M+ supplies its own BOS embedding, so encode "
                             "without special tokens (or pass strip_bos=True)")
        ids = ids[1:]
    if ids.numel() == 0:
        raise ValueError(f"the {what} is empty")
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise ValueError(f"a token id of the {what} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    return ids


def check_state(model, state) -> None:
    """ValueError unless `state` fits the model: STM and LTM shapes, kind, and where its parts live."""
    L, d, d_s = model.config.num_hidden_layers, model.config.hidden_size, model.memory_config.selector_hidden_dim
    want = (L, model.memory_config.stm_size, d)
    if tuple(state.stm.shape) != want or tuple(state.stm_ages.shape) != want[:2]:
        raise ValueError(f"this memory state has STM shape {tuple(state.stm.shape)} (ages "
                         f"{tuple(state.stm_ages.shape)}), the model needs {want}: it belongs to another model")
    check_placement(model, state)
    if not state.has_ltm:
        return
    if not state.initialized:
        raise ValueError("this state has a long-term memory but is marked uninitialized, which only MemoryLLM has")
    if model.memory_config.kind != "mplus":
        raise ValueError("this state has a long-term memory, but the model is MemoryLLM (no retriever)")
    if len(state.ltm) != L:
        raise ValueError(f"this state's long-term memory does not have one record per layer ({L})")
    for l, m in enumerate(state.ltm):
        if m.rows.shape[1:] != (d,) or m.cache.rows.shape[1:] != (d,) \
                or m.keys.shape[1:] != (d_s,) or m.cache.keys.shape[1:] != (d_s,):
            raise ValueError(f"layer {l} of this state's long-term memory has rows or keys of the wrong width "
                             f"(the model needs d = {d}, d_s = {d_s}): it belongs to another model")


def check_placement(model, state) -> None:
    """ValueError unless the state computes where the model does and its tensors lie where its placement says."""
    p = state.placement
    if p.device != model.placement.device:
        raise ValueError(f"this memory state's STM is on {p.device}, the model on {model.placement.device}: move it "
                         "with state = state.to(model.placement), or load it with MemoryState.load(..., "
                         "placement=model.placement)")
    parts = [("STM", state.stm, p.device), ("STM ages", state.stm_ages, p.device)]
    for m in state.ltm or ():
        parts += [("LTM rows", m.rows, p.ltm_device), ("LTM ages", m.ages, p.ltm_device), ("LTM rf", m.rf, p.ltm_device),
                  ("cached rows", m.cache.rows, p.ltm_device), ("cached ages", m.cache.ages, p.ltm_device),
                  ("LTM keys", m.keys, p.keys_device), ("cached keys", m.cache.keys, p.keys_device)]
    for name, t, device in parts:
        if t.device != device:
            raise ValueError(f"this memory state's {name} are on {t.device}, but its placement ({p}) says {device}: "
                             "a tensor was replaced by hand; move the state with state.to(placement)")
