"""05 - The retention curve: how long an M+ remembers a fact, with and without its LTM, and where it forgets.

A small version of `mplus bench retention` (fewer episodes and distances): fresh test-partition facts are
written, followed by D filler chunks, then asked, of M+, of MemoryLLM (the same weights and STM, LTM switched
off), of a MemoryLLM with as many memory rows as M+ reads, and of the decoder with everything in its prompt
(where it fits); it also prints how often the retriever brings back the fact's LTM rows against chance, and
the LTM's time-to-live: the distances run past it, where M+ forgets too.
Writes retention.csv and retention.svg into OUT_DIR (default: here).

Run: .venv/bin/python examples/05_retention_curve.py [MODEL_DIR [OUT_DIR]]   (a few minutes)
MODEL_DIR defaults to the shipped checkpoints/tiny-mplus; examples/04 trains one to try these on.
"""
import sys
from pathlib import Path

from mplus import MPlus
from mplus.apps.bench_retention import chart, ltm_lifetime, run, summary, to_csv
from mplus.apps.paths import tiny_model_path
from mplus.llama.tokenizer import Tokenizer

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_model_path()  # any M+ folder
out = Path(sys.argv[2] if len(sys.argv) > 2 else ".")
model = MPlus.from_pretrained(folder)
tok = Tokenizer.from_file(folder)
tok.check_model_vocab(model.config.vocab_size)
life = ltm_lifetime(model.memory_config) or 192  # chunks a dropped row stays in the LTM (228 for the shipped model)
distances = [0, 2, 8, 24, 64, life // 2, life, life * 5 // 4, life * 3 // 2]
result = run(model, tok, seed=2024, episodes=24, distances=distances, chunk_words=48, filler_words=12)
print(summary(result))
(out / "retention.csv").write_text(to_csv(result))
chart(result, out / "retention.svg", "Retention of the tiny M+ (24 facts per point)")
print(f"wrote {out / 'retention.csv'} and {out / 'retention.svg'}")
