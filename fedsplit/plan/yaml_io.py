"""Read a YAML file into a pydantic schema, reporting errors with their file and line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import Problem

Schema = TypeVar("Schema", bound=BaseModel)


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """1-based line of every mapping key and sequence item, by its path of keys and indices."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[path + (key.value,)] = key.start_mark.line + 1
            _line_map(value, path + (key.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), out)
    return out


@dataclass(frozen=True)
class Lines:
    """The lines of a file's fields, seen from inside one of them (``prefix``): an organisation
    written inline in a federation file has its fields under ``("orgs", i)``."""

    lines: dict[tuple, int]
    prefix: tuple = ()

    def of(self, *path) -> int | None:
        return line_of(self.lines, self.prefix + path)

    def within(self, *path) -> Lines:
        return Lines(self.lines, self.prefix + path)


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """Line of the longest prefix of ``path`` that the file has (the whole path if present)."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def load_yaml(path: Path, schema: type[Schema]) -> tuple[Schema | None, dict[tuple, int], list[Problem]]:
    """Parse ``path`` into ``schema``. Returns (value or None, line map, problems)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return None, {}, [Problem(f"cannot read file: {e.strerror or e}", file=path)]
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return (
            None,
            {},
            [
                Problem(
                    f"not valid YAML: {getattr(e, 'problem', None) or e}",
                    file=path,
                    line=mark.line + 1 if mark else None,
                )
            ],
        )
    lines = _line_map(node) if node is not None else {}
    if not isinstance(data, dict):
        return (
            None,
            lines,
            [Problem(f"expected a mapping of fields at the top level, got {type(data).__name__}", file=path)],
        )
    try:
        return schema.model_validate(data), lines, []
    except ValidationError as e:
        return None, lines, [_problem(err, path, lines, data) for err in e.errors()]


def _problem(err: dict, path: Path, lines: dict[tuple, int], data: dict) -> Problem:
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or None
    org = data.get("org") if isinstance(data.get("org"), str) else None
    if err["type"] == "extra_forbidden":
        message = "unknown field (check its spelling; see the plan reference in the README)"
    elif err["type"] == "missing":
        message = "required field is missing"
    else:
        message = (
            f"{err['msg']} (got {err.get('input')!r})"
            if "input" in err and not isinstance(err.get("input"), dict)
            else err["msg"]
        )
    return Problem(message, file=path, line=line_of(lines, loc), org=org, field=field)
