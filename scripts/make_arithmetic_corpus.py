"""Write ``data/arithmetic.txt``: a third text domain, synthetic and so free of any licence.

Worked integer sums, differences, products and divisions, one per line, from a seeded generator:
text with a structure very unlike prose or code, to make non-IID splits visibly non-IID. The file
is committed; this script only says how it was made (same output on every run and platform).

    .venv/bin/python scripts/make_arithmetic_corpus.py
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def line(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(1, 999)
    op = rng.choice("+-*/")
    if op == "+":
        return f"{a} + {b} = {a + b}"
    if op == "-":
        return f"{a} - {b} = {a - b}"
    if op == "*":
        return f"{a} * {b} = {a * b}"
    return f"{a} / {b} = {a // b} remainder {a % b}"


def corpus(seed: int, cap_bytes: int) -> str:
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < cap_bytes:
        lines.append(line(rng) + "\n")
        size += len(lines[-1])
    return "".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "arithmetic.txt")
    parser.add_argument("--cap-bytes", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    text = corpus(args.seed, args.cap_bytes)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text):,} bytes, {text.count(chr(10)):,} lines")


if __name__ == "__main__":
    main()
