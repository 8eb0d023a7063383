"""The docs stay true: every name in docs/paper-to-code.md imports and sits at the file:line the table gives, and
nothing a user has points outside the repository."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
from paper_to_code import ROW, locate  # noqa: E402

ROWS = [m for m in ROW.finditer((ROOT / "docs" / "paper-to-code.md").read_text())]


def test_the_map_has_the_paper_steps():
    assert len(ROWS) >= 20


@pytest.mark.parametrize("row", ROWS, ids=lambda m: m["name"])
def test_every_name_imports_at_its_line(row):
    path, line = locate(row["name"])
    assert f"{path}:{line}" == row["where"], f"{row['name']} is at {path}:{line}; run python docs/paper_to_code.py"


def test_nothing_points_outside_the_repository():
    files = [ROOT / "README.md", *(ROOT / d for d in ())]
    for d in ("src", "tests", "docs", "examples", "configs", "bench", "checkpoints"):
        files += [p for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".toml", ".json", ".cfg")
                  and "fixtures" not in p.parts]
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"\.\./shared|\bshared/(spec|fixtures|notes|guides)|\bspec(/| \d| section| §)", line)
           and p.name != "test_docs.py"]
    assert not bad, "references to material users do not have: " + ", ".join(bad)


def test_the_readme_embedding_example_runs(tmp_path, monkeypatch, capsys):
    """The ten lines README.md gives embedders run as printed, and the tiny model answers with the city."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    monkeypatch.chdir(tmp_path)
    exec(code.replace('"checkpoints/tiny-mplus"', repr(str(ROOT / "checkpoints" / "tiny-mplus"))), {})
    assert "Brastow" in capsys.readouterr().out
    assert (tmp_path / "alice.memory").is_file()
