"""Problems found in a plan, each pinned to a file, a line, an organisation and a selector."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    message: str
    file: Path | None = None
    line: int | None = None
    org: str | None = None
    selector: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        who = []
        if self.org:
            who.append(f"org '{self.org}'")
        if self.field:
            who.append(f"field '{self.field}'")
        if self.selector:
            who.append(f"selector '{self.selector}'")
        return where + (", ".join(who) + ": " if who else "") + self.message


class PlanError(ValueError):
    """An invalid plan: every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("invalid plan:\n" + "\n".join(f"  - {p}" for p in problems))
