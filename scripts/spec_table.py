"""Regenerate the job spec reference table in README.md from the spec's own descriptions."""

from __future__ import annotations

import re
from pathlib import Path

from batch.spec import describe_fields

README = Path(__file__).resolve().parents[1] / "README.md"


def table() -> str:
    rows = ["| field | default | meaning |", "|---|---|---|"]
    rows += [f"| `{path}` | {default} | {desc} |" for path, default, desc in describe_fields()]
    return "\n".join(rows)


def main() -> None:
    text = README.read_text()
    pattern = re.compile(r"(<!-- spec-table:[^\n]*-->\n).*?(\n<!-- /spec-table -->)", re.S)
    README.write_text(pattern.sub(lambda m: m.group(1) + table() + m.group(2), text))


if __name__ == "__main__":
    main()
