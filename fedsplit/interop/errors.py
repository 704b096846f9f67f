"""The one error of checkpoint interop: what cannot be read or written, naming the file and field."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint fedsplit cannot read or write as asked. ``field`` names the config field (or
    tensor) at fault when there is one, ``file`` the file it came from."""

    def __init__(self, message: str, *, file: Path | str | None = None, field: str | None = None):
        self.file = Path(file) if file is not None else None
        self.field = field
        self.reason = message
        where = f"{self.file}: " if self.file is not None else ""
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")
