"""Count the fuzz outcomes per loader instead of stopping at the first failure (the tests stop there).

    PYTHONPATH=src python tests/fuzz_survey.py [cases per target, default 150]

Prints per target: cases, loads, project errors, and each other outcome with its count and one example.
"""
from __future__ import annotations

import collections
import sys

from hypothesis import given
from hypothesis import strategies as st

from fuzz_cases import TARGETS, seeds
from fuzz_cli import cli_cases
from test_fuzz import _settings, classify, classify_cli


def survey(n: int) -> None:
    for target in [*TARGETS, None]:
        counts, examples = collections.Counter(), {}

        @_settings(n)
        @given(data=st.data())
        def run(data):
            if target is None:
                case = data.draw(cli_cases(seeds()))
                outcome, detail = classify_cli(case)
            else:
                case = data.draw(target.cases(seeds()))
                outcome, error = classify(target, case)
                if outcome == "ok" and case.must_fail:
                    outcome = "loaded an invalid input"
                detail = f"{type(error).__name__}: {error}" if error else ""
            counts[outcome] += 1
            examples.setdefault(outcome, f"{case!r} -> {detail[:240]!r}")

        run()
        name = target.name if target else "cli"
        print(f"\n== {name}: {sum(counts.values())} cases, " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        for outcome, example in examples.items():
            if outcome not in ("ok", "project"):
                print(f"   {outcome}: {example}")
        sys.stdout.flush()


if __name__ == "__main__":
    survey(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
