"""Stage 1 on the project's fact task: write a paragraph holding one fact into memory, answer a question on it.

The base model (stage 0, train_base.py) is wrapped as an M+ model (MPlus.from_llama: LoRA B = 0, so it starts
as the base model) and trained with train_memory.stage1_loss on the short-term memory alone; the LTM and
the retriever come in later stages. After every step the new block is written into the STM (detached), so
the memory evolves as at inference. Seeded and resumable like the base stage.

Two departures from the recipe, both measured necessary for the tiny model (README, Training):
  * placement (train_memory.Placement): the block is shown as it will sit some updates later, partly dropped,
    or among the retrieved LTM rows; the recipe only ever shows it last and whole;
  * stm_filler_words > 0: the STM evolves by filler chunks instead of the examples' blocks. The tiny base
    answers with the nearest value of the asked kind (it does not match the name), so a block shown among
    other facts' blocks teaches nothing (measured: accuracy fell to 0.13); among filler rows it is learned.

Config (TOML, see configs/stage1-tiny.toml):

    stage = "memory1"
    [memory]  num_tokens, num_blocks, num_ltm_blocks, selector_hidden_dim, update_ltm_frequency, lora_r, lora_alpha,
              question_template (how questions are asked, saved into the checkpoint for `mplus ask`),
              initial_rf_when_moving_stm_to_ltm (optional, default 10)
    [train]   base, seed, steps, lr, fresh_ratio, filler_words, out, repeat_ratio (optional, default 0.1),
              max_age, min_keep, ltm_ratio, filled_ratio (Placement; optional, default: the recipe's),
              stm_filler_words (optional, default 0: the recipe's), stm_fact_ratio (optional, default 0: with
              stm_filler_words, the share of writes that are the example's own block instead of filler),
              task, chat_ratio, max_people (optional, default "facts", 0, 1: the data, train/tasks.py);
              attribute_run, attribute_run_from_step (optional, default 0: people only; from that step on, runs
              of attribute_run consecutive examples state the same attribute, so the blocks beside the asked one
              hold other people's values of the asked kind and only the name tells them apart);
              rivals, rival_ratio, rivals_from_step (optional, default 0: people only; from that step on, a share
              rival_ratio of examples asks one of rivals + 1 people's values of one kind, each written as its own
              block, all shown as the last writes: train/memory.rival_prefix); rivals_in_sequence (optional,
              default false: all written from the step's STM; true: one after another, each write pass reading
              the previous person's block as inference does, train/memory.write_in_sequence);
              rival_empty_ratio (optional, default 0: the share of rival examples that read and write with an
              empty STM, zeros, around their blocks; the others' rows drown the name's binding otherwise, see
              docs/real-model.md);
              bos_init (optional, default "embedding": the official BOS rows; "hidden": the base's own hidden
              states at BOS, its attention sinks, MPlus.from_llama),
              init (optional: an M+ folder to continue, with a fresh optimiser; its memory settings replace the
              [memory] section, which must then be absent), base may name $MPLUS_CACHE (e.g. "$MPLUS_CACHE/smollm2-135m-instruct"),
              batch (optional, default 1: examples per step, their losses averaged; under torchrun each
              process computes its share, see train.distributed and docs/distributed.md)

A batch of B examples all read the step's starting memory; afterwards their B blocks (or B filler chunks)
are written in order, so the memory moves on by one write per example, as with batch 1.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import tokenizers
import torch
from tqdm import tqdm

from mplus.data.people import ATTRIBUTES
from mplus.llama.config import ConfigError
from mplus.memory.config import MemoryConfig
from mplus.memory.mplus import MPlus
from mplus.train.base import config_fields, read_stage_config
from mplus.train.distributed import gather, shard, start, sum_gradients, total
from mplus.train.memory import Placement, stage1_loss, trainable_parameters
from mplus.train.resume import Run, named, resume, save
from mplus.train.tasks import Task


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    memory: MemoryConfig | None  # None with init: the init folder's
    base: Path
    seed: int
    steps: int
    lr: float
    fresh_ratio: float
    filler_words: int
    out: Path
    repeat_ratio: float = 0.1
    placement: Placement = Placement()
    stm_filler_words: int = 0
    batch: int = 1
    task: Task = Task()
    stm_fact_ratio: float = 0.0
    attribute_run: int = 0
    attribute_run_from_step: int = 0
    init: Path | None = None
    rivals: int = 0
    rival_ratio: float = 0.0
    rivals_from_step: int = 0
    rivals_in_sequence: bool = False
    bos_init: str = "embedding"
    rival_empty_ratio: float = 0.0

    def attribute(self, step: int) -> str | None:
        """The attribute every example of this step states (attribute_run), or None for a random one each."""
        if not self.attribute_run or step < self.attribute_run_from_step:
            return None
        return ATTRIBUTES[(step // self.attribute_run) % len(ATTRIBUTES)]

    def draw(self, step: int, rng: random.Random, tokenizer: tokenizers.Tokenizer) -> tuple[tuple, bool, bool]:
        """One example ((chunk, sentence, targets, rival chunks), fresh_only, empty). Rival examples (asked among
        other people's values of one kind) always read the full memory, empty (zeros besides their blocks) for a
        share rival_empty_ratio; a run without them keeps its draws."""
        if self.rivals and step >= self.rivals_from_step and rng.random() < self.rival_ratio:
            chunks, i, sentence, targets = self.task.rival_example(rng, tokenizer, self.filler_words, self.rivals)
            empty = self.rival_empty_ratio > 0 and rng.random() < self.rival_empty_ratio
            return (chunks[i], sentence, targets, chunks[:i] + chunks[i + 1:]), False, empty
        example = self.task.example(rng, tokenizer, self.filler_words, self.repeat_ratio, self.attribute(step))
        return (*example, []), rng.random() < self.fresh_ratio, False

    @classmethod
    def from_toml(cls, path: str | Path) -> "Stage1Config":
        path = Path(path)
        raw = read_stage_config(path, "memory1")
        m, t = raw.get("memory", {}), raw.get("train", {})
        if "init" in t and m:
            raise ConfigError(f"{path}: a stage 1 with [train] init continues that model with its own memory "
                              f"settings; remove the [memory] section")
        if "init" in t and "bos_init" in t:
            raise ConfigError(f"{path}: bos_init sets up a new model; one continued from [train] init keeps its own")
        if t.get("bos_init", "embedding") not in ("embedding", "hidden"):
            raise ConfigError(f"{path}: bos_init is {t['bos_init']!r}; use \"embedding\" (the official) or \"hidden\"")
        if not isinstance(t.get("rivals_in_sequence", False), bool):
            raise ConfigError(f"{path}: rivals_in_sequence is {t['rivals_in_sequence']!r}; use true or false")
        empty = t.get("rival_empty_ratio", 0)
        if isinstance(empty, bool) or not isinstance(empty, (int, float)) or not 0 <= empty <= 1:
            raise ConfigError(f"{path}: rival_empty_ratio is {t['rival_empty_ratio']!r}; use a share from 0 to 1")
        with config_fields(path):
            task = Task(t.get("task", "facts"), float(t.get("chat_ratio", 0.0)), int(t.get("max_people", 1)))
            memory = None if "init" in t else MemoryConfig(kind="mplus", num_tokens=m["num_tokens"], num_blocks=m["num_blocks"],
                                  num_ltm_blocks=m["num_ltm_blocks"], selector_hidden_dim=m["selector_hidden_dim"],
                                  update_ltm_frequency=m["update_ltm_frequency"], lora_r=m["lora_r"],
                                  lora_alpha=float(m["lora_alpha"]),
                                  initial_rf_when_moving_stm_to_ltm=float(m.get("initial_rf_when_moving_stm_to_ltm", 10)),
                                  question_template=m.get("question_template"), task=task.kind)
            return cls(memory=memory, base=(path.parent / expand(t["base"])).resolve(), seed=t["seed"], steps=t["steps"],
                       lr=float(t["lr"]), fresh_ratio=float(t["fresh_ratio"]), filler_words=t["filler_words"],
                       repeat_ratio=float(t.get("repeat_ratio", 0.1)),
                       placement=Placement(max_age=int(t.get("max_age", 0)), min_keep=float(t.get("min_keep", 1.0)),
                                           ltm_ratio=float(t.get("ltm_ratio", 0.0)),
                                           filled_ratio=float(t.get("filled_ratio", 0.0))),
                       stm_filler_words=int(t.get("stm_filler_words", 0)), batch=int(t.get("batch", 1)),
                       task=task, stm_fact_ratio=float(t.get("stm_fact_ratio", 0.0)),
                       attribute_run=int(t.get("attribute_run", 0)),
                       attribute_run_from_step=int(t.get("attribute_run_from_step", 0)),
                       init=(path.parent / t["init"]).resolve() if "init" in t else None,
                       rivals=int(t.get("rivals", 0)), rival_ratio=float(t.get("rival_ratio", 0.0)),
                       rivals_from_step=int(t.get("rivals_from_step", 0)),
                       rivals_in_sequence=t.get("rivals_in_sequence", False),
                       bos_init=str(t.get("bos_init", "embedding")),
                       rival_empty_ratio=float(t.get("rival_empty_ratio", 0.0)),
                       out=(path.parent / t["out"]).resolve())


def expand(path: str) -> str:
    """A config path with $MPLUS_CACHE (or another variable) filled in; an unset variable is an error."""
    out = os.path.expandvars(path)
    if "$" in out:
        raise ConfigError(f"{path!r} names an unset environment variable (set MPLUS_CACHE, or run through make)")
    return out


def train(config: Stage1Config, *, max_steps: int | None = None, progress: bool = True) -> list[float]:
    """Run (or resume) stage 1; returns the losses of the steps run now (each the mean over the global batch).
    Writes an official-layout M+ folder. Under torchrun only the main process writes or shows progress."""
    world = start()
    mine = shard(config.batch, world)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer.from_file(str(config.base / "tokenizer.json"))
    model = MPlus.from_llama(config.base, config.memory, seed=config.seed, bos=config.bos_init) if config.init is None else \
        MPlus.from_pretrained(config.init, base=config.base)
    if model.memory_config.task != config.task.kind:
        raise ConfigError(f"{config.init} was trained on the {model.memory_config.task!r} task, this config asks for "
                          f"{config.task.kind!r}")
    params = trainable_parameters(model)
    optim = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    state = model.initial_state(seed=config.seed).without_ltm()
    rng, g, step = random.Random(config.seed), torch.Generator().manual_seed(config.seed + 1), 0
    run = Run(named(model, params), optim, {"examples": g}, rng, state)
    step, _ = resume(out, run, config.steps)
    end = config.steps if max_steps is None else min(config.steps, step + max_steps)
    losses = []
    bar = tqdm(range(step, end), desc="stage 1", initial=step, total=config.steps,
               disable=not (progress and world.main))
    for step in bar:
        # Every process draws the whole global batch (cheap: text and token ids) so the streams stay in step.
        examples = [config.draw(step, rng, tokenizer) for _ in range(config.batch)]
        # One example uses g itself (the batch-1 run is unchanged); in a batch each gets its own generator,
        # seeded from g, so its draws do not depend on which process computes it.
        gens = [g] if config.batch == 1 else \
            [torch.Generator().manual_seed(int(torch.randint(2 ** 62, (), generator=g))) for _ in examples]
        optim.zero_grad(set_to_none=True)
        local, deltas = 0.0, []
        for i in mine:
            (chunk, sentence, targets, rival_chunks), fresh_only, empty = examples[i]
            stm = torch.zeros_like(state.stm) if empty else state.stm  # [L, N, d]
            loss, delta = stage1_loss(model, stm, chunk, sentence, targets, fresh_only=fresh_only, g=gens[i],
                                      placement=config.placement, rival_chunks=rival_chunks,
                                      in_sequence=config.rivals_in_sequence)
            (loss / config.batch).backward()  # the global batch's mean; backward per example frees its graph
            local += loss.item() / config.batch if config.batch > 1 else loss.item()
            deltas.append(delta.detach())
        sum_gradients(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        for block in ([] if config.stm_filler_words else gather(torch.stack(deltas), world)):  # [B, L, K, d]
            model.write(state, block, state.generator)  # the memory evolves as at inference
        for block in (gather(torch.stack(deltas), world) if config.stm_filler_words else []):
            # the block will sit among filler rows (and, with stm_fact_ratio, among other facts' blocks)
            if config.stm_fact_ratio and rng.random() < config.stm_fact_ratio:
                model.write(state, block, state.generator)
            else:
                model.inject(state, tokenizer.encode(config.task.filler(rng, config.stm_filler_words)).ids,
                             allow_short=True)
        losses.append(total(local, world))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if world.main:
        save(out, run, end)
        if end == config.steps:
            model.checkpoint_state.stm = state.stm.detach().clone()
            model.save_pretrained(out)
            (out / "tokenizer.json").write_bytes((config.base / "tokenizer.json").read_bytes())
    return losses
