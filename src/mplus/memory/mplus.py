"""MemoryLLM and M+ on the hand-written Llama: one code path, the memory held in an explicit MemoryState.

Every layer l reads a prefix of hidden states that gives keys and values only (never queried):

    generation:  [bos_embedding[l] (pos 0), retrieved LTM rows (pos 1..K0, M+ only), STM[l] (pos 1+K0..K0+N)]
    injection:   [bos_embedding[l] (pos 0), the last K rows of STM[l] (pos 1..K)]

and the input tokens follow at positions P = 1 + num_blocks*K onwards (injection: K+1 onwards). Injection
runs the write adapter and returns, per layer, the last K outputs: the new memory block, which replaces K
random STM rows; M+ moves the dropped rows to a cache that is merged into the LTM every few updates.
Generation runs the read adapter and, in M+, retrieves K0 LTM rows per layer, once, from the prompt.
A MemoryLLM state that is not yet initialized has no prefix at all (positions from 0) until its first
injection, whose block is tiled over the whole STM (docs/departures.md lists where we differ from the official code).

Notation: L layers, T tokens, N STM rows, K rows per update, K0 retrieved rows, d hidden size, d_s key size.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from mplus.llama.config import LlamaConfig
from mplus.llama.generate import collect, decode_loop, new_token_budget
from mplus.llama.kv_cache import KVCache
from mplus.llama.model import Decoder
from mplus.llama.rope import inv_freq_for, rope_cos_sin
from mplus.memory import checkpoint as mplus_checkpoint
from mplus.memory.config import MemoryConfig
from mplus.memory.fingerprint import weights_fingerprint
from mplus.memory.inputs import check_ids, check_state
from mplus.memory.lora import READ, WRITE, LoRALinear, wrap_with_lora
from mplus.memory.ltm import cache_dropped_rows, merge_into_ltm
from mplus.memory.placement import HOST, Placement
from mplus.memory.prefix import memory_prefix, prefix_cache
from mplus.memory.retriever import Retrieved, nothing_retrieved, projector, retrieve
from mplus.memory.state import MemoryState
from mplus.memory.stm import drop_and_append, first_write

MIN_CHUNK = 16  # the shortest chunk the official training ever injected


class MPlus(nn.Module):
    def __init__(self, config: LlamaConfig, memory: MemoryConfig):
        super().__init__()
        self.config, self.memory_config = config, memory
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        d, d_s = config.hidden_size, memory.selector_hidden_dim
        for layer in self.model.layers:
            wrap_with_lora(layer.self_attn, [t for t in ("q_proj", "k_proj", "v_proj") if t in memory.lora_targets],
                           memory.lora_r, memory.lora_alpha)
            wrap_with_lora(layer.mlp, [t for t in ("gate_proj", "up_proj", "down_proj") if t in memory.lora_targets],
                           memory.lora_r, memory.lora_alpha)
            if memory.kind == "mplus":
                layer.self_attn.query_proj = projector(d, d_s, memory.num_selector_layers)  # f_q
                layer.self_attn.key_proj = projector(d, d_s, memory.num_selector_layers)  # f_k
                if memory.add_encoder_retriever:  # trained, never used at inference; kept for training
                    layer.self_attn.encoder_query_proj = projector(d, d_s, memory.num_selector_layers)
        self.bos_embedding = nn.Parameter(torch.zeros(config.num_hidden_layers, 1, d))  # [L, 1, d]
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))  # [1, 1, d]
        self.inv_freq = inv_freq_for(config)  # [D/2], fp32 (see model.py)
        self.checkpoint_state: MemoryState | None = None  # the memory stored with the weights
        self.placement = HOST  # where the weights and new states' parts live (place)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
                        rope_bf16: bool = False, base: str | Path | None = None, stored_memory: bool = True,
                        device: torch.device | str = "cpu", ltm_keys: str = "device") -> "MPlus":
        """Load an official-layout M+ or MemoryLLM folder (weights plus the memory stored with them).

        rope_bf16: round the RoPE inverse frequencies to bf16 as the official bf16 path does (docs/departures.md).
        base: the frozen base's folder for a folder that names one (memory/base_ref.py; default: found by name).
        stored_memory False: leave the stored memory on disk (checkpoint_state None; 3.4 GB less at 8B sizes).
        device, ltm_keys: where the model computes and its LTM keys live (see place).
        """
        return mplus_checkpoint.load(cls, path, dtype, progress, rope_bf16, stored_memory, base).place(device, ltm_keys)

    @classmethod
    def from_llama(cls, path: str | Path, memory: MemoryConfig, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32, bos: str = "embedding") -> "MPlus":
        """A new M+ / MemoryLLM around a plain Llama checkpoint, initialised as the official training recipe:
        memory ~ N(0, 1); bos_embedding[l] = embedding of BOS; new_memory_positional_emb = 0; LoRA A
        Kaiming-uniform, B = 0; retriever weights ~ N(0, 0.02); empty LTM. bos="hidden": bos_embedding[l] is
        instead what layer l of the base reads at BOS (checkpoint.bos_layer_inputs), the base's attention sink."""
        return mplus_checkpoint.from_llama(cls, path, memory, seed, dtype, bos)

    def place(self, device: torch.device | str = "cpu", ltm_keys: str = "device") -> "MPlus":
        """Put the weights, the stored STM and the STM's prefix keys/values on `device`; the LTM rows and the
        dropped-row cache stay in host memory, their retriever keys on the device (ltm_keys="device": fast scoring,
        S x d_s device memory per layer) or the host ("host": scoring on the CPU). Returns the model; states from
        initial_state follow it. See docs/placement.md."""
        self.placement = Placement.on(device, ltm_keys)
        self.to(self.placement.device)
        self.inv_freq = self.inv_freq.to(self.placement.device)
        if self.checkpoint_state is not None:
            self.checkpoint_state = self.checkpoint_state.to(self.placement)
        return self

    def initial_state(self, seed: int = 0, take: bool = False) -> MemoryState:
        """The memory stored with the weights, as a new state; `seed` seeds the generator of its STM drops.

        The state shares the stored tensors instead of copying them (at the released 8B sizes the STM alone is
        2.7 GB in bf16): questions read them as they are, and the first write gives the state an STM of its own
        (MemoryState.shares_memory), so the stored memory never changes. copy() makes a fully independent state.
        take: hand the stored memory over to the state instead (the model keeps none: checkpoint_state becomes
        None), so that even the first write updates the STM in place, never holding a second one.
        """
        stored = self.checkpoint_state
        if stored is None:
            raise ValueError("this model holds no stored memory (loaded with stored_memory=False, or handed over by "
                             "initial_state(take=True)); load a state with MemoryState.load, or reload the model")
        state = MemoryState(stm=stored.stm, stm_ages=stored.stm_ages, update_step=stored.update_step,
                            ltm=None if stored.ltm is None else [dataclasses.replace(m) for m in stored.ltm],
                            generator=torch.Generator().manual_seed(seed), initialized=stored.initialized,
                            shares_memory=not take, placement=stored.placement).to(self.placement)
        if take:
            self.checkpoint_state = None
        state.weights = weights_fingerprint(self)  # saved with the state: a load into other weights is refused
        return state

    def state_spec(self) -> dict:
        """What a memory state must look like to fit this model (checked by MemoryState.load(expect=...))."""
        mem = self.memory_config
        return {"num_layers": self.config.num_hidden_layers, "num_stm_rows": mem.stm_size,
                "hidden_size": self.config.hidden_size, "kind": mem.kind, "dtype": self.dtype,
                "key_dim": mem.selector_hidden_dim if mem.kind == "mplus" else None,
                "weights": weights_fingerprint(self)}

    def save_pretrained(self, path: str | Path, state: MemoryState | None = None,
                        max_shard_bytes: int | None = None, base: dict | None = None) -> None:
        """Write the official layout: config.json and model.safetensors with weights, `memory` and the LTM
        (sharded with an index if max_shard_bytes); a save killed at any moment leaves the old or the new folder.
        base {"name", "sha256"}: store only what training added over that frozen base (memory/base_ref.py).

        The layout has no place for STM ages, the dropped-row cache or the generator: state.save() keeps those.
        """
        state = state or self.checkpoint_state
        if state is None:
            raise ValueError("this model holds no stored memory to save with its weights; pass the state to save")
        mplus_checkpoint.save(self, path, state, max_shard_bytes, base)

    # ----------------------------------------------------------------------------------------- reading

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, positions.to(self.inv_freq.device))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids.to(self.model.embed_tokens.weight.device))  # [..., d]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()  # [1, T, V]

    def _first_position(self, state: MemoryState) -> int:
        """The position of the first input token: after the whole virtual prefix, or 0 with no memory yet."""
        return self.memory_config.virtual_prefix if state.initialized else 0

    def memory_queries(self, l: int, hidden: torch.Tensor) -> torch.Tensor:
        """f_q(norm(h)) [T, d_s] of layer-l inputs [T, d]: the retriever's queries (arXiv 2502.00592, section 3.2.2)."""
        layer = self.model.layers[l]
        return layer.self_attn.query_proj(layer.input_layernorm(hidden))

    def memory_keys(self, l: int, rows: torch.Tensor) -> torch.Tensor:
        """f_k(norm(m)) [S, d_s] of layer-l memory rows [S, d]: the retriever's keys, computed once per dropped row."""
        layer = self.model.layers[l]
        return layer.self_attn.key_proj(layer.input_layernorm(rows))

    def retrieve(self, state: MemoryState, l: int, layer_input: torch.Tensor) -> Retrieved:
        """Layer l's LTM rows for a prompt whose layer-l inputs are layer_input [T, d], in feeding order (oldest
        first; see mplus.memory.retriever.retrieve). Nothing without an LTM."""
        if not state.has_ltm:
            return nothing_retrieved(self.config.hidden_size, self.dtype)
        return retrieve(self.memory_queries(l, layer_input), state.ltm[l], self.memory_config.ltm_retrieved,
                        state.placement)

    def read_logits(self, state: MemoryState, input_ids, *, strip_bos: bool = False, query_len: int | None = None,
                    record: list | None = None, cache: KVCache | None = None, last_only: bool = False,
                    keep_prefix: bool = True) -> torch.Tensor:
        """Logits [1, T, V] of input_ids (no BOS) reading the memory: per layer, retrieval with the layer's inputs
        (M+), then the prefix [bos; retrieved; STM] (mplus.memory.prefix) through the read adapter.

        Differentiable with gradients on (the trainers' read path; the [bos; STM] keys/values are then computed
        afresh, never cached). query_len: retrieve with the first query_len tokens only (training feeds question
        + answer and must retrieve with the question alone, as generation does). record: if a list is given, one
        dict per layer is appended: its input and output hidden states at the tokens ("layer_input",
        "layer_output") and what it retrieved ("retrieved", a Retrieved). cache: a KVCache to fill (generation).
        keep_prefix False: compute the [bos; STM] keys/values without keeping them in the state.
        """
        ids = check_ids(self, input_ids, strip_bos, "input")
        check_state(self, state)
        cos, sin = self._cos_sin(self._first_position(state) + torch.arange(ids.shape[0]))  # [T, D] each
        stm_kv = prefix_cache(self, state) if keep_prefix else None

        def prefix(l: int, x: torch.Tensor):
            retrieved = self.retrieve(state, l, x[0, :query_len])
            if record is not None:
                record.append({"layer_input": x[0], "retrieved": retrieved})
            return memory_prefix(self, state, l, retrieved, stm_kv)

        def on_output(l: int, out: torch.Tensor) -> None:
            record[-1]["layer_output"] = out[0]

        x = self.model.run_layers(self._embed(ids)[None], cos, sin, prefix=prefix, cache=cache,
                                  on_output=None if record is None else on_output, adapter=READ,
                                  last_only=last_only)  # [1, T or 1, d]
        return self._logits(x)  # [1, T or 1, V]

    def logits_with_rows(self, ids: torch.Tensor, positions: torch.Tensor, rows: list[torch.Tensor],
                         row_positions: torch.Tensor, adapter: str) -> torch.Tensor:
        """Logits [1, T, V] of ids [T] at positions [T], every layer l reading rows[l] [P, d] at row_positions [P]
        as keys/values only, through `adapter` (READ or WRITE). Differentiable: stage 1 of the training recipe
        reads a memory it lays out itself (mplus.train.memory)."""
        layers = self.model.layers
        cos, sin = self._cos_sin(positions)  # [T, D] each
        p_cos, p_sin = self._cos_sin(row_positions)  # [P, D] each
        x = self.model.run_layers(self._embed(ids)[None], cos, sin, adapter=adapter,
                                  prefix=lambda l, _: layers[l].prefix_kv(rows[l][None], p_cos, p_sin, adapter))
        return self._logits(x)  # [1, T, V]

    def forward(self, state: MemoryState, input_ids, *, strip_bos: bool = False,
                record: list | None = None) -> torch.Tensor:
        """Logits [1, T, V] of input_ids (no BOS) reading the memory, without gradients; see read_logits."""
        with torch.no_grad():
            return self.read_logits(state, input_ids, strip_bos=strip_bos, record=record)

    def generate_tokens(self, state: MemoryState, prompt_ids, *, max_new_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                        stop_ids=None, strip_bos: bool = False, keep_prefix: bool = True) -> Iterator[int]:
        """Stream new tokens after prompt_ids: retrieval once from the prompt, then cached decoding. keep_prefix
        False: do not keep the [bos; STM] keys/values in the state for the next question (a one-off answer then
        holds them once, in the generation cache: 1.3 GB less at the released 8B sizes)."""
        ids = check_ids(self, prompt_ids, strip_bos, "prompt")
        T = ids.shape[0]
        max_new_tokens = new_token_budget(max_new_tokens, self.memory_config.virtual_prefix + T,
                                          self.config.max_position_embeddings)
        cache = KVCache(self.config, 1 + self.memory_config.ltm_retrieved + self.memory_config.stm_size + T
                        + max(max_new_tokens, 1), dtype=self.dtype, device=self.placement.device)
        # Sampling draws from a CPU generator, so sampled logits come to the CPU; greedy picks on the device.
        out = (lambda logits: logits) if temperature <= 0 else (lambda logits: logits.cpu())
        position = [self._first_position(state) + T]

        def step(token: int) -> torch.Tensor:
            cos, sin = self._cos_sin(torch.tensor([position[0]]))  # [1, D] each
            position[0] += 1
            x = self.model.run_layers(self._embed(torch.tensor([[token]])), cos, sin, cache=cache,
                                      adapter=READ)  # [1, 1, d]
            return out(self._logits(x)[0, -1])  # [V]

        stop = set(self.config.eos_token_id if stop_ids is None else stop_ids)
        yield from decode_loop(lambda: out(self.read_logits(state, ids, cache=cache, last_only=True,
                                                            keep_prefix=keep_prefix)[0, -1]), step,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               generator=generator, stop=stop)

    def generate(self, state: MemoryState, prompt_ids, *, on_token: Callable[[int], None] | None = None,
                 **kwargs) -> list[int]:
        """New token ids after prompt_ids (greedy by default); keyword arguments as for generate_tokens."""
        return collect(self.generate_tokens(state, prompt_ids, **kwargs), on_token)

    def merge_read_adapter(self) -> None:
        """Fold the read adapter into the weights for a read-only model: answering gets one matmul cheaper per
        projection and equal up to float rounding; injecting (write adapter) is refused from then on."""
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.merge(READ)

    # ----------------------------------------------------------------------------------------- writing

    def inject_document(self, state: MemoryState, ids, *, chunk_size: int = 512,
                        generator: torch.Generator | None = None, progress: bool = True,
                        allow_short: bool = False) -> int:
        """Inject a long token sequence chunk by chunk (512 tokens, the official evaluation's choice).

        Chunks are cut from the end backwards, as the official evaluation does, so only the first may be
        short; a first piece under 16 tokens joins the next chunk. Returns the number of chunks injected.
        A whole document under 16 tokens is refused unless allow_short.
        """
        from tqdm import tqdm
        ids = check_ids(self, ids, False, "document")
        if chunk_size < MIN_CHUNK:
            raise ValueError(f"chunk_size must be at least {MIN_CHUNK}")
        if ids.shape[0] < MIN_CHUNK and not allow_short:
            raise ValueError(f"the document has {ids.shape[0]} tokens; M+ was trained on chunks of at least "
                             f"{MIN_CHUNK} (pass allow_short=True to inject it anyway)")
        bounds = list(range(ids.shape[0], 0, -chunk_size))[::-1]  # chunk ends, ascending
        starts = [max(0, end - chunk_size) for end in bounds]
        if len(starts) > 1 and bounds[0] - starts[0] < MIN_CHUNK:
            starts, bounds = starts[:1] + starts[2:], bounds[1:]
        for start, end in tqdm(list(zip(starts, bounds)), desc="injecting", unit="chunk", disable=not progress):
            self.inject(state, ids[start:end], generator=generator, allow_short=True)
        return len(bounds)

    @torch.no_grad()
    def inject(self, state: MemoryState, chunk_ids, *, generator: torch.Generator | None = None,
               allow_short: bool = False, strip_bos: bool = False, record: list | None = None) -> torch.Tensor:
        """Write one chunk into the memory; returns the new memory [L, K, d] (one block per layer).

        generator draws the STM drops (default: the state's own). Chunks shorter than 16 tokens are refused
        unless allow_short: the official training never injected fewer. record: as for new_memory_block.
        """
        check_state(self, state)
        ids = check_ids(self, chunk_ids, strip_bos, "chunk")
        if ids.shape[0] < MIN_CHUNK and not allow_short:
            raise ValueError(f"the chunk has {ids.shape[0]} tokens; M+ was trained on chunks of at least "
                             f"{MIN_CHUNK} (pass allow_short=True to inject it anyway)")
        block = self.new_memory_block(state.stm, ids, initialized=state.initialized, record=record)
        self.write(state, block, generator or state.generator)
        return block

    def new_memory_block(self, stm: torch.Tensor, ids: torch.Tensor, *, initialized: bool = True,
                         record: list | None = None) -> torch.Tensor:
        """The write pass (arXiv 2402.04624, section 3.1; M+ keeps it, arXiv 2502.00592, section 3.2.1): the new
        memory block [L, K, d] that chunk ids [n] writes, given the STM [L, N, d] it follows.

        Per layer l the write adapter reads [bos_l (position 0), the last K STM rows (1..K), the chunk (K+1..)],
        the positional embedding of new memory added to the last K positions, whose outputs are the layer's new
        rows. The first p = min(1 + K, 1 + n) positions only give keys/values; with n < K, K - n memory rows
        query too. Differentiable: training backpropagates into the write adapter and the two embeddings.
        initialized False (MemoryLLM before its first write): no prefix, positions from 0, a block of min(K, n)
        rows. record: if a list is given, one dict per layer gets the layer's outputs ("layer_output").
        """
        n, K, N = ids.shape[0], self.memory_config.num_tokens, self.memory_config.stm_size
        e = self.new_memory_positional_emb  # [1, 1, d]
        cos, sin = self._cos_sin(torch.arange(1 + K + n if initialized else n))  # bos 0, memory 1..K, chunk K+1..
        p = min(1 + K, 1 + n) if initialized else 0  # query boundary
        layers, new = self.model.layers, []

        def memory(l: int) -> torch.Tensor:  # [1, 1 + K, d]: bos, then the last K STM rows
            return torch.cat((self.bos_embedding[l][None], stm[l, N - K:][None]), 1)

        def layer_input(l: int, x: torch.Tensor) -> torch.Tensor:  # x: the previous output, its last n the chunk's
            seq = torch.cat((memory(l)[:, p:], x[:, -n:]), 1) if initialized else x[:, -n:]  # [1, max(n, K) or n, d]
            return torch.cat((seq[:, :-K], seq[:, -K:] + e), 1)

        def prefix(l: int, _) -> tuple[torch.Tensor, torch.Tensor] | None:
            return layers[l].prefix_kv(memory(l)[:, :p], cos[:p], sin[:p], WRITE) if p else None

        def on_output(l: int, out: torch.Tensor) -> None:
            new.append(out[0, -K:])
            if record is not None:
                record.append({"layer_output": out[0]})

        self.model.run_layers(self._embed(ids)[None], cos[p:], sin[p:], prefix=prefix,
                              layer_input=layer_input, on_output=on_output, adapter=WRITE)
        block = torch.stack(new)  # [L, K or min(n, K), d]
        if not initialized:  # official aliasing: layer l + 1 adds e in place to the very rows of layer l's block
            block = torch.cat((block[:-1] + e, block[-1:]))
        return block

    @torch.no_grad()
    def write(self, state: MemoryState, block: torch.Tensor, g: torch.Generator) -> None:
        """Write a new block [L, K, d] into the memory: drop_and_append in the STM, in place (layer 0 drawn first);
        M+ then caches the dropped rows with their keys (cache_dropped_rows) and merges the cache into the LTM every
        update_ltm_frequency updates (merge_into_ltm). MemoryLLM forgets the dropped rows.

        An uninitialized MemoryLLM state instead becomes the block tiled over all N rows, with no random draw.
        The STM is written where it lives; the dropped rows go to the host (state.placement), where merges happen.
        """
        mem, where = self.memory_config, state.placement
        if not state.initialized:
            stm, ages = first_write(block, mem.stm_size, state.stm_ages.dtype)
            state.stm_ages = ages.to(state.stm_ages.device)
            state.stm, state.stm_kv, state.initialized, state.shares_memory = stm.to(state.stm.dtype), None, True, False
            return
        out = (torch.empty_like(state.stm), torch.empty_like(state.stm_ages)) if state.shares_memory else None
        dropped, dropped_ages = drop_and_append(state.stm, state.stm_ages, block, g,
                                                per_layer=mem.drop_memory_per_layer, out=out)
        if out is not None:  # the stored memory stays as it was; from now on the state writes its own STM in place
            state.stm, state.stm_ages, state.shares_memory = *out, False
        state.stm_kv = None  # the [bos; STM] keys/values of the old memory
        if not state.has_ltm:
            return
        K = mem.num_tokens
        state.ltm = [cache_dropped_rows(ltm, where.to_host(dropped[l]), where.to_keys(self.memory_keys(l, dropped[l])),
                                        where.to_host(dropped_ages[l]), K) for l, ltm in enumerate(state.ltm)]
        state.update_step += K
        if state.update_step >= mem.update_ltm_frequency * K:
            state.ltm = [merge_into_ltm(ltm, initial_rf=mem.initial_rf_when_moving_stm_to_ltm,
                                        decay=mem.decay_frequency, min_rows=mem.ltm_retrieved) for ltm in state.ltm]
            state.update_step = 0
