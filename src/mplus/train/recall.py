"""Stages 2 and 3 of the recipe on the fact task: delayed recall, the retriever, then the long-term memory.

The memory runs as at inference: every step writes one chunk (a paragraph holding a fact, or filler) into the
STM, and the dropped rows go on (stage 3: into the LTM). Each step trains on up to two questions:

  * fresh: when the chunk holds a fact, its question is answered right after the write, with gradient
    through the write path (mplus.train.memory.stage1_loss, as in stage 1);
  * delayed (arXiv 2402.04624, section 3.2.3, mitigating forgetting): a question about a fact written 1..max_delay chunks earlier, answered from the current
    memory with the read adapter. In stage 3 the prefix is [bos, K0 rows retrieved from the LTM, STM], the
    retrieval made from the question alone, exactly as at generation (MPlus.read_logits).

The retriever (f_q, f_k) trains with the balanced BCE of arXiv 2502.00592, section 3.2.2 on STM slots: a slot is positive when it holds
a row written from the asked fact's chunk. Rows are copied, never changed, between the write and the STM, so a
slot is found by exact equality with the fact's written block. Retriever inputs are detached (the
official training's detach_hidden_state). In stage 3 the retriever keeps training on the STM and is applied to the LTM.

With lr = 0 (the tiny configs) only the retriever trains: the adapters keep what stage 1 taught. On this task
the delayed answers hurt them (measured: distance-0 accuracy 0.87 -> 0.57 after stage 2), because other facts
written since the asked one hold values of the same kind, and the tiny base answers with the nearest such value.

The memory shipped with the weights is the one the stage started from (stage 1's, written from filler only),
not the training STM: that holds training facts, which the tiny model answers from (measured: M+ accuracy at
distance 0 fell from 0.80 to 0.53 when they reached the LTM). prime_chunks filler chunks then fill its LTM with
>= K0 rows, so that retrieval works from the first injection (with fewer, the official rule retrieves nothing).

Deviations from the official recipe, for a 2-core budget: questions replace documents as "sentences"; the full
question is the retrieval query (no random prefix); delays come from a queue of earlier facts rather than the
pass/empty indicator; the encoder retriever (unused at inference) is not trained.

Config (TOML, see configs/stage2-tiny.toml and stage3-tiny.toml):

    stage = "memory2" | "memory3"
    [train]   init, seed, steps, lr, selector_lr, fact_ratio, fresh_ratio, filler_words, chunk_words,
              max_delay, out, prime_chunks (optional, default 0), forget_primed_ltm (optional, default false:
              after priming, empty the shipped LTM; for a stage 1 whose STM held training facts, which priming
              pushes out of the STM into the LTM), refill_chunks (optional, default 0: with forget_primed_ltm, filler
              chunks injected after the emptying, so the LTM holds filler rows only), ltm_rows (optional, default 0:
              all; else the shipped LTM keeps that many random rows per layer, >= K0), chat_ratio and max_people (optional, for the
              people task; the task itself is the init checkpoint's, config.json "mplus_task")

adapter_grads (optional, default true) false, allowed with lr = 0 only: the question passes run without
autograd (same values and draws, a fraction of the time), since only the retriever's loss, on detached layer
inputs, needs a gradient. (The tiny configs keep true: their adapter gradients, though never applied, enter
the clipping norm, and the shipped tiny model was trained so.)
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import tokenizers
import torch
from tqdm import tqdm

from mplus.llama.config import ConfigError
from mplus.memory.ltm import LayerLTM, copies_of
from mplus.memory.mplus import MPlus
from mplus.memory.retriever import relevance
from mplus.train.base import config_fields, read_stage_config
from mplus.train.memory import answer_loss, stage1_loss, trainable_parameters
from mplus.train.distributed import DistributedError, world_from_env
from mplus.train.resume import Run, TrainStateError, check_tensor, named, resume, save
from mplus.train.tasks import Task


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    ltm: bool  # stage 3
    init: Path
    seed: int
    steps: int
    lr: float
    selector_lr: float
    fact_ratio: float
    fresh_ratio: float
    filler_words: int
    chunk_words: int
    max_delay: int
    out: Path
    prime_chunks: int = 0
    chat_ratio: float = 0.0
    max_people: int = 1
    adapter_grads: bool = True
    forget_primed_ltm: bool = False
    refill_chunks: int = 0
    ltm_rows: int = 0

    @classmethod
    def from_toml(cls, path: str | Path) -> "RecallConfig":
        path = Path(path)
        raw = read_stage_config(path, "memory2", "memory3")
        t = raw.get("train", {})
        if t.get("refill_chunks", 0) and not t.get("forget_primed_ltm", False):
            raise ConfigError(f"{path}: refill_chunks refills the LTM that forget_primed_ltm empties; set both")
        if t.get("adapter_grads", True) is False and float(t.get("lr", 0)) != 0:
            raise ConfigError(f"{path}: adapter_grads = false freezes the adapters; it needs lr = 0")
        with config_fields(path):
            return cls(ltm=raw["stage"] == "memory3", init=(path.parent / t["init"]).resolve(), seed=t["seed"],
                       steps=t["steps"], lr=float(t["lr"]), selector_lr=float(t["selector_lr"]),
                       fact_ratio=float(t["fact_ratio"]), fresh_ratio=float(t["fresh_ratio"]),
                       filler_words=t["filler_words"], chunk_words=t["chunk_words"], max_delay=t["max_delay"],
                       prime_chunks=int(t.get("prime_chunks", 0)), chat_ratio=float(t.get("chat_ratio", 0.0)),
                       max_people=int(t.get("max_people", 1)), adapter_grads=bool(t.get("adapter_grads", True)),
                       forget_primed_ltm=bool(t.get("forget_primed_ltm", False)),
                       refill_chunks=int(t.get("refill_chunks", 0)), ltm_rows=int(t.get("ltm_rows", 0)),
                       out=(path.parent / t["out"]).resolve())


def retriever_parameters(model: MPlus) -> list[torch.nn.Parameter]:
    params = [p for n, p in model.named_parameters() if ".query_proj." in n or ".key_proj." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def retriever_loss(model: MPlus, record: list[dict], stm: torch.Tensor, labels: torch.Tensor,
                   query_len: int) -> torch.Tensor:
    """The retriever's training loss (arXiv 2502.00592, section 3.2.2): -log p+ - log(1 - p-), as the official
    balanced BCE of every layer's STM relevance [N] against labels [L, N] (True = written from the asked fact):
    (mean over positives + mean over negatives) / 2. The queries are the question's layer inputs, detached."""
    w = torch.stack([relevance(model.memory_queries(l, r["layer_input"][:query_len].detach()),  # [T, d_s]
                               model.memory_keys(l, stm[l]))  # [N]
                     for l, r in enumerate(record)])  # [L, N]
    pos = -torch.log(w[labels] + 1e-5).mean()
    neg = -torch.log(1 - w[~labels] + 1e-5).mean()
    return (pos + neg) / 2


def delayed_loss(model: MPlus, state, target: dict, train_answer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, retriever loss) for a fact written earlier, read from the current memory as at generation.
    train_answer False: the answer loss carries no gradient (the adapters do not train)."""
    sentence, mask, n_query = target["sentence"], target["targets"], target["query_len"]
    record: list[dict] = []
    with torch.set_grad_enabled(train_answer):
        logits = model.read_logits(state, sentence, query_len=n_query, record=record)  # [1, T, V]
        answer = answer_loss(logits, sentence, mask)
    labels = torch.stack([copies_of(state.stm[l], target["block"][l]) for l in range(state.num_layers)])  # [L, N]
    if not labels.any():
        return answer, torch.zeros(())
    return answer, retriever_loss(model, record, state.stm, labels, n_query)


PENDING = ("block", "sentence", "targets")  # the tensors of a question waiting to be asked, saved on a stop


def pending_from(tensors: dict[str, torch.Tensor], meta: dict, model: MPlus) -> list[dict]:
    """The questions waiting to be asked, from a resume file (train_state.save's extras), checked for this model."""
    steps = meta.get("pending_steps")
    if not (isinstance(steps, list) and all(type(s) is int for s in steps)):
        raise TrainStateError(f"its pending question steps {steps!r} are not a list of integers")
    if stray := sorted(tensors.keys() - {f"pending.{i}.{k}" for i in range(len(steps)) for k in PENDING}):
        raise TrainStateError(f"unexpected tensors: {', '.join(stray[:4])}")
    L, K, d = model.config.num_hidden_layers, model.memory_config.num_tokens, model.config.hidden_size
    pending = []
    for i, s in enumerate(steps):
        block = check_tensor(tensors, f"pending.{i}.block", model.dtype, [L, K, d])
        sentence = check_tensor(tensors, f"pending.{i}.sentence", torch.int64, [None])
        targets = check_tensor(tensors, f"pending.{i}.targets", torch.bool, [len(sentence)])
        if not (len(sentence) and 0 <= sentence.min() and sentence.max() < model.config.vocab_size):
            raise TrainStateError(f"pending question {i} is empty or has token ids outside this model's vocabulary")
        pending.append(dict(block=block, sentence=sentence, targets=targets, query_len=int((~targets).sum()), step=s))
    return pending


def train(config: RecallConfig, *, max_steps: int | None = None, progress: bool = True) -> list[float]:
    """Run (or resume) stage 2 or 3; returns the losses of the steps run now. Writes an official-layout M+ folder."""
    if world_from_env().size > 1:  # one memory evolves chunk by chunk: there is no batch to share out
        raise DistributedError("stages 2 and 3 train on one memory stream, chunk by chunk, in one process; run them "
                               "without torchrun (stage 1 and the base stage are the data-parallel ones)")
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer.from_file(str(config.init / "tokenizer.json"))
    model = MPlus.from_pretrained(config.init)
    if 0 < config.ltm_rows < model.memory_config.ltm_retrieved:
        raise ConfigError(f"ltm_rows = {config.ltm_rows} is below the {model.memory_config.ltm_retrieved} rows a "
                          f"retrieval takes: such an LTM is never read")
    task = Task(model.memory_config.task, config.chat_ratio, config.max_people)
    params = trainable_parameters(model)
    selector = retriever_parameters(model)
    optim = torch.optim.AdamW([{"params": params, "lr": config.lr},
                               {"params": selector, "lr": config.selector_lr}], weight_decay=0.0)
    state = model.initial_state(seed=config.seed)
    if not config.ltm:
        state = state.without_ltm()
    rng, g = random.Random(config.seed), torch.Generator().manual_seed(config.seed + 1)
    run = Run(named(model, params + selector), optim, {"examples": g}, rng, state)
    step, pending = resume(out, run, config.steps, lambda tensors, meta: pending_from(tensors, meta, model))
    pending = pending or []
    end = config.steps if max_steps is None else min(config.steps, step + max_steps)
    losses = []
    bar = tqdm(range(step, end), desc=f"stage {3 if config.ltm else 2}", initial=step, total=config.steps,
               disable=not progress)
    for step in bar:
        loss = torch.zeros(())
        if rng.random() < config.fact_ratio:
            chunk, sentence, targets = task.example(rng, tokenizer, config.filler_words)
            with torch.set_grad_enabled(config.adapter_grads):
                fresh, delta = stage1_loss(model, state.stm, chunk, sentence, targets,
                                           fresh_only=rng.random() < config.fresh_ratio, g=g)
            loss = loss + fresh
            pending.append(dict(block=delta.detach(), sentence=sentence, targets=targets,
                                query_len=int((~targets).sum()), step=step))
        else:
            chunk = torch.tensor(tokenizer.encode(task.filler(rng, config.chunk_words)).ids)
            with torch.no_grad():
                delta = model.new_memory_block(state.stm, chunk)
        model.write(state, delta.detach(), state.generator)
        pending = [t for t in pending if step - t["step"] < config.max_delay]
        earlier = [t for t in pending if t["step"] < step]
        if earlier:
            answer, selector_loss = delayed_loss(model, state, rng.choice(earlier), config.adapter_grads)
            loss = loss + answer + selector_loss
        if loss.requires_grad:
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params + selector, 1.0)
            optim.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    save(out, run, end, {f"pending.{i}.{k}": t[k] for i, t in enumerate(pending) for k in PENDING},
         {"pending_steps": [t["step"] for t in pending]})
    if end == config.steps:
        shipped = model.initial_state()  # the memory this stage started from (not the training STM), LTM empty...
        for _ in range(config.prime_chunks):  # ...primed with filler
            model.inject(shipped, tokenizer.encode(task.filler(rng, config.chunk_words)).ids, allow_short=True)
        if config.forget_primed_ltm:  # rows of the starting STM (training facts, if stage 1 wrote them) left it
            shipped.ltm = [LayerLTM.empty(m.rows.shape[1], m.keys.shape[1], m.rows.dtype) for m in shipped.ltm]
            shipped.update_step = 0
        for _ in range(config.refill_chunks):  # an LTM of filler rows only: retrieval works from the first question
            model.inject(shipped, tokenizer.encode(task.filler(rng, config.chunk_words)).ids, allow_short=True)
        if config.ltm_rows:  # a random share, in age order: the shipped folder's size stays bounded
            pick = torch.Generator().manual_seed(config.seed)
            shipped.ltm = [m.subset(torch.randperm(len(m), generator=pick)[:config.ltm_rows].sort().values)
                           for m in shipped.ltm]
        model.save_pretrained(out, shipped)
        (out / "tokenizer.json").write_bytes((config.init / "tokenizer.json").read_bytes())
    return losses
