"""Base pretraining on the fact corpus: the loss falls, runs are deterministic, and resuming equals not stopping."""
import torch
from safetensors.torch import load_file

from mplus.train.base import BaseTrainConfig, train

CONFIG = """
stage = "base"

[model]
vocab_size = 512
hidden_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
intermediate_size = 128
max_position_embeddings = 512

[train]
seed = 3
steps = 40
batch_size = 8
seq_len = 64
lr = 3e-3
warmup = 5
weight_decay = 0.1
corpus_docs = 150
out = "run"
"""


def config_in(folder):
    (folder / "base.toml").write_text(CONFIG)
    return BaseTrainConfig.from_toml(folder / "base.toml")


def test_loss_falls_and_the_run_is_deterministic(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = train(config_in(tmp_path / "a"), progress=False)
    b = train(config_in(tmp_path / "b"), progress=False)
    assert a == b
    assert sum(a[-5:]) / 5 < sum(a[:5]) / 5 - 1.0  # starts near ln(512) = 6.2; must learn the corpus
    assert (tmp_path / "a" / "run" / "model.safetensors").exists()


def test_resume_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "once").mkdir(), (tmp_path / "twice").mkdir()
    whole = train(config_in(tmp_path / "once"), progress=False)
    split = config_in(tmp_path / "twice")
    first = train(split, max_steps=17, progress=False)
    rest = train(split, progress=False)
    assert first + rest == whole
    one = load_file(tmp_path / "once" / "run" / "train_state.safetensors")  # weights, Adam moments, generator
    two = load_file(tmp_path / "twice" / "run" / "train_state.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_answer_weight_marks_exactly_the_answer_tokens(tmp_path):
    import dataclasses

    from mplus.data.facts import corpus
    from mplus.data.bpe import train_tokenizer
    from mplus.train.base import token_stream
    config = dataclasses.replace(config_in(tmp_path), corpus_docs=5, answer_weight=7.0)
    tokenizer = train_tokenizer(corpus(config.seed, 50), vocab_size=512)
    ids, weights = token_stream(config, tokenizer, 0)
    marked = tokenizer.decode(ids[weights == 7.0].tolist())
    answers = [line[2:] for doc in corpus(config.seed, 5) for line in doc.split("\n") if line.startswith("A: ")]
    assert marked == "".join(answers) and set(weights.tolist()) == {1.0, 7.0}
