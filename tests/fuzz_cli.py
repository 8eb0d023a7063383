"""CLI fuzz cases: `mplus.apps.cli.main(argv)` run in process with garbage files and garbage option values.

Every argv holds at least one bad input (a missing, empty, garbage or directory path, or a bad value), so no case
can start real work (no downloads: `fetch` is left out; no long runs: every model path is bad, or the state is).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from hypothesis import strategies as st

from fuzz_cases import TINY_MPLUS, Case, Seeds
from fuzz_mutations import dumps, mutated_bytes, mutated_json

BAD_PATHS = ["missing", "empty", "garbage.bin", "folder/", "notutf8.txt"]
BAD_MODELS = ["missing", "garbage.bin", "folder/", "badconfig", "badtokenizer"]
BAD_INTS = ["-1", "0", "abc", "1e3", "99999999999999999999999", "", " ", "nan", "--"]
BAD_FLOATS = ["nan", "inf", "-inf", "-1", "abc", "1e400", ""]


@st.composite
def cli_cases(draw, s: Seeds) -> Case:
    """Case.files holds the garbage files; Case.note holds the argv, with paths relative to the case folder and
    '@TINY@' for the shipped model."""
    files = {"empty": b"", "garbage.bin": draw(st.binary(min_size=1, max_size=64)), "folder/": b"",
             "notutf8.txt": b"\xff\xfe\x00bad text \xc3",
             "badconfig/config.json": draw(mutated_bytes(s.config)),
             "badtokenizer/config.json": s.config, "badtokenizer/model.safetensors": s.single,
             "badtokenizer/tokenizer.json": dumps(draw(mutated_json(json.loads(s.tokenizer)))).encode(
                 "utf-8", "surrogatepass"),
             "state.safetensors": draw(mutated_bytes(s.state)),
             "model.gguf": draw(mutated_bytes(s.gguf)),
             "unknown.toml": b'stage = "nope"\n', "base.toml": b'stage = "base"\n[train]\nsteps = "x"\n',
             "memory1.toml": b'stage = "memory1"\n'}
    path, model = st.sampled_from(BAD_PATHS), st.sampled_from(BAD_MODELS)
    command = draw(st.sampled_from(["generate", "chat", "inject", "ask", "inspect", "convert-gguf", "train",
                                    "bench", "demo", "unknown"]))
    if command in ("generate", "chat"):
        argv = [command, "--model", draw(model)]
        if command == "generate":
            argv += draw(st.sampled_from([["--prompt", "hi"], ["--prompt-file", draw(path)], []]))
        argv += draw(st.sampled_from([[], ["--max-new-tokens", draw(st.sampled_from(BAD_INTS))],
                                      ["--temperature", draw(st.sampled_from(BAD_FLOATS))],
                                      ["--dtype", "int8"], ["--tokenizer", draw(path)]]))
    elif command in ("inject", "ask"):
        state = draw(st.sampled_from(["state.safetensors", "garbage.bin", "empty", "folder/", "model.gguf"]))
        argv = [command, "--state", state, "--model", draw(st.sampled_from(["@TINY@", *BAD_MODELS]))]
        if command == "inject":
            argv += [draw(path) for _ in range(draw(st.integers(1, 2)))]
            argv += draw(st.sampled_from([[], ["--chunk-size", draw(st.sampled_from(BAD_INTS))]]))
        else:
            argv.insert(1, draw(st.sampled_from(["", "who?", "\x00"])))
            argv += draw(st.sampled_from([[], ["--top-p", draw(st.sampled_from(BAD_FLOATS))]]))
    elif command == "inspect":
        argv = ["inspect", draw(st.sampled_from(["state.safetensors", "model.gguf", *BAD_PATHS]))]
        argv += draw(st.sampled_from([[], ["--show", draw(st.sampled_from(BAD_INTS))], ["--question", "x"],
                                      ["--model", draw(model)], ["--model", "@TINY@", "--question", "where?"]]))
    elif command == "convert-gguf":
        argv = ["convert-gguf", draw(st.sampled_from(["model.gguf", *BAD_PATHS])),
                draw(st.sampled_from(["out", "garbage.bin", "folder/"]))]
    elif command == "train":
        argv = ["train", "--config", draw(st.sampled_from(["unknown.toml", "base.toml", "memory1.toml", *BAD_PATHS]))]
        argv += draw(st.sampled_from([[], ["--max-steps", draw(st.sampled_from(BAD_INTS))]]))
    elif command == "bench":
        argv = ["bench", *draw(st.sampled_from([["retention", "--model", draw(model)], ["memory", "--hidden", "abc"],
                                                ["llama"], ["nope"], ["retention", "--distances", "1,x"]]))]
    elif command == "demo":
        argv = ["demo", *draw(st.sampled_from([["--model", draw(model)], ["--facts", "abc"], ["--chunks", "x"]]))]
    else:
        argv = draw(st.sampled_from([[], ["nope"], ["--bogus"], ["generate"], ["inject", "--state"]]))
    if draw(st.integers(0, 4)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(["--bogus", "-x", "\udcff", ""])))
    return Case(files, note=json.dumps(argv))


def run_cli(folder: Path, case: Case) -> tuple[int | None, str, BaseException | None]:
    """(exit status, stderr, exception that escaped main) of `mplus ARGV` run in `folder`'s files."""
    from mplus.apps.cli import main
    argv = [a.replace("@TINY@", str(TINY_MPLUS)) for a in json.loads(case.note)]
    argv = [str(folder / a) if a in BAD_PATHS + BAD_MODELS + ["out", "state.safetensors", "model.gguf"]
            or a.endswith(".toml") else a for a in argv]
    err = io.StringIO()
    status, escaped = None, None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # noqa: BLE001 - anything escaping main is what the test looks for
            escaped = e
    return status, err.getvalue(), escaped
