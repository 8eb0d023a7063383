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

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from mplus.memory import ltm as L
from mplus.memory import checkpoint as mplus_checkpoint
from mplus.llama.config import LlamaConfig
from mplus.llama.generate import collect, decode_loop, new_token_budget, prompt_tensor
from mplus.llama.kv_cache import KVCache
from mplus.memory.lora import READ, WRITE, LoRALinear, wrap_with_lora
from mplus.memory.config import MemoryConfig
from mplus.llama.model import Decoder
from mplus.memory.retriever import projector, select
from mplus.llama.rope import inv_freq_for, rope_cos_sin
from mplus.memory.fingerprint import weights_fingerprint
from mplus.memory.state import MemoryState

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

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
                        rope_bf16: bool = False) -> "MPlus":
        """Load an official-layout M+ or MemoryLLM folder (weights plus the memory stored with them).

        rope_bf16: round the RoPE inverse frequencies to bf16, as the official bf16 README path does by
        casting the model twice (spec 9.1); needed for bit-parity with the released models run that way.
        """
        return mplus_checkpoint.load(cls, path, dtype, progress, rope_bf16)

    @classmethod
    def from_llama(cls, path: str | Path, memory: MemoryConfig, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> "MPlus":
        """A new M+ / MemoryLLM around a plain Llama checkpoint, initialised as the official training recipe:
        memory ~ N(0, 1); bos_embedding[l] = embedding of BOS; new_memory_positional_emb = 0; LoRA A
        Kaiming-uniform, B = 0; retriever weights ~ N(0, 0.02); empty LTM."""
        return mplus_checkpoint.from_llama(cls, path, memory, seed, dtype)

    def initial_state(self, seed: int = 0) -> MemoryState:
        """A copy of the memory stored with the weights; `seed` seeds the generator of its STM drops."""
        state = self.checkpoint_state.copy()
        state.generator.manual_seed(seed)
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
                        max_shard_bytes: int | None = None) -> None:
        """Write the official layout: config.json and model.safetensors with weights, `memory` and the LTM
        (sharded with an index if max_shard_bytes); a save killed at any moment leaves the old or the new folder.

        The layout has no place for STM ages, the dropped-row cache or the generator: state.save() keeps those.
        """
        mplus_checkpoint.save(self, path, state or self.checkpoint_state, max_shard_bytes)

    # ----------------------------------------------------------------------------------------- checks

    def _check_ids(self, ids, strip_bos: bool, what: str) -> torch.Tensor:
        try:
            ids = prompt_tensor(ids)[0]  # [T]
        except ValueError:
            raise ValueError(f"the {what} must be a non-empty list of token ids (or a [T] / [1, T] tensor)") from None
        bos = self.config.bos_token_id
        if bos is not None and int(ids[0]) == bos:
            if not strip_bos:
                raise ValueError(f"the {what} starts with BOS ({bos}); M+ supplies its own BOS embedding, so encode "
                                 "without special tokens (or pass strip_bos=True)")
            ids = ids[1:]
        if ids.numel() == 0:
            raise ValueError(f"the {what} is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"a token id of the {what} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def _check_state(self, state: MemoryState) -> None:
        L, d, d_s = self.config.num_hidden_layers, self.config.hidden_size, self.memory_config.selector_hidden_dim
        want = (L, self.memory_config.stm_size, d)
        if tuple(state.stm.shape) != want or tuple(state.stm_ages.shape) != want[:2]:
            raise ValueError(f"this memory state has STM shape {tuple(state.stm.shape)} (ages "
                             f"{tuple(state.stm_ages.shape)}), the model needs {want}: it belongs to another model")
        if not state.has_ltm:
            return
        if not state.initialized:
            raise ValueError("this state has a long-term memory but is marked uninitialized, which only MemoryLLM has")
        if self.memory_config.kind != "mplus":
            raise ValueError("this state has a long-term memory, but the model is MemoryLLM (no retriever)")
        lists = (state.ltm, state.ltm_keys, state.ltm_ages, state.ltm_rf, state.cache_rows, state.cache_keys,
                 state.cache_ages)
        if any(x is None or len(x) != L for x in lists):
            raise ValueError(f"this state's long-term memory does not have one entry per layer ({L})")
        for l in range(L):
            if state.ltm[l].shape[1:] != (d,) or state.cache_rows[l].shape[1:] != (d,) \
                    or state.ltm_keys[l].shape[1:] != (d_s,) or state.cache_keys[l].shape[1:] != (d_s,):
                raise ValueError(f"layer {l} of this state's long-term memory has rows or keys of the wrong width "
                                 f"(the model needs d = {d}, d_s = {d_s}): it belongs to another model")

    # ----------------------------------------------------------------------------------------- reading

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, positions)

    def _stm_kv(self, state: MemoryState, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [1, H_kv, 1 + N, D] of [bos; STM] for the read adapter: the reusable part of the prefix.

        They change only when the memory does, so they are kept in the state until the next update.
        """
        if state.stm_kv is None:
            state.stm_kv = [None] * state.num_layers
        if state.stm_kv[l] is None:
            k0, n = self.memory_config.ltm_retrieved, self.memory_config.stm_size
            positions = torch.cat((torch.zeros(1, dtype=torch.long), torch.arange(1 + k0, 1 + k0 + n)))  # [1 + N]
            rows = torch.cat((self.bos_embedding[l], state.stm[l]))[None]  # [1, 1 + N, d]
            state.stm_kv[l] = self.model.layers[l].prefix_kv(rows, *self._cos_sin(positions), READ)
        return state.stm_kv[l]

    def retrieve(self, state: MemoryState, l: int, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer l's LTM rows for a prompt whose layer-l inputs are layer_input [T, d]: (source, index) [r] each,
        in feeding order (0 = LTM row, 1 = cached dropped row). Empty without an LTM."""
        if not state.has_ltm:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        layer = self.model.layers[l]
        queries = layer.self_attn.query_proj(layer.input_layernorm(layer_input))  # [T, d_s]
        return select(queries, state.ltm_keys[l], state.ltm_ages[l], state.cache_keys[l], state.cache_ages[l],
                      self.memory_config.ltm_retrieved)

    def _prefill(self, state: MemoryState, ids: torch.Tensor, cache: KVCache | None, last_only: bool,
                 record: list | None = None, query_len: int | None = None) -> torch.Tensor:
        """Logits [1, T or 1, V] of ids [T] reading the memory; fills `cache` with prefix and prompt keys/values.

        query_len: retrieve with the first query_len tokens only (training feeds question + answer and must
        retrieve with the question alone, as generation does). Differentiable when called with grad enabled.
        """
        self._check_state(state)
        T = ids.shape[0]
        cos, sin = self._cos_sin(self._first_position(state) + torch.arange(T))  # [T, D] each
        x = self.model.embed_tokens(ids)[None]  # [1, T, d]
        n_prefix = 0
        for l, layer in enumerate(self.model.layers):
            prefix_kv, source, index = self._read_prefix(state, l, x[0, :query_len])
            n_prefix = 0 if prefix_kv is None else prefix_kv[0].shape[2]
            if record is not None:
                record.append({"layer_input": x[0], "source": source, "index": index})
            x = layer(x, cos, sin, prefix_kv=prefix_kv, cache=cache, layer=l, adapter=READ,
                      last_only=last_only and l == len(self.model.layers) - 1)  # [1, T, d]
            if record is not None:
                record[-1]["layer_output"] = x[0]
        if cache is not None:
            cache.advance(n_prefix + T)
        return self.lm_head(self.model.norm(x)).float()  # [1, T or 1, V]

    def _first_position(self, state: MemoryState) -> int:
        """The position of the first input token: after the whole virtual prefix, or 0 with no memory yet."""
        return self.memory_config.virtual_prefix if state.initialized else 0

    def _read_prefix(self, state: MemoryState, l: int, layer_input: torch.Tensor):
        """(prefix keys/values [1, H_kv, 1 + r + N, D] each or None, source [r], index [r]) of layer l.

        No prefix for a MemoryLLM state that is not initialized: the official model is then a plain Llama.
        """
        source, index = self.retrieve(state, l, layer_input)  # [r] each
        if not state.initialized:
            return None, source, index
        stm_k, stm_v = self._stm_kv(state, l)  # [1, H_kv, 1 + N, D] each
        if not source.numel():
            return (stm_k, stm_v), source, index
        layer = self.model.layers[l]
        pool = torch.cat((state.ltm[l], state.cache_rows[l]))  # [S + c, d]
        rows = pool[index + source * state.ltm[l].shape[0]][None]  # [1, r, d]
        ltm_k, ltm_v = layer.prefix_kv(rows, *self._cos_sin(torch.arange(1, 1 + source.numel())), READ)
        return (torch.cat((stm_k[:, :, :1], ltm_k, stm_k[:, :, 1:]), 2),
                torch.cat((stm_v[:, :, :1], ltm_v, stm_v[:, :, 1:]), 2)), source, index

    def forward(self, state: MemoryState, input_ids, *, strip_bos: bool = False,
                record: list | None = None) -> torch.Tensor:
        """Logits [1, T, V] of input_ids (no BOS) reading the memory, with retrieval in M+.

        record: if a list is given, one dict per layer is appended: the layer's input and output hidden states at
        the tokens ("layer_input", "layer_output") and the retrieved rows ("source", "index") in feeding order.
        """
        ids = self._check_ids(input_ids, strip_bos, "input")
        with torch.no_grad():
            return self._prefill(state, ids, None, False, record)

    def generate_tokens(self, state: MemoryState, prompt_ids, *, max_new_tokens: int = 64,
                        temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                        stop_ids=None, strip_bos: bool = False) -> Iterator[int]:
        """Stream new tokens after prompt_ids: retrieval once from the prompt, then cached decoding."""
        ids = self._check_ids(prompt_ids, strip_bos, "prompt")
        T = ids.shape[0]
        max_new_tokens = new_token_budget(max_new_tokens, self.memory_config.virtual_prefix + T,
                                          self.config.max_position_embeddings)
        cache = KVCache(self.config, 1 + self.memory_config.ltm_retrieved + self.memory_config.stm_size + T
                        + max(max_new_tokens, 1), dtype=self.dtype)
        position = [self._first_position(state) + T]

        def step(token: int) -> torch.Tensor:
            cos, sin = self._cos_sin(torch.tensor([position[0]]))
            position[0] += 1
            x = self.model.embed_tokens(torch.tensor([[token]]))  # [1, 1, d]
            for l, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, cache=cache, layer=l, adapter=READ)
            cache.advance(1)
            return self.lm_head(self.model.norm(x)).float()[0, -1]  # [V]

        stop = set(self.config.eos_token_id if stop_ids is None else stop_ids)
        yield from decode_loop(lambda: self._prefill(state, ids, cache, True)[0, -1], step,
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
        ids = self._check_ids(ids, False, "document")
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
        unless allow_short: the official training never injected fewer. record: as for encode.
        """
        self._check_state(state)
        ids = self._check_ids(chunk_ids, strip_bos, "chunk")
        if ids.shape[0] < MIN_CHUNK and not allow_short:
            raise ValueError(f"the chunk has {ids.shape[0]} tokens; M+ was trained on chunks of at least "
                             f"{MIN_CHUNK} (pass allow_short=True to inject it anyway)")
        delta = self.encode(state.stm, ids, initialized=state.initialized, record=record)
        self.write(state, delta, generator or state.generator)
        return delta

    def encode(self, stm: torch.Tensor, ids: torch.Tensor, *, initialized: bool = True,
               record: list | None = None) -> torch.Tensor:
        """The new memory block [L, K, d] that chunk ids [n] writes, given the STM [L, N, d] it follows.

        Per layer the prefix is [bos, the last K STM rows], the write adapter is active, and the positional
        embedding of new memory is added to the last K positions. Differentiable: training backpropagates
        through it into the write adapter and the two embeddings.
        initialized False (MemoryLLM before its first write): no prefix, positions from 0, a block of min(K, n)
        rows. record: if a list is given, one dict per layer gets the layer's outputs ("layer_output").
        """
        n, K, N = ids.shape[0], self.memory_config.num_tokens, self.memory_config.stm_size
        e = self.new_memory_positional_emb  # [1, 1, d]
        cos, sin = self._cos_sin(torch.arange(1 + K + n if initialized else n))  # bos 0, memory 1..K, chunk K+1..
        p = min(1 + K, 1 + n) if initialized else 0  # query boundary: with n < K, K - n memory rows query too
        x = self.model.embed_tokens(ids)[None]  # [1, n, d]
        new = []
        for l, layer in enumerate(self.model.layers):
            seq = torch.cat((self.bos_embedding[l][None], stm[l, N - K:][None], x), 1) if initialized else x
            seq = torch.cat((seq[:, :-K], seq[:, -K:] + e), 1)  # [1, 1 + K + n or n, d]
            prefix_kv = layer.prefix_kv(seq[:, :p], cos[:p], sin[:p], WRITE) if p else None
            out = layer(seq[:, p:], cos[p:], sin[p:], prefix_kv=prefix_kv, adapter=WRITE)  # [1, max(n, K), d]
            if record is not None:
                record.append({"layer_output": out[0]})
            new.append(out[0, -K:])
            x = out[:, -n:]
        delta = torch.stack(new)  # [L, K or min(n, K), d]
        if not initialized:  # official aliasing: layer l + 1 adds e in place to the very rows of layer l's block
            delta = torch.cat((delta[:-1] + e, delta[-1:]))
        return delta

    @torch.no_grad()
    def write(self, state: MemoryState, delta: torch.Tensor, g: torch.Generator) -> None:
        """Drop K random STM rows per layer (layer 0 first), append the new block, age and cache the dropped rows.

        An uninitialized MemoryLLM state instead becomes the block tiled over all N rows, with no random draw.
        """
        K, N = self.memory_config.num_tokens, self.memory_config.stm_size
        if not state.initialized:
            index = L.tile_index(N, delta.shape[1])  # [N]
            fresh = torch.arange(delta.shape[1] - 1, -1, -1, dtype=state.stm_ages.dtype)  # [n], as write_block
            state.stm, state.stm_ages = delta[:, index].to(state.stm.dtype), fresh[index].repeat(state.num_layers, 1)
            state.stm_kv, state.initialized = None, True
            return
        shared = None if self.memory_config.drop_memory_per_layer else L.draw_drop(N, K, g)
        stm, ages, dropped = [], [], []
        for l in range(state.num_layers):
            kept, gone = shared or L.draw_drop(N, K, g)
            dropped.append((state.stm[l][gone], state.stm_ages[l][gone]))
            rows, row_ages = L.write_block(state.stm[l], state.stm_ages[l], delta[l], kept)
            stm.append(rows), ages.append(row_ages)
        state.stm, state.stm_ages, state.stm_kv = torch.stack(stm), torch.stack(ages), None
        if not state.has_ltm:
            return  # MemoryLLM: dropped rows are forgotten
        for l, (rows, row_ages) in enumerate(dropped):
            layer = self.model.layers[l]
            keys = layer.self_attn.key_proj(layer.input_layernorm(rows))  # [K, d_s], computed once, kept
            state.ltm_ages[l] = state.ltm_ages[l] + K  # every update ages what already left the STM
            state.cache_ages[l] = torch.cat((state.cache_ages[l] + K, row_ages))
            state.cache_rows[l] = torch.cat((state.cache_rows[l], rows))
            state.cache_keys[l] = torch.cat((state.cache_keys[l], keys))
        state.update_step += K
        if state.update_step >= self.memory_config.update_ltm_frequency * K:
            self._merge(state)

    def _merge(self, state: MemoryState) -> None:
        mem = self.memory_config
        for l in range(state.num_layers):
            state.ltm[l], state.ltm_keys[l], state.ltm_ages[l], state.ltm_rf[l] = L.merge(
                state.ltm[l], state.ltm_keys[l], state.ltm_ages[l], state.ltm_rf[l],
                state.cache_rows[l], state.cache_keys[l], state.cache_ages[l],
                initial_rf=mem.initial_rf_when_moving_stm_to_ltm, decay=mem.decay_frequency,
                min_rows=mem.ltm_retrieved)
            state.cache_rows[l], state.cache_keys[l] = state.cache_rows[l][:0], state.cache_keys[l][:0]
            state.cache_ages[l] = state.cache_ages[l][:0]
        state.update_step = 0
