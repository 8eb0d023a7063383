"""M+ / MemoryLLM checkpoints in the official layout: loading, building from a plain Llama, saving.

The official files hold the weights (LoRA-wrapped projections as `<name>.base_layer.weight` with
`lora_A/lora_B.<adapter>.weight`, retriever `.0/.2.weight`, `bos_embedding`, `new_memory_positional_emb`)
and, beside them, a memory: `memory` [L, N, d] and for M+ `ltm.{l}`, `ltm_keys.{l}`, `ltm_ages.{l}`,
`ltm_recall_frequencies.{l}`. The memory becomes the model's checkpoint_state, a MemoryState.
A folder may instead hold only what training added over a named frozen base (memory/base_ref.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mplus.llama.config import ConfigError, LlamaConfig
from mplus.llama.sizes import check_sizes, header_shapes
from mplus.memory.sizes import memory_tensors
from mplus.llama.config_values import read_json_object
from mplus.formats.atomic import atomic_write_text
from mplus.memory import base_ref
from mplus.memory.lora import READ, WRITE, LoRALinear
from mplus.memory.ltm import LayerLTM
from mplus.memory.config import MemoryConfig
from mplus.llama.packing import materialize
from mplus.memory.state import MemoryState, StateError
from mplus.memory.state_check import check_stored
from mplus.formats.hf_folder import checkpoint_index, load_state_into, read_tensors, save_tensors

STATE_KEYS = ("memory", "initialized")  # MemoryLLM's `initialized` buffer becomes MemoryState.initialized
STATE_PREFIXES = ("ltm.", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.")


def is_state_key(name: str) -> bool:
    return name in STATE_KEYS or name.startswith(STATE_PREFIXES)


def is_memory_checkpoint(folder: str | Path) -> bool:
    """Whether a folder holds an M+ / MemoryLLM checkpoint (it has a `memory` tensor) rather than a plain Llama."""
    return "memory" in checkpoint_index(Path(folder))


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}; point at an M+ or MemoryLLM checkpoint folder")
    return read_json_object(path)


def new_state(model, stm: torch.Tensor, ltm, keys, ages, rf, seed: int = 0) -> MemoryState:
    """A state with the given STM [L, N, d] and LTM lists (None for MemoryLLM), zero STM ages, an empty cache."""
    d, d_s = stm.shape[2], model.memory_config.selector_hidden_dim
    records = None if ltm is None else [LayerLTM(r, k, a, f, LayerLTM.empty(d, d_s, stm.dtype).cache)
                                        for r, k, a, f in zip(ltm, keys, ages, rf)]
    return MemoryState(stm=stm, stm_ages=torch.zeros(stm.shape[:2], dtype=torch.long), ltm=records,
                       update_step=0, generator=torch.Generator().manual_seed(seed))


def load(cls, path: str | Path, dtype: torch.dtype, progress: bool, rope_bf16: bool, stored_memory: bool = True,
         base: str | Path | None = None):
    """cls built on the meta device, filled from an official-layout folder, with its stored memory if asked; a
    folder naming its base (base_ref) is filled from that base (`base`, else found by name), then from itself."""
    folder = Path(path)
    raw = read_config(folder)
    config, memory = LlamaConfig.from_dict(raw), MemoryConfig.from_dict(raw)
    ref = base_ref.reference(raw)
    shapes = header_shapes(checkpoint_index(folder))
    if ref is not None:
        base = base_ref.base_folder(ref, base)
        shapes = {**header_shapes(checkpoint_index(base)), **shapes}
    check_sizes(config, shapes, memory_tensors(config, memory))  # before the config's sizes are allocated
    with torch.device("meta"):
        model = cls(config, memory)
    materialize(model, dtype)
    tied = config.tie_word_embeddings
    names = [n for n, _ in model.named_parameters()] + (["lm_head.weight"] if tied else [])
    if ref is None:
        load_state_into(model, folder, progress=progress, optional=("lm_head.weight",) if tied else (),
                        rename=lambda n: None if is_state_key(n) or (tied and n == "lm_head.weight") else n)
    else:
        frozen = {base_ref.base_name(n): n for n in names if base_ref.is_base_weight(n)}
        load_state_into(model, base, progress=progress, rename=lambda n: None if tied and n == "lm_head.weight" else
                        frozen.get(n, n), optional=[n for n in names if n not in frozen.values() or
                                                    (tied and n == "lm_head.weight")])
        load_state_into(model, folder, optional=list(frozen.values()), rename=lambda n: None if is_state_key(n) else n)
    model.checkpoint_state = _stored_state(model, folder) if stored_memory else None
    if rope_bf16:
        model.inv_freq = model.inv_freq.bfloat16().float()
    return model.eval()


def _stored_state(model, folder: Path) -> MemoryState:
    n_layers, mem, d = model.config.num_hidden_layers, model.memory_config, model.config.hidden_size
    names = ["memory"] + ([f"{k}.{l}" for k in ("ltm", "ltm_keys", "ltm_ages", "ltm_recall_frequencies")
                           for l in range(n_layers)] if mem.kind == "mplus" else [])
    t = read_tensors(folder, names)
    try:  # lengths, dtypes and values, before any conversion: a bad memory fails here, not injections later
        check_stored(t, mem.kind, (n_layers, mem.stm_size, d), mem.selector_hidden_dim)
    except StateError as e:
        raise StateError(f"{folder}: the memory stored with this checkpoint is unusable: {e}; use an intact "
                         "copy of the checkpoint") from None
    stm = t["memory"]
    if mem.kind != "mplus":
        state = new_state(model, stm.to(model.dtype), None, None, None, None)
        if "initialized" in checkpoint_index(folder):  # the official MemoryLLM buffer; absent means in use
            flag = read_tensors(folder, ["initialized"])["initialized"]
            if flag.numel() != 1:
                raise ConfigError(f"'initialized' must hold one number (0 or 1), it has shape {tuple(flag.shape)}")
            state.initialized = bool(flag.item())
        return state

    def per(key):
        return [t[f"{key}.{l}"] for l in range(n_layers)]

    # The official loader casts every stored tensor to the load dtype, then takes ages as int32 (truncated)
    # and recall frequencies as fp32: in bf16, ages keep 8 significant bits, which can tie or reorder them.
    return new_state(model, stm.to(model.dtype), [x.to(model.dtype) for x in per("ltm")],
                     [x.to(model.dtype) for x in per("ltm_keys")],
                     [x.to(model.dtype).float().long() for x in per("ltm_ages")],
                     [x.to(model.dtype).float().double() for x in per("ltm_recall_frequencies")])


DRAW_CHUNK = 2**18  # values drawn at a time: a 1 MB fp32 temporary, whatever the memory's size


def draw_normal(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator,
                chunk: int = DRAW_CHUNK) -> torch.Tensor:
    """N(0, 1) values of `shape` in `dtype`, equal to torch.randn(shape, generator=g).to(dtype), drawn chunk by chunk.

    The memory of the released 8B is 1.3 G values: drawing it whole in fp32 before casting to bf16 would need
    5.4 GB more than the result. PyTorch's CPU normal sampler fills blocks of 16 values from the generator in
    order, so chunks of a multiple of 16 values (the last one at least 16) give the very same numbers as one draw;
    fp32 chunks are drawn straight into the result, others through a chunk-sized fp32 buffer.
    """
    out = torch.empty(shape, dtype=dtype)
    flat, n = out.view(-1), out.numel()
    step = max(16, chunk - chunk % 16)
    edges = list(range(0, n, step))
    if len(edges) > 1 and n - edges[-1] < 16:  # a short tail would be drawn differently from the whole: join it
        edges.pop()
    buffer = None if dtype == torch.float32 else torch.empty(min(n, step + 15), dtype=torch.float32)
    for start, end in zip(edges, edges[1:] + [n]):
        if buffer is None:
            flat[start:end].normal_(generator=g)
        else:
            flat[start:end] = buffer[:end - start].normal_(generator=g)
    return out


def from_llama(cls, path: str | Path, memory: MemoryConfig, seed: int, dtype: torch.dtype, bos: str = "embedding"):
    """A new memory model around a plain Llama folder, initialised as the official training recipe does
    (bos="hidden": the BOS rows from bos_layer_inputs instead of the BOS embedding)."""
    if bos not in ("embedding", "hidden"):
        raise ConfigError(f"unknown BOS initialisation {bos!r}; use 'embedding' (the official) or 'hidden'")
    folder = Path(path)
    config = LlamaConfig.from_file(folder)
    check_sizes(config, header_shapes(checkpoint_index(folder)))  # the memory's own sizes are bounded by its config
    if config.bos_token_id is None:
        raise ConfigError("the Llama config has no bos_token_id; the memory's BOS embedding starts from it")
    with torch.device("meta"):
        model = cls(config, memory)
    materialize(model, dtype)
    base = {base_ref.base_name(n): n for n, _ in model.named_parameters() if ".base_layer." in n}
    fresh = [n for n, _ in model.named_parameters() if not base_ref.is_base_weight(n)]
    load_state_into(model, folder, rename=lambda n: base.get(n, n),
                    optional=fresh + (["lm_head.weight"] if config.tie_word_embeddings else []))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.reset_adapter(WRITE, g), module.reset_adapter(READ, g)
        for layer in model.model.layers:
            for name in ("query_proj", "key_proj", "encoder_query_proj"):
                for linear in getattr(layer.self_attn, name, ()):
                    if isinstance(linear, nn.Linear):  # HF's _init_weights default
                        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.02)
        model.bos_embedding.copy_(model.model.embed_tokens.weight[config.bos_token_id].expand_as(model.bos_embedding))
        if bos == "hidden":  # the adapters are still the identity (B = 0): this is the plain base
            model.bos_embedding.copy_(bos_layer_inputs(model))
        model.new_memory_positional_emb.zero_()
    n_layers, d = config.num_hidden_layers, config.hidden_size
    stm = draw_normal((n_layers, memory.stm_size, d), dtype, g)  # [L, N, d]
    if memory.kind == "mplus":  # an empty long-term memory
        empty = [[torch.zeros(shape, dtype=t) for _ in range(n_layers)] for shape, t in
                 (((0, d), dtype), ((0, memory.selector_hidden_dim), dtype), ((0,), torch.long), ((0,), torch.float64))]
        model.checkpoint_state = new_state(model, stm, *empty)
    else:
        model.checkpoint_state = new_state(model, stm, None, None, None, None)
    return model.eval()


def save(model, path: str | Path, state: MemoryState, max_shard_bytes: int | None = None,
         base: dict | None = None) -> None:
    """config.json and the safetensors files in the official layout: weights, `memory` and the LTM of `state`.

    As mplus.formats.hf_folder.save_tensors: one model.safetensors, or shards of at most max_shard_bytes with an index; a save
    killed at any moment leaves the old or the new checkpoint, never a mix. With base = {"name", "sha256"} of the
    frozen base the model was trained on, only the tensors training added are stored (memory/base_ref.py).
    """
    folder = Path(path)
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    tensors["memory"] = state.stm
    if not state.has_ltm:  # MemoryLLM's buffer, as the official class saves it
        tensors["initialized"] = torch.tensor(int(state.initialized), dtype=torch.uint8)
    if state.has_ltm:
        for l, m in enumerate(state.ltm):
            tensors[f"ltm.{l}"], tensors[f"ltm_keys.{l}"] = m.rows, m.keys
            tensors[f"ltm_ages.{l}"] = m.ages.float()
            tensors[f"ltm_recall_frequencies.{l}"] = m.rf.float()
    if base is not None:
        base_ref.reference({base_ref.BASE_KEY: base})  # checked as a load would check it
        tensors = base_ref.shipped_tensors({n: t for n, t in tensors.items()
                                            if is_state_key(n) or not base_ref.is_base_weight(n)})
    save_tensors(tensors, folder, max_shard_bytes)
    ltm_size = max((len(m) for m in state.ltm), default=0) if state.has_ltm else 0
    config = config_dict(model.config, model.memory_config, ltm_size)
    if base is not None:
        config[base_ref.BASE_KEY] = base
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def config_dict(config: LlamaConfig, memory: MemoryConfig, ltm_size: int) -> dict:
    """The config.json of a checkpoint in the official layout, naming the official class (MPlus, MemoryLLM); an M+
    one records the LTM rows per layer stored beside it (ltm_initial_size), as the official code does."""
    mplus = memory.kind == "mplus"
    out = {**config.to_dict(), **memory.to_dict(), "architectures": ["MPlus" if mplus else "MemoryLLM"]}
    if mplus:
        out["ltm_initial_size"] = ltm_size
    return out


def bos_layer_inputs(model) -> torch.Tensor:
    """[L, 1, d]: what each layer of the plain base reads at a BOS that opens a sequence (position 0): the
    embedding for layer 0, layer l - 1's output after it. These are the base's attention sinks, with norms of
    hundreds to tens of thousands in SmolLM2, where the BOS embedding has a norm of about 3."""
    ids = torch.tensor([model.config.bos_token_id])
    cos, sin = model._cos_sin(torch.arange(1))  # [1, D] each
    inputs = []

    def record(l: int, x: torch.Tensor) -> torch.Tensor:
        inputs.append(x[0])  # [1, d]
        return x
    with torch.no_grad():
        model.model.run_layers(model.model.embed_tokens(ids)[None], cos, sin, layer_input=record, adapter=None)
    return torch.stack(inputs)  # [L, 1, d]
