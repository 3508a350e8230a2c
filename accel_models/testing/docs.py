"""Generate the hookspec reference of docs/writing-a-backend.md from the docstrings of hookspecs.py."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from accel_models import hookspecs
from accel_models.backends import COMPOSITE_OPS, KV_CACHE_GROUP, LINEAR_GROUP, PORTABLE_OPS
from accel_models.testing.tolerances import tolerance_table_markdown

BEGIN = "<!-- BEGIN GENERATED: python -m accel_models.testing.docs -->"
END = "<!-- END GENERATED -->"


def hookspec_reference() -> str:
    parts = []
    for name, fn in vars(hookspecs).items():
        if not (name.startswith("accel_") and callable(fn)):
            continue
        sig = str(inspect.signature(fn)).replace("'", "")
        op = name[len("accel_"):]
        group = (" (KV-cache group)" if op in KV_CACHE_GROUP else " (linear group)" if op in LINEAR_GROUP
                 else " (fused op: optional, composite without it)" if op in COMPOSITE_OPS
                 else " (portable: optional, the reference's torch runs on every device)" if op in PORTABLE_OPS
                 else "")
        parts.append(f"### `{name}`{group}\n\n```python\n{name}{sig}\n```\n\n{inspect.getdoc(fn)}\n")
    return "\n".join(parts)


def render() -> str:
    return (f"{BEGIN}\n\n## Tolerances\n\n{tolerance_table_markdown()}\n\n## Hookspec reference\n\n"
            f"{hookspec_reference()}\n{END}")


def update(path: Path) -> bool:
    """Rewrite the generated part of ``path``; returns True if it changed."""
    text = path.read_text()
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: render(), text, flags=re.S)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/writing-a-backend.md")
    print(("updated " if update(target) else "up to date: ") + str(target))
