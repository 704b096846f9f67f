"""Reading an organisation's data files: plain UTF-8 text, or JSON lines with a ``text`` field
(``.jsonl``: one document per line). Globs are resolved by the plan loader; this module gets
paths and turns anything unusable into a :class:`DataError` that names the organisation, the
file (and the line) and what to do."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path


class DataError(ValueError):
    """An organisation's data cannot be used; the message names the organisation and the path."""


def _owner(org: str | None) -> str:
    return f"organisation '{org}': " if org else ""


def read_documents(paths: Sequence[Path], *, org: str | None = None, role: str = "train") -> list[str]:
    """The documents of ``paths`` in order: a plain file is one document, a ``.jsonl`` file one
    per non-blank line. ``role`` (train, eval) only words the errors."""
    documents: list[str] = []
    for path in map(Path, paths):
        text = read_text(path, org, role)
        found = _jsonl_documents(text, path, org, role) if path.suffix == ".jsonl" else [text] if text.strip() else []
        if not found:
            raise DataError(f"{_owner(org)}{role} data {path} holds no text; fill it or remove it from data.{role}")
        documents += found
    return documents


def read_text(path: Path, org: str | None = None, role: str = "train") -> str:
    """A data file's text, or a :class:`DataError` saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{_owner(org)}{role} data {path} is not UTF-8 text ({e}); convert it to UTF-8") from None
    except OSError as e:
        raise DataError(
            f"{_owner(org)}cannot read {role} data {path}: {e.strerror or e}; "
            f"check that the path exists and is a readable file"
        ) from None


def json_lines(text: str, path: Path, org: str | None, role: str, example: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a ``.jsonl`` file's ``text``: an object with
    a string ``text``, else a :class:`DataError` naming the file and line; ``example``: a line that
    would do, for the message."""
    shape = f"each line of a .jsonl file must be an object like {example}"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{_owner(org)}{role} data {path}:{number}: not valid JSON ({e.msg}); {shape}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{_owner(org)}{role} data {path}:{number}: no string field 'text'; {shape}")
        yield number, record


def _jsonl_documents(text: str, path: Path, org: str | None, role: str) -> list[str]:
    documents = []
    for _, record in json_lines(text, path, org, role, '{"text": "..."}'):
        if record["text"]:
            documents.append(record["text"] if record["text"].endswith("\n") else record["text"] + "\n")
    return documents
