"""The real SmolLM2-135M-Instruct (converted from the pinned GGUF) against transformers and independently recorded reference numbers."""
import pytest
import torch

from hf_oracle import LlamaForCausalLM
from mplus import Llama, Tokenizer
from mplus.apps.paths import smollm2_dir

pytestmark = pytest.mark.real

# Reference numbers recorded independently of this code: the test sentence, its 20 ids and NLL, a greedy continuation.
SENTENCE = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
SENTENCE_NLL = 2.5492
FRANCE = [504, 3575, 282, 4649, 314]
FRANCE_GREEDY_20 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216]
PARAGRAPH = ("Memory lets a language model carry facts from one document to the next. MemoryLLM keeps a pool "
             "of hidden states in every layer and rewrites a small part of it whenever new text arrives, while "
             "M+ moves the tokens it drops into a long-term store and retrieves them when a question needs them. "
             "Both read the memory as extra keys and values placed in front of the input.")
TOL = 1e-4


@pytest.fixture(scope="module")
def models(artifacts):
    folder = smollm2_dir()
    return Llama.from_pretrained(folder), LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(artifacts):
    return Tokenizer.from_file(smollm2_dir())


def mean_nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:]).item()


def test_sentence_nll_matches_reference_and_transformers(models, tokenizer):
    ours, hf = models
    ids = torch.tensor([tokenizer.encode(SENTENCE)])
    assert ids.shape[1] == 20
    with torch.no_grad():
        theirs = mean_nll(hf(ids).logits.float(), ids)
    mine = mean_nll(ours(ids), ids)
    assert abs(mine - theirs) <= TOL
    assert abs(mine - SENTENCE_NLL) <= 1e-4


def test_paragraph_nll_and_logits_match_transformers(models, tokenizer):
    ours, hf = models
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    assert ids.shape[1] > 60
    with torch.no_grad():
        expected = hf(ids).logits.float()
    got = ours(ids)
    assert abs(mean_nll(got, ids) - mean_nll(expected, ids)) <= TOL
    assert (got - expected).abs().max().item() <= 1e-3  # logits of magnitude ~20; fp32 reordering only


def test_greedy_continuation_is_the_reference_one(models):
    ours, hf = models
    assert ours.generate(FRANCE, max_new_tokens=20, stop_ids=()) == FRANCE_GREEDY_20
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([FRANCE]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert theirs[0, len(FRANCE):].tolist() == FRANCE_GREEDY_20
    first = ours(torch.tensor([FRANCE]))[0, -1]
    assert int(first.argmax()) == 7042 and abs(first[7042].item() - 17.3713) < 1e-3


def test_chat_answer(models, tokenizer):
    ours, _ = models
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert ids == [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    out = ours.generate(ids, max_new_tokens=20, stop_ids=tokenizer.eos_ids)
    assert out == [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"


def test_kv_cached_decoding_equals_full_forward(models, tokenizer):
    ours, _ = models
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])[:, :48]
    full = ours(ids)
    cache = ours.new_cache(48)
    steps = [ours(ids[:, :16], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(16, 48)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= TOL
