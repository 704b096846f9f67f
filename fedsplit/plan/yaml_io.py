"""Read a YAML file into a pydantic schema, reporting errors with their file and line.

Plan files come from other organisations, so reading one is bounded before any of it is
trusted: only a regular file of at most :data:`MAX_FILE_BYTES` of UTF-8, nested at most
:data:`MAX_DEPTH` deep, whose aliases expand to at most :data:`MAX_NODES` nodes (a "billion
laughs" file is a few hundred bytes), with no alias inside itself and no key twice in a mapping
(YAML would keep the last one silently). Each refusal is a :class:`Problem` with the file and line.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import Problem

Schema = TypeVar("Schema", bound=BaseModel)

MAX_FILE_BYTES = 1 << 20  # a resolved plan with a thousand organisations inline is ~300 KB
MAX_DEPTH = 32  # plans nest 4 deep; aliases count where they are used
MAX_NODES = 100_000  # values, aliases expanded

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML was built with it
_OPENS = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSES = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


class _Refused(Exception):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line


def not_a_regular_file(path: Path) -> str | None:
    """Why a plan cannot read ``path`` as a file (it is missing, a directory, a device, a pipe
    or a socket: reading ``/dev/zero`` never ends), or None if it can."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        return f"cannot read file: {e.strerror or e}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, pipe or socket)"
    return None


def _read_text(path: Path) -> str:
    why = not_a_regular_file(path)
    if why:
        raise _Refused(why)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise _Refused(f"cannot read file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _Refused(f"is larger than {MAX_FILE_BYTES >> 20} MiB: not a plan file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Refused(f"is not UTF-8 text (byte 0x{data[e.start]:02x})", data.count(b"\n", 0, e.start) + 1) from None


def _line(mark) -> int | None:
    return mark.line + 1 if mark is not None else None


def _check_depth(text: str) -> None:
    """Refuse deep nesting from the parser's events, before the composer (which recurses) sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _OPENS):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} deep", _line(event.start_mark))
        elif isinstance(event, _CLOSES):
            depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Refuse an alias inside the node it names, and aliases that expand past the limits. Each
    node is measured once (an alias reuses its anchor's measure), so this is linear in the file."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth), expanded
    open_nodes: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in measured:
            return measured[id(node)]
        if id(node) in open_nodes:
            raise _Refused("an alias refers to a node that contains it (a recursive alias)", _line(node.start_mark))
        open_nodes.add(id(node))
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        nodes, depth = 1, 0
        if isinstance(node, yaml.CollectionNode):
            for child in children:
                n, d = measure(child)
                nodes, depth = nodes + n, max(depth, d + 1)
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise _Refused(
                f"its aliases expand to more than {MAX_NODES} values or {MAX_DEPTH} levels",
                _line(node.start_mark),
            )
        open_nodes.discard(id(node))
        measured[id(node)] = nodes, depth
        return nodes, depth

    measure(root)


def _line_map(root: yaml.Node) -> dict[tuple, int]:
    """1-based line of every mapping key and sequence item, by its path of keys and indices.
    Raises _Refused for a key written twice in one mapping (YAML's merge key ``<<`` aside)."""
    out: dict[tuple, int] = {}
    todo: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise _Refused(
                            f"key '{key.value}' is written twice in one mapping (also at line {seen[key.value]}); "
                            "YAML would keep only the last",
                            line,
                        )
                    seen[key.value] = line
                out[path + (key.value,)] = line
                todo.append((value, path + (key.value,)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[path + (i,)] = item.start_mark.line + 1
                todo.append((item, path + (i,)))
    return out


def _parse(text: str) -> tuple[object, dict[tuple, int]]:
    """The file's value and line map, once it passed every bound."""
    _check_depth(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_expansion(node)
        lines = _line_map(node)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


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
        data, lines = _parse(_read_text(path))
    except _Refused as e:
        return None, {}, [Problem(e.message, file=path, line=e.line)]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        return None, {}, [Problem(f"not valid YAML: {getattr(e, 'problem', None) or e}", file=path, line=_line(mark))]
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
        message = "unknown field (check its spelling; see the plan reference in docs/plans.md)"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif err["type"] == "value_error":  # the schema's own check, which says what it got
        message = str(err["ctx"]["error"])
    else:
        message = (
            f"{err['msg']} (got {_shown(err['input'])})"
            if "input" in err and not isinstance(err.get("input"), dict)
            else err["msg"]
        )
    return Problem(message, file=path, line=line_of(lines, loc), org=org, field=field)


def _shown(value: object, limit: int = 80) -> str:
    """A value as the error echoes it, cut short (a field may hold a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
