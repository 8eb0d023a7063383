"""04 - The whole training recipe on a shortened schedule: base pretraining, then memory stages 1, 2 and 3.

The same code and configs as `make train-tiny` (configs/*-tiny.toml), with far fewer steps and a smaller corpus,
into a temporary folder. It prints each stage's first and last losses and ends with an M+ in the official
layout that examples 02, 03 and 05 (and `mplus demo --model`) run on; the schedule is far too short for the
memory to answer questions (see README, Training, for what the full schedule reaches).

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


def report(stage: str, losses: list[float]) -> None:
    n = max(1, len(losses) // 10)
    print(f"{stage}: loss {sum(losses[:n]) / n:.3f} (first {n} steps) -> {sum(losses[-n:]) / n:.3f} (last {n})")


report("base (120 steps)", train_base(BaseTrainConfig.from_toml(shortened(
    "base-tiny.toml", steps=120, warmup=20, corpus_docs=2000, out='"base"'))))
report("stage 1 (150 steps)", train_stage1(Stage1Config.from_toml(shortened(
    "stage1-tiny.toml", steps=150, base='"base"', out='"stage1"'))))
report("stage 2 (150 steps)", train_recall(RecallConfig.from_toml(shortened(
    "stage2-tiny.toml", steps=150, init='"stage1"', out='"stage2"'))))
report("stage 3 (150 steps)", train_recall(RecallConfig.from_toml(shortened(
    "stage3-tiny.toml", steps=150, init='"stage2"', out='"stage3"'))))
model = MPlus.from_pretrained(out / "stage3")
print(f"trained M+ in {out / 'stage3'}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
      f"try: mplus demo --model {out / 'stage3'}")
