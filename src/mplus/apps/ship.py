"""`mplus ship`: keep only what memory training added to a frozen base, and name the base by its hash.

Reads a trained M+ folder (all weights) and the base folder it was trained around, checks that every base
weight is unchanged (training froze them; a difference means the folder is not a frozen-base M+), and writes
--out with the adapters, retriever, embeddings and memory (bf16), the config naming the base with the sha256 of
its model.safetensors (memory/base_ref.py), and the tokenizer. A model card (README.md) in --out is kept.
The encoder retriever is left out (add_encoder_retriever false): inference never uses it, and this project's
stages never train it (train/recall.py), so it would ship only its random initial weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from mplus.apps.cli_args import CliError
from mplus.formats.hf_folder import read_tensors
from mplus.memory.base_ref import base_name, file_sha256, is_base_weight
from mplus.memory.mplus import MPlus


def changed_base_weights(model: MPlus, base: Path) -> list[str]:
    """Names of the model's base weights that differ from the base folder's."""
    names = {base_name(n): n for n, _ in model.named_parameters() if is_base_weight(n)}
    stored = read_tensors(base, [n for n in names if n != "lm_head.weight" or not model.config.tie_word_embeddings])
    params = dict(model.named_parameters())
    return [n for n, t in stored.items() if not torch.equal(params[names[n]], t.to(params[names[n]].dtype))]


def ship(model_folder: Path, base: Path, out: Path) -> Path:
    model = MPlus.from_pretrained(model_folder)
    if changed := changed_base_weights(model, base):
        raise CliError(f"{model_folder} changed {len(changed)} base weights (e.g. {changed[0]}) against {base}: it "
                       "was not trained around this frozen base; ship the whole folder instead")
    model.memory_config = dataclasses.replace(model.memory_config, add_encoder_retriever=False)
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "encoder_query_proj"):
            del layer.self_attn.encoder_query_proj
    ref = {"name": base.name, "sha256": file_sha256(base / "model.safetensors")}
    model.save_pretrained(out, model.checkpoint_state, base=ref)
    shutil.copyfile(model_folder / "tokenizer.json", out / "tokenizer.json")
    return out


def main(args: argparse.Namespace) -> None:
    out = ship(Path(args.model), Path(args.base), Path(args.out))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}: {size / 2**20:.1f} MB, base {Path(args.base).name}")
