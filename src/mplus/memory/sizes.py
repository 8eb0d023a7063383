"""The tensors an official M+ / MemoryLLM checkpoint holds beyond the Llama's, sized by the memory config, so that
mplus.llama.sizes.check_sizes can compare them with the file headers before anything is allocated."""
from __future__ import annotations

from typing import Iterator

from mplus.llama.config import LlamaConfig
from mplus.llama.sizes import Expected, dims, projections
from mplus.memory.config import MemoryConfig
from mplus.memory.lora import READ, WRITE

ADAPTERS = (WRITE, READ)


def memory_tensors(config: LlamaConfig, memory: MemoryConfig) -> Iterator[Expected]:
    """The tensors of an official M+ / MemoryLLM checkpoint that the memory fields size (arXiv 2502.00592 sec. 3)."""
    d, m = dims(config)["d"], memory
    n_layers = (config.num_hidden_layers, f"field 'num_hidden_layers' = {config.num_hidden_layers}")
    rows = (m.stm_size, f"fields (num_blocks - num_ltm_blocks) x num_tokens = "
                        f"({m.num_blocks} - {m.num_ltm_blocks}) x {m.num_tokens}")
    one = (1, "layout (a fixed 1)")
    r = (m.lora_r, f"field 'lora_config.r' = {m.lora_r}")
    d_s = (m.selector_hidden_dim, f"field 'selector_hidden_dim' = {m.selector_hidden_dim}")
    hidden_s = (2 * m.selector_hidden_dim, f"2 x selector_hidden_dim = 2 x {m.selector_hidden_dim}")
    yield "memory", (n_layers, rows, d)
    yield "bos_embedding", (n_layers, one, d)
    yield "new_memory_positional_emb", (one, one, d)
    shapes = projections(config)
    retrievers = ("query_proj", "key_proj") + (("encoder_query_proj",) if m.add_encoder_retriever else ())
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for proj in m.lora_targets:
            parent, out, inp = shapes[proj]
            for adapter in ADAPTERS:
                yield f"{prefix}{parent}.{proj}.lora_A.{adapter}.weight", (r, inp)
                yield f"{prefix}{parent}.{proj}.lora_B.{adapter}.weight", (out, r)
        if m.kind != "mplus":
            continue
        for proj in retrievers:  # retriever.projector: Linear(d, 2 d_s), SiLU, Linear(2 d_s, d_s); or Linear(d, d_s)
            if m.num_selector_layers == 2:
                yield f"{prefix}self_attn.{proj}.0.weight", (hidden_s, d)
                yield f"{prefix}self_attn.{proj}.2.weight", (d_s, hidden_s)
            else:
                yield f"{prefix}self_attn.{proj}.0.weight", (d_s, d)
