"""The retention benchmark's arithmetic and outputs (d50 interpolation, the LTM lifetime, the CSV columns, a
well-formed chart) and its baselines (the same-size MemoryLLM, the in-context reader) on the shipped model."""
import copy
import csv
import dataclasses
import io
import random
import xml.etree.ElementTree as ET

import pytest
import tokenizers
import torch

from mplus import Llama, MPlus
from mplus.apps.baselines import fits_in_context, in_context_reply, same_size_memoryllm
from mplus.apps.bench_retention import d50, default_distances, ltm_lifetime, summary, to_csv
from mplus.apps.retention_episodes import write_both
from mplus.apps.chart import line_chart
from mplus.data.facts import distractor_chunk
from mplus.memory.ltm import merge
from mplus.memory.config import MemoryConfig
from mplus.apps.paths import tiny_model_path


def test_d50_interpolates_to_half_the_distance_zero_accuracy():
    assert d50([0, 100, 200], [1.0, 0.8, 0.4]) == 175  # 0.5 is 3/4 of the way from 0.8 to 0.4
    assert d50([0, 100, 200], [0.8, 0.4, 0.1]) == 100  # reaching exactly half counts
    assert d50([0, 100, 200], [0.9, 0.8, 0.6]) is None  # never halves within the measured range


def mplus_memory(rf: float, every: int = 12) -> MemoryConfig:
    return MemoryConfig(kind="mplus", num_tokens=16, num_blocks=12, num_ltm_blocks=4, update_ltm_frequency=every,
                        initial_rf_when_moving_stm_to_ltm=rf)


@pytest.mark.parametrize("rf, every, want", [(20.0, 12, 228), (10.0, 12, 108), (10.0, 60, 540), (1.5, 5, 5)])
def test_ltm_lifetime_counts_the_merges_a_row_survives(rf, every, want):
    # rf 10, a merge every 60 updates: the released M+, whose rows are evicted at the 9th merge after their own
    # (540 updates); rf 20 and 12: the shipped tiny model (19 merges); rf 1.5: 0.5 after its own merge, 0 at the next
    assert ltm_lifetime(mplus_memory(rf, every)) == want
    # the same count from ltm.merge itself: one row enters with 3 others that never expire, merges until it is gone
    z = torch.zeros
    ltm, keys, ages = z(3, 2), z(3, 1), torch.zeros(3, dtype=torch.long)
    rfs = torch.full((3,), 1e9, dtype=torch.float64)
    ltm, keys, ages, rfs = merge(ltm, keys, ages, rfs, torch.ones(1, 2), z(1, 1), torch.zeros(1, dtype=torch.long),
                                 initial_rf=rf, decay=1.0, min_rows=0)
    merges = 0
    while ltm.shape[0] == 4:
        ltm, keys, ages, rfs = merge(ltm, keys, ages, rfs, z(0, 2), z(0, 1), torch.zeros(0, dtype=torch.long),
                                     initial_rf=rf, decay=1.0, min_rows=0)
        merges += 1
    assert merges * every == want


def test_default_distances_run_past_twice_the_lifetime():
    d = default_distances(228)
    assert d[0] == 0 and d == sorted(set(d)) and max(d) == 456 and {128, 228, 239, 251} <= set(d)
    assert max(default_distances(None)) == 192
    assert ltm_lifetime(dataclasses.replace(mplus_memory(20), kind="memoryllm", num_ltm_blocks=0)) is None


RESULT = {"distances": [0, 4, 16], "tokens": [0.0, 240.4, 961.0], "episodes": 10,
          "models": ("mplus", "memoryllm", "memoryllm_n192", "in_context", "no_context"),
          "accuracy": {"mplus": [1.0, 0.9, 0.7], "memoryllm": [1.0, 0.6, 0.2], "memoryllm_n192": [1.0, 0.8, 0.3],
                       "in_context": [0.9, 0.8, None], "no_context": [0.1, 0.1, 0.1]},
          "recall": [[0, 0, 0.0, 0], [8, 16, 0.1, 1], [30, 64, 0.4, 4]],
          "ltm": {"initial_rf": 20.0, "decay": 1.0, "merge_every": 12, "lifetime": 228}}


def test_csv_has_one_row_per_model_and_measured_distance():
    rows = list(csv.DictReader(io.StringIO(to_csv(RESULT))))
    assert list(rows[0]) == ["model", "distance_tokens", "accuracy", "n"]
    want = [(m, t) for m in RESULT["models"] for t in ("0", "240", "961")]
    want.remove(("in_context", "961"))  # not measured there: left out, not written as 0
    assert [(r["model"], r["distance_tokens"]) for r in rows] == want
    assert rows[4]["accuracy"] == "0.6000" and rows[4]["n"] == "10"


def test_summary_reports_the_setting_d50s_ratios_and_recall():
    text = summary(RESULT)
    # memoryllm halves between 240 (0.6) and 961 (0.2): 240.4 + 720.6 * 0.1 / 0.4 = 420.55; mplus never halves
    assert "memoryllm 421 tokens" in text and "mplus > 961 tokens" in text
    # memoryllm_n192 halves between 240 (0.8) and 961 (0.3): 240.4 + 720.6 * 0.3 / 0.5 = 672.76
    assert "memoryllm_n192 673 tokens" in text and "in_context > 240 tokens" in text
    assert "d50 ratio mplus / memoryllm: >= 2.3" in text and "d50 ratio mplus / memoryllm_n192: >= 1.4" in text
    assert "recall of the fact's LTM rows: 0.475 vs random 0.100" in text  # 38/80 vs 0.5/5
    # the time-to-live and what it means: 228 chunks of 961 / 16 tokens = 13 694 tokens
    assert "initial_rf_when_moving_stm_to_ltm 20 (the released M+ uses 10)" in text
    assert "leaves the LTM 228 chunks (~13694 tokens) after the merge" in text


def test_chart_is_well_formed_svg_with_a_marker(tmp_path):
    line_chart({"a": [(0, 1.0), (100, 0.5)], "b": [(0, 0.2), (100, 0.1)]}, tmp_path / "c.svg", title="t",
               x_label="x", y_label="y", markers={"lifetime": 50})
    root = ET.parse(tmp_path / "c.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag.endswith("svg") and len(root.findall(f"{ns}polyline")) == 2
    assert [t.text for t in root.findall(f"{ns}text")].count("lifetime") == 1
    assert len([x for x in root.findall(f"{ns}line") if x.get("stroke-dasharray")]) == 1


@pytest.fixture(scope="module")
def shipped():
    folder = tiny_model_path()
    return MPlus.from_pretrained(folder), tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_same_size_memoryllm_holds_the_mplus_rows_and_writes_the_same_blocks(shipped, tmp_path):
    model, tok = shipped
    big = same_size_memoryllm(model)
    mem, state = model.memory_config, model.checkpoint_state
    n, k0 = mem.stm_size, mem.ltm_retrieved
    assert big.memory_config.kind == "memoryllm" and big.memory_config.stm_size == n + k0 == 192
    assert big.memory_config.virtual_prefix == mem.virtual_prefix  # the question sits at the same positions
    grown = big.checkpoint_state.stm  # [L, N + K0, d]
    for l in range(state.num_layers):
        assert torch.equal(grown[l, k0:], state.stm[l])  # the M+ STM, last
        m = state.ltm[l]
        youngest = m.ages.sort().values[:k0]
        ltm_rows = [i for i in range(len(m)) for r in grown[l, :k0] if torch.equal(m.rows[i], r)]
        assert len(ltm_rows) == k0 and sorted(m.ages[ltm_rows].tolist()) == youngest.tolist()
    # the benchmark's shortcut: a chunk's block written into the M+ state equals the one the MemoryLLM encodes
    rng = random.Random(5)
    a, b, c = model.initial_state(1), big.initial_state(2), big.initial_state(2)
    for _ in range(3):
        ids = tok.encode(distractor_chunk(rng, 20)).ids
        shared = write_both(model, a, big, b, ids)
        assert torch.equal(big.inject(c, ids, allow_short=True), shared)
    assert torch.equal(b.stm, c.stm) and not torch.equal(a.stm, b.stm[:, k0:])  # own drops, from 192 rows
    # it is a real MemoryLLM checkpoint: it saves and loads as one, and answers the same
    big.save_pretrained(tmp_path)
    again = MPlus.from_pretrained(tmp_path)
    prompt = tok.encode("Q: Where does Talvori Quen live?\nA:").ids
    assert again.memory_config.kind == "memoryllm" and torch.equal(again.checkpoint_state.stm, grown)
    assert again.generate(again.initial_state(), prompt, max_new_tokens=8) == \
        big.generate(big.initial_state(), prompt, max_new_tokens=8)


def test_in_context_reader_is_the_decoder_with_its_read_adapter(shipped):
    model, tok = shipped
    # reference: a plain Llama whose weights have the read adapter folded in
    merged = copy.deepcopy(model)
    merged.merge_read_adapter()
    llama = Llama(model.config)
    weights = {name.replace(".base_layer.", "."): w for name, w in merged.state_dict().items()}
    llama.load_state_dict({name: weights[name] for name in llama.state_dict()})
    ids = tok.encode("Dana Brel lives in Skadell. The old ferry waits.\nQ: Where does Dana Brel live?\nA:").ids
    assert in_context_reply(model, ids) == llama.generate(ids, max_new_tokens=16)
    limit = model.config.max_position_embeddings
    assert fits_in_context(model, limit - 16) and not fits_in_context(model, limit - 15)
    with pytest.raises(ValueError, match="exceed the model's"):
        in_context_reply(model, [5] * (limit - 15))


def test_a_memory_with_too_short_an_ltm_cannot_be_grown_and_the_summary_says_so(shipped):
    model, _ = shipped
    short = copy.copy(model)
    short.checkpoint_state = model.checkpoint_state.copy()
    for m in short.checkpoint_state.ltm:  # 10 rows; K0 = 64 are needed
        m.rows, m.keys, m.ages, m.rf = m.rows[:10], m.keys[:10], m.ages[:10], m.rf[:10]
    with pytest.raises(ValueError, match="holds 10 long-term rows, fewer than the 64 needed"):
        same_size_memoryllm(short)
    skipped = {**RESULT, "skipped": {"memoryllm_n192": "too few rows"},
               "accuracy": {**RESULT["accuracy"], "memoryllm_n192": [None] * 3}}
    text = summary(skipped)
    assert "memoryllm_n192 not measured: too few rows" in text and "mplus / memoryllm_n192" not in text
    assert not any(r.startswith("memoryllm_n192") for r in to_csv(skipped).splitlines())
