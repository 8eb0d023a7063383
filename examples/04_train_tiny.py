"""04 - The whole training recipe on a shortened schedule: base pretraining, then memory stages 1, 2 and 3.

The same code and configs as `make train-tiny` (configs/*-tiny.toml), with far fewer steps and a smaller corpus,
into a temporary folder. It prints each stage's mean loss over its first and last tenth of steps (with the
standard error of each mean) and ends with an M+ in the official layout that examples 02, 03 and 05 (and
`mplus demo --model`) run on; the schedule is far too short for the memory to answer questions (see README,
Training, for what the full schedule reaches).

What the numbers are, and why only the first one clearly falls (not a bug: each stage's loss measures another
task, and with one example per step a tenth of a short stage is a noisy mean: a change smaller than about twice
the standard errors is noise):
  * base: next-token cross-entropy on the corpus (nats per token); it starts near ln(2048) = 7.6, a uniform
    guess over the vocabulary, and falls.
  * stage 1: cross-entropy of the answer tokens only, read back from memory after one chunk was written: a
    harder task than the base's (the answer must come from memory rows, not from the prompt), so it starts
    above the base's last value; over 150 steps it moves within the noise (measured: 3.52 +- 0.11 -> 3.73 +- 0.20).
  * stages 2 and 3: a sum of up to three terms per step: the answer loss of a fact just written (3 steps in
    10), the answer loss of a question about a fact written earlier, and the retriever's BCE. The first steps
    have no earlier fact to ask about, so their sum has fewer terms; later, the questions reach further back
    (up to max_delay chunks: stage 3's 200 is more than the whole shortened run), where the fact has left the
    STM and must come from the LTM. And the tiny configs train only the retriever here (lr = 0: the adapters
    are frozen), so the answer terms cannot fall. Measured: stage 2 5.58 +- 0.64 -> 5.24 +- 0.53, stage 3
    5.10 +- 0.37 -> 5.72 +- 0.55, both within the noise; a rise here is noise or the task filling up, not training
    failing.

Run: .venv/bin/python examples/04_train_tiny.py [OUT_DIR]     (a few minutes on 2 cores)
"""
import re
import sys
import tempfile
from pathlib import Path

from mplus import MPlus
from mplus.train.base import BaseTrainConfig, train as train_base
from mplus.train.recall import RecallConfig, train as train_recall
from mplus.train.stage1 import Stage1Config, train as train_stage1

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mplus-train-"))
out.mkdir(parents=True, exist_ok=True)


def shortened(name: str, **fields) -> Path:
    """configs/<name> with some `key = value` lines replaced, written into `out`."""
    text = (CONFIGS / name).read_text()
    for key, value in fields.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
    path = out / name
    path.write_text(text)
    return path


def mean_and_error(xs: list[float]) -> str:
    """The mean and its standard error (sample standard deviation / sqrt(n))."""
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / max(1, len(xs) - 1)
    return f"{mean:.3f} +- {(var / len(xs)) ** 0.5:.3f}"


def report(stage: str, losses: list[float], what: str) -> None:
    n = max(1, len(losses) // 10)
    print(f"{stage}: loss {mean_and_error(losses[:n])} (first {n} steps) -> {mean_and_error(losses[-n:])} "
          f"(last {n})\n    {what}")


report("base (120 steps)", train_base(BaseTrainConfig.from_toml(shortened(
    "base-tiny.toml", steps=120, warmup=20, corpus_docs=2000, out='"base"'))),
       "next-token loss on the corpus: falls from ~ln(2048) = 7.6, a uniform guess")
report("stage 1 (150 steps)", train_stage1(Stage1Config.from_toml(shortened(
    "stage1-tiny.toml", steps=150, base='"base"', out='"stage1"'))),
       "answer loss read from memory, one example per step: flat within the noise this early")
report("stage 2 (150 steps)", train_recall(RecallConfig.from_toml(shortened(
    "stage2-tiny.toml", steps=150, init='"stage1"', out='"stage2"'))),
       "fresh + delayed answer losses + retriever BCE, summed; only the retriever trains (lr 0)")
report("stage 3 (150 steps)", train_recall(RecallConfig.from_toml(shortened(
    "stage3-tiny.toml", steps=150, init='"stage2"', out='"stage3"'))),
       "as stage 2 with the LTM on; questions reach further back as facts pile up, so it may rise (docstring)")
model = MPlus.from_pretrained(out / "stage3")
print(f"trained M+ in {out / 'stage3'}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
      f"try: mplus demo --model {out / 'stage3'}")
