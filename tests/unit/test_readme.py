"""The README stays true: its spec reference lists every field the spec has, as `batchinfer spec`
prints it, and the two commands it promises exist in the Makefile."""

from __future__ import annotations

from pathlib import Path

from batch.spec import describe_fields

ROOT = Path(__file__).resolve().parents[2]


def test_readme_spec_table_matches_the_spec() -> None:
    readme = (ROOT / "README.md").read_text()
    for path, default, desc in describe_fields():
        assert f"| `{path}` | {default} | {desc} |" in readme, f"README spec table: {path}"


def test_the_two_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
