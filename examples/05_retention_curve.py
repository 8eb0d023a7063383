"""05 - The retention curve: how long an M+ remembers a fact, with and without its LTM.

A small version of `mplus bench retention` (fewer episodes and distances): fresh test-partition facts are
written, followed by D filler chunks, then asked, of M+ and of MemoryLLM (the same weights and STM, LTM
switched off); it also prints how often the retriever brings back the fact's LTM rows against chance.
Writes retention.csv and retention.svg into OUT_DIR (default: here).

Run: .venv/bin/python examples/05_retention_curve.py [MODEL_DIR [OUT_DIR]]   (about a minute)
MODEL_DIR defaults to the shipped checkpoints/tiny-mplus; examples/04 trains one to try these on.
"""
import sys
from pathlib import Path

import tokenizers

from mplus import MPlus
from mplus.bench_retention import MODELS, run, summary, to_csv
from mplus.chart import line_chart
from mplus.paths import tiny_model_path

folder = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_model_path()  # any M+ folder
out = Path(sys.argv[2] if len(sys.argv) > 2 else ".")
model = MPlus.from_pretrained(folder)
tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
result = run(model, tok, seed=2024, episodes=24, distances=[0, 2, 8, 24, 64, 128], chunk_words=48, filler_words=12)
print(summary(result))
(out / "retention.csv").write_text(to_csv(result))
line_chart({m: list(zip(result["tokens"], result["accuracy"][m])) for m in MODELS}, out / "retention.svg",
           title="Retention of the tiny M+ (24 facts per point)", x_label="tokens injected after the fact",
           y_label="accuracy")
print(f"wrote {out / 'retention.csv'} and {out / 'retention.svg'}")
