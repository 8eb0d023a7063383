"""Validated argparse types for every command: a bad value is refused while parsing, with one line naming it.

Each type takes the argument's string and returns the value, or raises argparse.ArgumentTypeError (argparse then
prints `mplus CMD: error: argument --x: <message>` and exits 2). Paths are checked for what they must be (a
regular file to read, a folder holding a model, an output whose nearest existing ancestor is a folder);
opening them can still fail later (permissions, a race), which the command's own error handler reports.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _bounded(parse: Callable[[str], float], ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: parse the text, then refuse a value outside the rule ("must be <rule>, got <value>")."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    return check


positive_int = _bounded(_int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _bounded(_int, lambda v: v >= 0, "a whole number >= 0")


def int_list(text: str) -> list[int]:
    """Comma-separated whole numbers >= 0, e.g. 0,4,16."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, "
                                         "e.g. 0,4,16") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"every entry must be >= 0, got {min(values)}")
    return values


def seed_type(maximum: int = MAX_SEED) -> Callable[[str], int]:
    """A seed in [0, maximum]; commands that derive further seeds from it pass a smaller maximum."""
    def seed(text: str) -> int:
        value = _int(text)
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"a seed must be in 0..{maximum}, got {value}")
        return value
    return seed


seed = seed_type()


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


positive_float = _bounded(_float, lambda v: v > 0, "positive")
temperature = _bounded(_float, lambda v: v >= 0, ">= 0 (0 = greedy)")
probability_mass = _bounded(_float, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")


def is_text(value: str) -> bool:
    """Whether a str is Unicode text. Python decodes non-UTF-8 bytes in argv (and in stdin under a C locale) to
    lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(value: str) -> str:
    if not is_text(value):
        raise argparse.ArgumentTypeError("is not valid UTF-8 text (fix the terminal's encoding, or put the text "
                                         "in a UTF-8 file)")
    return value


def question(value: str) -> str:
    """Non-empty text: a blank question would still be sent (wrapped in the question template) and answered."""
    if not text(value).strip():
        raise argparse.ArgumentTypeError("is empty; write the question to ask")
    return value


def input_file(value: str) -> Path:
    """An existing regular file to read."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is {'a folder' if path.is_dir() else 'not a regular file'}, "
                                         "expected a file")
    return path


def input_path(value: str) -> Path:
    """An existing file or folder (e.g. a tokenizer.json or the folder holding one)."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return path


def device(value: str) -> torch.device:
    """A torch device this machine has: cpu, cuda, cuda:1, ..."""
    from mplus.memory.placement import as_device
    try:
        return as_device(value)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None


def model_folder(value: str) -> Path:
    """An HF-layout model folder: a folder holding config.json."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is {'a file' if path.exists() else 'missing'}, expected a model "
                                         "folder (config.json, model.safetensors, tokenizer.json)")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} has no config.json: not a model folder")
    return path


def model_folder_with_tokenizer(value: str) -> Path:
    """A model folder that also holds its tokenizer.json."""
    path = model_folder(value)
    if not (path / "tokenizer.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} has no tokenizer.json: copy the model's tokenizer into it")
    return path


def _check_ancestors(value: str, path: Path) -> None:
    """The nearest existing ancestor must be a folder (missing ones are created when the output is written)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, not a folder")


def output_file(value: str) -> Path:
    """A file to write (replaced if it exists): not a folder, and under a folder."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, expected a file name")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a regular file")
    _check_ancestors(value, path)
    return path


def output_folder(value: str) -> Path:
    """A folder to write into (created if missing): not an existing file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, expected a folder (it is created if missing)")
    _check_ancestors(value, path)
    return path


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8") from None

