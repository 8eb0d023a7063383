"""Llama checkpoints: a HF folder (config.json and safetensors) read into the hand-written model, and written back.

Loading builds the module on the meta device, checks the config's sizes against the tensor shapes in the file
headers before anything is allocated, allocates every weight once (in the packed decoding layout if asked) and
fills it straight from the files (mplus.formats.hf_folder).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mplus.formats.atomic import atomic_write_text
from mplus.formats.hf_folder import checkpoint_index, load_state_into, save_tensors
from mplus.formats.safetensors import WeightsError
from mplus.llama.config import LlamaConfig
from mplus.llama.config_values import read_json_object
from mplus.llama.packing import materialize, pack_for_inference
from mplus.llama.quant import Int8Linear, load_quantized, quantize_layout
from mplus.llama.sizes import check_sizes, header_shapes


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def declared_dtype(path: str | Path) -> torch.dtype:
    """The weight dtype a HF folder's config.json declares ("torch_dtype", or "dtype" as newer transformers
    writes it); float32 when it declares none or one that is not a float type of TORCH_DTYPES."""
    raw = read_json_object(Path(path) / "config.json")
    name = raw.get("torch_dtype", raw.get("dtype"))
    return TORCH_DTYPES.get(name, torch.float32) if isinstance(name, str) else torch.float32


def load_model(cls, path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
               packed: bool = True, quantize: str | None = None):
    """Build `cls(config)` on the meta device, allocate its storage once, and fill it from a HF Llama folder.

    The model is for inference (eval mode, no grads). packed: store the weights in the fast decoding layout
    of packing.py (same values and names); the packed storage is allocated before any data is read, so the
    weights are never held twice. quantize="int8": int8 weight-only projections (see quant.py); dtype is then
    that of the activations, norms and cache.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise WeightsError(f"model folder {folder} does not exist; run `mplus fetch` or pass a HF model folder")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    config = LlamaConfig.from_file(folder)
    check_sizes(config, header_shapes(checkpoint_index(folder)))  # before the config's sizes are allocated
    with torch.device("meta"):
        model = cls(config)
    if quantize == "int8":
        targets = quantize_layout(model, dtype)
        materialize(model, dtype)  # the norms (and an untied embedding)
        load_quantized(model, folder, targets, progress)
        return model.eval()
    if packed:
        pack_for_inference(model, dtype)
    materialize(model, dtype)
    tied = config.tie_word_embeddings
    load_state_into(model, folder, optional=("lm_head.weight",) if tied else (),
                    rename=(lambda n: None if n == "lm_head.weight" else n) if tied else (lambda n: n),
                    progress=progress)
    return model.eval()


def save_model(model, path: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write the weights in HF layout, then config.json; sharded with an index if max_shard_bytes (see save_tensors)."""
    if isinstance(model.lm_head, Int8Linear):
        raise ValueError("an int8-quantized model cannot be saved (it would not load back as the float model): "
                         "save the float model, and quantize when loading it")
    folder = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_tensors(state, folder, max_shard_bytes)
    config = model.config.to_dict() | {"torch_dtype": str(model.dtype).removeprefix("torch.")}
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
