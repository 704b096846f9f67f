"""Snapshot Python source code from the standard library into ``data/python-stdlib.txt``.

A second text domain beside ``data/tinyshakespeare.txt`` so that organisations' data can differ
(code vs prose). The snapshot is committed: nothing is generated or downloaded at run time.
Deterministic for a given CPython version: a fixed, sorted list of modules, each file whole,
in that order, until the next file would pass the size cap. The PSF licence that covers the
files is copied beside the snapshot.

    .venv/bin/python scripts/snapshot_python_corpus.py   # writes data/python-stdlib.txt
"""

from __future__ import annotations

import argparse
import platform
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODULES = sorted(
    [
        "abc.py",
        "argparse.py",
        "ast.py",
        "base64.py",
        "bisect.py",
        "calendar.py",
        "colorsys.py",
        "configparser.py",
        "contextlib.py",
        "copy.py",
        "csv.py",
        "dataclasses.py",
        "datetime.py",
        "difflib.py",
        "enum.py",
        "fnmatch.py",
        "fractions.py",
        "functools.py",
        "glob.py",
        "heapq.py",
        "ipaddress.py",
        "json/decoder.py",
        "json/encoder.py",
        "keyword.py",
        "linecache.py",
        "numbers.py",
        "operator.py",
        "pathlib.py",
        "pprint.py",
        "queue.py",
        "random.py",
        "shlex.py",
        "shutil.py",
        "statistics.py",
        "string.py",
        "textwrap.py",
        "threading.py",
        "tokenize.py",
        "uuid.py",
        "warnings.py",
        "weakref.py",
    ]
)


def snapshot(stdlib: Path, cap_bytes: int) -> tuple[str, list[str]]:
    """The corpus text and the modules it holds: each file headed by a comment naming it."""
    parts: list[str] = []
    taken: list[str] = []
    size = 0
    for name in MODULES:
        text = f"# ---- Lib/{name} ----\n" + (stdlib / name).read_text(encoding="utf-8")
        if size + len(text.encode("utf-8")) > cap_bytes:
            break
        parts.append(text)
        taken.append(name)
        size += len(text.encode("utf-8"))
    return "".join(parts), taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "python-stdlib.txt")
    parser.add_argument("--cap-bytes", type=int, default=1_000_000)
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text, taken = snapshot(stdlib, args.cap_bytes)
    args.out.write_text(text, encoding="utf-8")
    licence = stdlib / "LICENSE.txt"
    if licence.exists():
        args.out.with_suffix(".LICENSE").write_text(licence.read_text(encoding="utf-8"), encoding="utf-8")
    print(
        f"wrote {args.out}: {len(text.encode('utf-8')):,} bytes, {len(taken)} modules of CPython "
        f"{platform.python_version()} ({taken[0]} .. {taken[-1]})"
    )


if __name__ == "__main__":
    main()
