"""Stage 1 on the fact task, in miniature (with the committed config's placement and filler STM): it runs from a
base checkpoint and resumes exactly."""
import math

import torch

from mplus.train.base import BaseTrainConfig
from test_train_base import CONFIG as BASE
from mplus.train.base import train as train_base
from mplus.train.stage1 import Stage1Config, train

STAGE1 = """
stage = "memory1"
[memory]
num_tokens = 8
num_blocks = 6
num_ltm_blocks = 2
selector_hidden_dim = 16
update_ltm_frequency = 4
lora_r = 4
lora_alpha = 8
[train]
base = "base"
seed = 0
steps = 24
lr = 5e-3
fresh_ratio = 0.2
filler_words = 10
out = "{out}"
max_age = 3
min_keep = 0.3
ltm_ratio = 0.3
stm_filler_words = 12
"""


def test_stage1_runs_learns_and_resumes(tmp_path):
    (tmp_path / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"'))
    train_base(BaseTrainConfig.from_toml(tmp_path / "base.toml"), progress=False)
    for name in ("once", "twice"):
        (tmp_path / f"{name}.toml").write_text(STAGE1.format(out=name))
    whole = train(Stage1Config.from_toml(tmp_path / "once.toml"), progress=False)
    assert all(math.isfinite(x) for x in whole)  # learning itself: test_train_memory (one example, loss halves)
    split = Stage1Config.from_toml(tmp_path / "twice.toml")
    assert train(split, max_steps=10, progress=False) + train(split, progress=False) == whole
    from mplus import MPlus
    model = MPlus.from_pretrained(tmp_path / "once")
    assert model.memory_config.stm_size == 32 and (tmp_path / "once" / "tokenizer.json").exists()
    assert torch.isfinite(model(model.initial_state(), torch.arange(3, 9))).all()
    assert Stage1Config.from_toml(tmp_path / "once.toml").placement.ltm_ratio == 0.3
