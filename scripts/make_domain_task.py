"""Write ``data/domains.jsonl``: a labelled classification task cut from the shipped corpora.

Each line is ``{"text": ..., "label": ...}``: a snippet of 16 to 96 characters from one of the
three shipped text domains (``verse``: tinyshakespeare, ``code``: the Python standard library,
``arithmetic``), starting at a line start, labelled with its domain. Snippets of every domain are
interleaved in a seeded shuffle, so any tail of the file (what a data owner without
``data.eval`` holds out) has all three. The file is committed; this script only says how it
was made (same output on every run and platform).

    .venv/bin/python scripts/make_domain_task.py
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {"verse": "tinyshakespeare.txt", "code": "python-stdlib.txt", "arithmetic": "arithmetic.txt"}


def snippets(text: str, rng: random.Random, count: int) -> list[str]:
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
    out: list[str] = []
    while len(out) < count:
        start = rng.choice(starts)
        snippet = text[start : start + rng.randint(16, 96)].strip()
        if len(snippet) >= 8:
            out.append(snippet)
    return out


def examples(seed: int, per_domain: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [
        {"text": s, "label": label}
        for label, name in DOMAINS.items()
        for s in snippets((REPO / "data" / name).read_text(encoding="utf-8"), rng, per_domain)
    ]
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-domain", type=int, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "data" / "domains.jsonl")
    args = parser.parse_args()
    rows = examples(args.seed, args.per_domain)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {args.out}")


if __name__ == "__main__":
    main()
