"""Stage 0 of the tiny-model recipe: pretrain a small Llama on the project's own fact corpus.

The paper starts from a frozen, pretrained Llama-3.1; the tiny model needs a base of its own first. This
trains one by plain next-token prediction on documents from mplus.data.facts (training entities only), with a
byte-level BPE tokenizer trained on the same corpus. Every random choice is seeded; a run can be stopped
and resumed (the model, optimiser, step and generator are checkpointed atomically) and ends where an
uninterrupted run would.

A config is a small TOML file (see configs/base-tiny.toml):

    stage = "base"
    [model]   hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
              vocab_size, max_position_embeddings
    [train]   seed, steps, batch_size (the global batch under torchrun: docs/distributed.md), seq_len, lr, warmup, weight_decay, corpus_docs, out,
              answer_weight (optional, default 1), repeat_ratio (optional, default 0.3: documents that are a
              story followed by "Repeat:" and the story again), single_fact_ratio (optional, default 0: documents
              that are one fact ending a filler paragraph, then its question: see facts.single_fact_document),
              gap_words (optional, default 0: filler words between that fact and its question, at most),
              gap_from_step (optional, default 0: steps before it train on gap_words = 0, a curriculum)

answer_weight > 1 weights the loss of reply tokens (the text after "A:") that much more than other tokens:
still next-token prediction on the same text, but with the gradient tilted towards reading facts from
context, which a model this small otherwise picks up too slowly for a CPU budget (measured: with weight 1,
answer loss with the right story = with another doc's story after 400 steps; the model ignored the context).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tomllib
from pathlib import Path

import torch
from tqdm import tqdm

from mplus.llama.config import ConfigError, LlamaConfig, RopeScaling
from mplus.data.facts import corpus
from mplus.llama.model import Llama
from mplus.data.bpe import save_tokenizer, train_tokenizer
from mplus.train.distributed import barrier, shard, start, sum_gradients, total
from mplus.train.resume import Run, resume, save

EOS = 1  # tokenizer_train's <|eos|>


def read_stage_config(path: Path, *stages: str) -> dict:
    """The TOML document of a training config, which must declare `stage = "<one of stages>"`."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the training config {path}: {e}") from None
    if raw.get("stage") not in stages:
        wanted = " or ".join(f'"{s}"' for s in stages)
        raise ConfigError(f"{path} declares stage {raw.get('stage')!r}; this trainer runs stage = {wanted}")
    return raw


@contextlib.contextmanager
def config_fields(path: Path):
    """Turns a missing key while reading a config's fields into a ConfigError that names it."""
    try:
        yield
    except KeyError as e:
        raise ConfigError(f"{path} is missing the field {e.args[0]!r}") from None


@dataclasses.dataclass(frozen=True)
class BaseTrainConfig:
    model: LlamaConfig
    seed: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float
    corpus_docs: int
    out: Path
    answer_weight: float = 1.0
    repeat_ratio: float = 0.3
    single_fact_ratio: float = 0.0
    gap_words: int = 0
    gap_from_step: int = 0

    @classmethod
    def from_toml(cls, path: str | Path) -> "BaseTrainConfig":
        path = Path(path)
        raw = read_stage_config(path, "base")
        m, t = raw.get("model", {}), raw.get("train", {})
        with config_fields(path):
            model = LlamaConfig(
                vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
                num_key_value_heads=m["num_key_value_heads"],
                head_dim=m["hidden_size"] // m["num_attention_heads"], rms_norm_eps=1e-5,
                rope_theta=float(m.get("rope_theta", 10000.0)), rope_scaling=RopeScaling("default"),
                max_position_embeddings=m["max_position_embeddings"], tie_word_embeddings=True,
                bos_token_id=0, eos_token_id=(EOS,))
            return cls(model=model, seed=t["seed"], steps=t["steps"], batch_size=t["batch_size"],
                       seq_len=t["seq_len"], lr=float(t["lr"]), warmup=t["warmup"],
                       weight_decay=float(t["weight_decay"]), corpus_docs=t["corpus_docs"],
                       out=(path.parent / t["out"]).resolve(), answer_weight=float(t.get("answer_weight", 1.0)),
                       repeat_ratio=float(t.get("repeat_ratio", 0.3)),
                       single_fact_ratio=float(t.get("single_fact_ratio", 0.0)),
                       gap_words=int(t.get("gap_words", 0)), gap_from_step=int(t.get("gap_from_step", 0)))


def token_stream(config: BaseTrainConfig, tokenizer, gap_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All corpus documents, tokenized and joined by <|eos|>: ids [n] and loss weights [n] (reply tokens get
    config.answer_weight, every other token 1)."""
    ids: list[int] = []
    weights: list[float] = []
    for doc in corpus(config.seed, config.corpus_docs, config.repeat_ratio, config.single_fact_ratio, gap_words):
        encoding = tokenizer.encode(doc)
        answers = [(m.start() + 2, m.end()) for m in re.finditer(r"(?m)^A: .*$", doc)]  # " reply" spans
        ids += encoding.ids + [EOS]
        weights += [config.answer_weight if any(a <= start < b for a, b in answers) else 1.0
                    for start, _ in encoding.offsets] + [1.0]
    return torch.tensor(ids), torch.tensor(weights)


def lr_at(step: int, config: BaseTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def batch(stream: torch.Tensor, weights: torch.Tensor, config: BaseTrainConfig, g: torch.Generator
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of seq_len + 1 tokens: ids [B, T + 1] and their loss weights [B, T + 1]."""
    starts = torch.randint(0, stream.numel() - config.seq_len - 1, (config.batch_size,), generator=g).tolist()
    return (torch.stack([stream[s:s + config.seq_len + 1] for s in starts]),
            torch.stack([weights[s:s + config.seq_len + 1] for s in starts]))


def init_model(config: BaseTrainConfig) -> Llama:
    """A fresh model with every weight drawn from the run's seed (normal 0.02, norms 1)."""
    model = Llama(config.model)
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
    return model


def train(config: BaseTrainConfig, *, max_steps: int | None = None, progress: bool = True) -> list[float]:
    """Run (or resume) the base pretraining; returns the loss of every step run now.

    max_steps stops early (for tests and resumable runs); the checkpoint then holds the state to go on.
    Under torchrun each process computes its share of every batch (train.distributed, docs/distributed.md) and
    only the main process writes.
    """
    world = start()
    rows = shard(config.batch_size, world)
    rows = slice(rows.start, rows.stop)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    if not world.main:
        barrier(world)  # the main process trains and saves the tokenizer (or finds it), then the others read it
    if tok_path.exists():
        import tokenizers
        tokenizer = tokenizers.Tokenizer.from_file(str(tok_path))
    else:
        docs = corpus(config.seed, config.corpus_docs, config.repeat_ratio, config.single_fact_ratio, 0)
        tokenizer = train_tokenizer(docs, vocab_size=config.model.vocab_size)
        save_tokenizer(tokenizer, tok_path)
    if world.main:
        barrier(world)
    # Copying emerges on facts right before their question; the gap then teaches it to reach further back.
    near = token_stream(config, tokenizer, 0)
    far = token_stream(config, tokenizer, config.gap_words) if config.gap_words else near
    model = init_model(config).train()
    optim = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(config.seed + 1)
    run = Run(dict(model.named_parameters()), optim, {"batches": g})
    step, _ = resume(out, run, config.steps)
    end = config.steps if max_steps is None else min(config.steps, step + max_steps)
    losses = []
    bar = tqdm(range(step, end), desc="base pretraining", initial=step, total=config.steps,
               disable=not (progress and world.main))
    for step in bar:
        for group in optim.param_groups:
            group["lr"] = lr_at(step, config)
        ids, w = batch(*(far if step >= config.gap_from_step else near), config, g)  # [B, T + 1] each
        logits = model(ids[rows, :-1])  # [b, T, V]: this process's rows (all B in one process)
        token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[rows, 1:].flatten(),
                                                       reduction="none")
        loss = (token_loss * w[rows, 1:].flatten()).sum() / w[:, 1:].sum()  # its share of the batch's mean
        optim.zero_grad(set_to_none=True)
        loss.backward()
        sum_gradients(list(model.parameters()), world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        losses.append(total(loss.item(), world))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if world.main:
        save(out, run, end)
        if end == config.steps:
            model.save_pretrained(out)
    return losses

