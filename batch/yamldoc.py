"""YAML read safely, with the line of every key, so errors can point into the file."""

from __future__ import annotations

from typing import Any

import yaml

from batch.errors import BatchInferError

Loc = tuple[str | int, ...]


def load(text: str, source: str, error: type[BatchInferError]) -> tuple[Any, dict[Loc, int]]:
    """(parsed document, {path: 1-based line}); malformed YAML raises ``error`` with the line."""
    try:
        return yaml.safe_load(text), line_numbers(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: not valid YAML: {problem}") from None


def line_numbers(node: yaml.Node | None, prefix: Loc = ()) -> dict[Loc, int]:
    """Map YAML paths (key names and list indexes) to 1-based line numbers."""
    out: dict[Loc, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            out[path] = key_node.start_mark.line + 1
            out.update(line_numbers(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = item.start_mark.line + 1
            out.update(line_numbers(item, path))
    return out
