"""Fill in the file:line column of docs/paper-to-code.md from the dotted names (run: python docs/paper_to_code.py)."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A table row's last two cells: `mplus.dotted.name` | `src/...py:123`
ROW = re.compile(r"`(?P<name>mplus(?:\.\w+)+)` \| `(?P<where>[^`]*)` \|$", re.M)


def resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def locate(name: str) -> tuple[str, int]:
    obj = inspect.unwrap(resolve(name))
    if isinstance(obj, property):
        obj = obj.fget
    path = Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT)
    line = 1 if inspect.ismodule(obj) else inspect.getsourcelines(obj)[1]
    return str(path), line


def main() -> None:
    doc = ROOT / "docs" / "paper-to-code.md"
    text = ROW.sub(lambda m: "`{0}` | `{1}:{2}` |".format(m["name"], *locate(m["name"])), doc.read_text())
    doc.write_text(text)


if __name__ == "__main__":
    main()
