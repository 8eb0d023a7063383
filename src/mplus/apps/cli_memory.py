"""The memory commands of `mplus` (inject, ask, inspect): loading an M+ / MemoryLLM folder and a state file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mplus.apps.cli_args import DTYPES, CliError, read_text
from mplus.memory.state_file import MIN_KEY as MIN_KEY_BYTES


def holds_memory(folder: Path) -> bool | None:
    """Whether the folder's weights hold a memory; None if they cannot be read (the loader then says why)."""
    from mplus.memory.checkpoint import is_memory_checkpoint
    try:
        return is_memory_checkpoint(folder)
    except ValueError:
        return None


def weight_dtype(args: argparse.Namespace, folder: Path) -> torch.dtype:
    """--dtype if given, else the dtype the checkpoint's config.json declares (float32 if none): an 8B model
    stored in bfloat16 then loads in 16 GB, not the 32 GB of float32."""
    from mplus.llama.checkpoint import declared_dtype
    return DTYPES[args.dtype] if args.dtype else declared_dtype(folder)


def _load_memory_model(args: argparse.Namespace):
    from mplus.apps.fetch import load_mplus
    from mplus.llama.tokenizer import Tokenizer
    folder = Path(args.model)
    if holds_memory(folder) is False:
        raise CliError(f"{folder} is a plain Llama checkpoint, with no memory to write into or read from: continue "
                       "text with `mplus generate` or chat with `mplus chat`; for a memory, point at an M+ or "
                       "MemoryLLM folder (e.g. checkpoints/tiny-mplus)")
    tokenizer = Tokenizer.from_file(args.tokenizer or folder)
    model = load_mplus(folder, dtype=weight_dtype(args, folder), progress=True, device=args.device)
    tokenizer.check_model_vocab(model.config.vocab_size)
    return model, tokenizer


def _load_state(model, path: Path, key: bytes | None, seed: int = 0):
    from mplus.memory.state import MemoryState
    if path.exists():
        return MemoryState.load(path, expect=model.state_spec(), key=key, placement=model.placement)
    return model.initial_state(seed)


def _read_key(args: argparse.Namespace) -> bytes | None:
    """The signing key of --key-file (its bytes as they are), or None."""
    if args.key_file is None:
        return None
    key = args.key_file.read_bytes()
    if len(key) < MIN_KEY_BYTES:
        raise CliError(f"{args.key_file} holds {len(key)} bytes; a key file holds at least {MIN_KEY_BYTES} random "
                       "bytes: make one with `head -c 32 /dev/urandom > KEYFILE` and keep it away from the states")
    return key


def cmd_inject(args: argparse.Namespace) -> None:
    from mplus.memory.mplus import MIN_CHUNK
    key = _read_key(args)
    model, tokenizer = _load_memory_model(args)
    state_path = Path(args.state)
    state = _load_state(model, state_path, key, args.seed)
    documents = [(text_file, tokenizer.encode(read_text(text_file))) for text_file in args.texts]
    for text_file, ids in documents:  # all checked before anything is written
        if len(ids) < MIN_CHUNK and not args.allow_short:
            raise CliError(f"{text_file} has {len(ids)} tokens; M+ was trained on chunks of at least {MIN_CHUNK}: "
                           "write more text, or pass --allow-short to inject it anyway")
    for text_file, ids in documents:
        n = model.inject_document(state, ids, chunk_size=args.chunk_size, allow_short=args.allow_short)
        print(f"{text_file}: {len(ids)} tokens in {n} chunks", file=sys.stderr)
    state.save(state_path, key=key)
    print(f"saved the memory to {state_path}" + (" (signed)" if key else ""), file=sys.stderr)


def cmd_ask(args: argparse.Namespace) -> None:
    from mplus.llama.tokenizer import StreamDecoder
    key = _read_key(args)
    model, tokenizer = _load_memory_model(args)
    state = _load_state(model, Path(args.state), key)
    if args.no_ltm:
        state = state.without_ltm()
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.question}])
    elif args.raw:
        text = args.question
    else:
        text = model.memory_config.question_prompt(args.question)
        if text != args.question:
            print(f"(asked as {text!r}, the checkpoint's question template; --raw sends the question as is)",
                  file=sys.stderr)
    stream = StreamDecoder(tokenizer, skip_special_tokens=True)
    stops = tokenizer.eos_ids or set(model.config.eos_token_id)
    for token in model.generate_tokens(state, tokenizer.encode(text), max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_p=args.top_p, stop_ids=stops,
                                       generator=torch.Generator().manual_seed(args.seed), strip_bos=True,
                                       keep_prefix=False):  # one question per process: hold the prefix once
        print(stream.push(token), end="", flush=True)
    print(stream.flush(), flush=True)


def cmd_inspect(args: argparse.Namespace) -> None:
    from mplus.memory.state import MemoryState
    if args.question and not args.model:
        raise CliError("--question needs --model (the retriever belongs to the model)")
    model = tokenizer = None
    if args.model:
        model, tokenizer = _load_memory_model(args)
    state = MemoryState.load(args.state, expect=model.state_spec() if model else None, key=_read_key(args),
                             placement=model.placement if model else None)
    print(state.describe())
    if args.question:
        record = []
        asked = model.memory_config.question_prompt(args.question)  # as `mplus ask` asks it
        model(state, tokenizer.encode(asked), strip_bos=True, record=record)
        print(f"\nretrieval for {args.question!r} (rows in feeding order, oldest first):")
        for l, r in enumerate(record):
            got = r["retrieved"]
            picks = [f"{'C' if c else 'L'}{i}@{a}" for c, i, a in
                     zip(got.from_cache.tolist(), got.index.tolist(), got.ages.tolist())]
            print(f"  layer {l:3}: " + (" ".join(picks[:args.show]) + (" ..." if len(picks) > args.show else "")
                                       if picks else "(no long-term memory)"))
        print("  (L = LTM row, C = cached dropped row; @ = age in memory tokens)")
