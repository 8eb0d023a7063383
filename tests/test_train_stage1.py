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


def test_stage1_continues_a_trained_model_with_its_memory_settings(tmp_path):
    """init: a second stage 1 (e.g. with a filled retrieved zone) starts from the first one's weights and STM."""
    from mplus import MPlus
    from mplus.llama.config import ConfigError
    import pytest
    (tmp_path / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"').replace("steps = 40", "steps = 5"))
    train_base(BaseTrainConfig.from_toml(tmp_path / "base.toml"), progress=False)
    (tmp_path / "first.toml").write_text(STAGE1.format(out="first").replace("steps = 24", "steps = 4"))
    train(Stage1Config.from_toml(tmp_path / "first.toml"), progress=False)
    memory = STAGE1[STAGE1.index("[memory]"):STAGE1.index("[train]")]
    second = STAGE1.format(out="second").replace(memory, "").replace("[train]", '[train]\ninit = "first"\nfilled_ratio = 0.5')
    (tmp_path / "second.toml").write_text(second.replace("steps = 24", "steps = 3"))
    config = Stage1Config.from_toml(tmp_path / "second.toml")
    assert config.memory is None and config.placement.filled_ratio == 0.5
    losses = train(config, progress=False)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    first, cont = (MPlus.from_pretrained(tmp_path / n) for n in ("first", "second"))
    assert cont.memory_config == first.memory_config
    a, b = first.state_dict(), cont.state_dict()
    lora = [n for n in a if ".lora_B." in n]
    assert any(not torch.equal(a[n], b[n]) for n in lora)  # it trained on...
    base = [n for n in a if n.endswith("mlp.down_proj.base_layer.weight")]
    assert all(torch.equal(a[n], b[n]) for n in base)  # ...the same frozen base
    (tmp_path / "both.toml").write_text(second.replace("[train]", STAGE1[STAGE1.index("[memory]"):STAGE1.index("[train]")] + "[train]"))
    with pytest.raises(ConfigError, match="remove the \\[memory\\] section"):
        Stage1Config.from_toml(tmp_path / "both.toml")


def test_bos_init_hidden_starts_the_bos_rows_from_the_base(tmp_path):
    """bos_init = "hidden": the saved model's BOS rows are the base's hidden states at BOS, moved only by training;
    a continued model (init) keeps its own, so the key is refused there."""
    from mplus import MPlus
    from mplus.llama.config import ConfigError
    import pytest
    (tmp_path / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"').replace("steps = 40", "steps = 5"))
    train_base(BaseTrainConfig.from_toml(tmp_path / "base.toml"), progress=False)
    (tmp_path / "s.toml").write_text(STAGE1.format(out="s").replace("steps = 24", "steps = 2")
                                     .replace("[train]", '[train]\nbos_init = "hidden"'))
    train(Stage1Config.from_toml(tmp_path / "s.toml"), progress=False)
    model = MPlus.from_pretrained(tmp_path / "s")
    official = MPlus.from_llama(tmp_path / "base", model.memory_config).bos_embedding
    hidden = MPlus.from_llama(tmp_path / "base", model.memory_config, bos="hidden").bos_embedding
    assert (model.bos_embedding - hidden).abs().max() < 0.05 < (model.bos_embedding - official).abs().max()
    (tmp_path / "c.toml").write_text(STAGE1.format(out="c").replace(STAGE1[STAGE1.index("[memory]"):STAGE1.index("[train]")], "")
                                     .replace("[train]", '[train]\ninit = "s"\nbos_init = "hidden"'))
    with pytest.raises(ConfigError, match="bos_init"):
        Stage1Config.from_toml(tmp_path / "c.toml")


def test_rivals_in_sequence_reaches_the_loss_and_must_be_a_boolean(tmp_path, monkeypatch):
    import pytest
    import mplus.train.stage1 as stage1
    from mplus.llama.config import ConfigError
    (tmp_path / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"').replace("steps = 40", "steps = 5"))
    train_base(BaseTrainConfig.from_toml(tmp_path / "base.toml"), progress=False)
    seen, loss = [], stage1.stage1_loss
    monkeypatch.setattr(stage1, "stage1_loss", lambda *a, **kw: seen.append(kw["in_sequence"]) or loss(*a, **kw))
    for out, value, expected in (("a", "", False), ("b", "rivals_in_sequence = true", True)):
        (tmp_path / "s.toml").write_text(STAGE1.format(out=out).replace("steps = 24", "steps = 1")
                                         .replace("[train]", f"[train]\n{value}"))
        train(Stage1Config.from_toml(tmp_path / "s.toml"), progress=False)
        assert seen.pop() is expected
    (tmp_path / "s.toml").write_text(STAGE1.format(out="s").replace("[train]", '[train]\nrivals_in_sequence = "yes"'))
    with pytest.raises(ConfigError, match="rivals_in_sequence"):
        Stage1Config.from_toml(tmp_path / "s.toml")


def test_rival_empty_ratio_gives_the_loss_an_empty_stm_and_is_a_share(tmp_path, monkeypatch):
    """An example drawn as empty reads and writes with zeros in place of the step's STM; the others with the STM."""
    import pytest
    import mplus.train.stage1 as stage1
    from mplus.llama.config import ConfigError
    (tmp_path / "base.toml").write_text(BASE.replace('out = "run"', 'out = "base"').replace("steps = 40", "steps = 5"))
    train_base(BaseTrainConfig.from_toml(tmp_path / "base.toml"), progress=False)
    seen, loss, draw = [], stage1.stage1_loss, Stage1Config.draw
    monkeypatch.setattr(stage1, "stage1_loss", lambda model, stm, *a, **kw: seen.append(stm) or loss(model, stm, *a, **kw))
    for empty in (False, True):
        monkeypatch.setattr(Stage1Config, "draw", lambda self, *a: (*draw(self, *a)[:2], empty))
        (tmp_path / "s.toml").write_text(STAGE1.format(out=f"s{empty}").replace("steps = 24", "steps = 1"))
        train(Stage1Config.from_toml(tmp_path / "s.toml"), progress=False)
        assert bool(seen.pop().abs().sum() == 0) is empty
    for bad in ("1.5", "true", '"half"'):
        (tmp_path / "s.toml").write_text(STAGE1.format(out="s").replace("[train]", f"[train]\nrival_empty_ratio = {bad}"))
        with pytest.raises(ConfigError, match="rival_empty_ratio"):
            Stage1Config.from_toml(tmp_path / "s.toml")
