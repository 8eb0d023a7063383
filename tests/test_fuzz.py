"""Fuzzing every loader with damaged files: each case must load (only if still valid) or raise one of the project's
own errors, within a time limit; the CLI must exit non-zero with one `mplus ...: error: ...` line, no traceback.

Seeded (hypothesis, derandomized): `make test` runs 15 cases per loader and 20 CLI cases (110), `make test-slow`
150 per loader and 200 CLI cases (1,100). The generators live in fuzz_mutations.py, fuzz_cases.py and fuzz_cli.py;
`python tests/fuzz_survey.py` counts the outcomes per loader instead of stopping at the first failure.
"""
from __future__ import annotations

import contextlib
import re
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mplus.llama.tokenizer
from fuzz_cases import TARGETS, Case, Target, seeds
from fuzz_cli import cli_cases, run_cli
from mplus.llama.config import ConfigError
from mplus.formats.gguf import GGUFError
from mplus.memory.state_file import StateError
from mplus.formats.hf_folder import WeightsError

# The project's own errors: the four loader errors, plus whatever error class mplus.llama.tokenizer defines.
PROJECT_ERRORS = (ConfigError, WeightsError, GGUFError, StateError) + tuple(
    v for v in vars(mplus.llama.tokenizer).values()
    if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == "mplus.llama.tokenizer")
TIME_LIMIT_S = 5  # per case; the valid seed files load in well under 0.5 s
FAST, SLOW = {"loader": 15, "cli": 20}, {"loader": 150, "cli": 200}
ERROR_LINE = re.compile(r"^mplus( [\w-]+)*: error: \S")


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def alarm(signum, frame):
        raise Timeout(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def classify(target: Target, case: Case) -> tuple[str, BaseException | None]:
    """("ok" | "project" | the name of any other exception, the exception) of loading one case."""
    with tempfile.TemporaryDirectory(prefix="mplus-fuzz-case-") as root:
        folder = case.write(Path(root))
        try:
            with time_limit(TIME_LIMIT_S):
                target.call(folder, seeds())
        except PROJECT_ERRORS as e:
            return "project", e
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - RecursionError, MemoryError, a Rust panic, the Timeout ...
            return type(e).__name__, e
    return "ok", None


def classify_cli(case: Case) -> tuple[str, str]:
    """("ok" | what went wrong, detail) of one CLI case."""
    with tempfile.TemporaryDirectory(prefix="mplus-fuzz-cli-") as root:
        folder = case.write(Path(root))
        try:
            with time_limit(TIME_LIMIT_S):
                status, err, escaped = run_cli(folder, case)
        except Timeout as e:
            return "Timeout", str(e)
    lines = [line for line in err.splitlines() if line.strip()]
    if escaped is not None:
        return f"escaped {type(escaped).__name__}", str(escaped)[:200]
    if status in (0, None):
        return "exit 0", err[-200:]
    if "Traceback" in err:
        return "traceback", err[-300:]
    if not lines or not ERROR_LINE.match(lines[-1]):
        return "no error line", err[-200:]
    return "ok", lines[-1]


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as drawn
                    suppress_health_check=list(HealthCheck))


def _check_loader(target: Target, data) -> None:
    case = data.draw(st.deferred(lambda: target.cases(seeds())), label="case")
    outcome, error = classify(target, case)
    assert outcome == "project" or outcome == "ok" and not case.must_fail, (
        f"{target.name} case {case!r}: {'loaded, but the input is invalid' if outcome == 'ok' else outcome}: "
        f"{str(error)[:300]}")


def _check_cli(data) -> None:
    case = data.draw(st.deferred(lambda: cli_cases(seeds())), label="case")
    outcome, detail = classify_cli(case)
    assert outcome == "ok", f"mplus {case.note}: {outcome}: {detail}"


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@_settings(FAST["loader"])
@given(data=st.data())
def test_loader_fuzz(target, data):
    _check_loader(target, data)


@_settings(FAST["cli"])
@given(data=st.data())
def test_cli_fuzz(data):
    _check_cli(data)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@_settings(SLOW["loader"])
@given(data=st.data())
def test_loader_fuzz_long(target, data):
    _check_loader(target, data)


@pytest.mark.slow
@_settings(SLOW["cli"])
@given(data=st.data())
def test_cli_fuzz_long(data):
    _check_cli(data)


def test_seed_files_load():
    """The undamaged seed files load: the oracle's "ok" is reachable, and a failure above is the damage's."""
    for target in TARGETS:
        if target.name == "index":
            case = Case({"config.json": seeds().config, **seeds().sharded})
        else:
            case = Case({"config.json": seeds().config, "model.safetensors": seeds().single,
                         "llama/config.json": seeds().config, "mplus/config.json": seeds().mplus_config,
                         "model.gguf": seeds().gguf, "state.safetensors": seeds().state,
                         "tokenizer.json": seeds().tokenizer})
        assert classify(target, case)[0] == "ok", target.name


@pytest.mark.slow
def test_state_save_survives_kill_9(tmp_path):
    """20 times: a forked child saves states A and B in turn to one path and is killed with SIGKILL at a random
    moment. The file must always load as A or B (or not exist before the first save completes), and once a save
    has completed after the kills, no temporary file of the killed saves may be left in the folder."""
    import os
    import time

    import torch
    from mplus.memory.state import MemoryState
    s = seeds()
    a = s.model.initial_state(seed=1)
    b = a.copy()
    s.model.inject(b, torch.arange(2, 40))
    path, g = tmp_path / "state.safetensors", torch.Generator().manual_seed(0)
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the child: save for ever, never return into pytest
            try:
                while True:
                    a.save(path)
                    b.save(path)
            finally:
                os._exit(0)
        time.sleep(float(torch.rand((), generator=g)) * 0.3)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if path.exists():
            loaded = MemoryState.load(path)
            assert any(torch.equal(loaded.stm, x.stm) for x in (a, b)), "the file is neither the old nor the new state"
    a.save(path)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != path.name)
    assert not leftovers, f"temporary files of killed saves were never cleaned up: {leftovers}"
