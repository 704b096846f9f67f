"""The commands that prepare organisations' data: ``tokenizer train`` and ``data split``."""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from .common import USAGE, CliError, say


def register(sub: argparse._SubParsersAction) -> None:
    tokenizer = sub.add_parser("tokenizer", help="train a BPE tokenizer locally")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_sub.add_parser("train", help="learn a byte-level BPE from text or .jsonl files (globs allowed)")
    train.add_argument("files", nargs="+", help="text or .jsonl files (globs allowed)")
    train.add_argument("--vocab-size", type=int, required=True, help="at most this many tokens (>= 256)")
    train.add_argument(
        "--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge it (default 2)"
    )
    train.add_argument("--out", required=True, help="the tokenizer JSON file to write")
    train.set_defaults(func=train_tokenizer)

    data = sub.add_parser("data", help="prepare organisations' data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    split = data_sub.add_parser(
        "split", help="cut corpora into per-organisation train and held-out files (IID or non-IID)"
    )
    split.add_argument("--orgs", type=int, required=True, help="number of organisations (named data-00, data-01, ...)")
    split.add_argument(
        "--by",
        choices=["iid", "domain", "dirichlet"],
        default="iid",
        help="iid: shuffled equal shares; domain: whole domains per organisation; dirichlet: Dirichlet(alpha) mixtures",
    )
    split.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller: more skewed; default 0.5)"
    )
    split.add_argument("--seed", type=int, default=0, help="default 0")
    split.add_argument(
        "--heldout", type=float, default=0.1, help="fraction of each organisation's chunks held out (default 0.1)"
    )
    split.add_argument(
        "--corpora", nargs="+", metavar="FILE", help="text files, one domain each (default: the shipped data/*.txt)"
    )
    split.add_argument("--tokenizer", metavar="FILE", help="count tokens with this tokenizer (default: UTF-8 bytes)")
    split.add_argument("--out", required=True, help="directory for <org>/train.jsonl, <org>/eval.jsonl and split.json")
    split.set_defaults(func=split_data)


def train_tokenizer(args: argparse.Namespace) -> None:
    from ..data import DataError, read_documents, train_bpe

    paths = [Path(m) for pattern in args.files for m in (sorted(glob.glob(pattern)) or [pattern])]
    try:
        tokenizer = train_bpe(read_documents(paths, role="tokenizer training"), args.vocab_size, args.min_frequency)
    except (DataError, ValueError) as e:
        raise CliError(f"cannot train: {e}", USAGE) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    say(
        f"wrote {out}: byte-level BPE of {tokenizer.vocab_size:,} tokens from {len(paths)} file(s); name it in a "
        "federation file as `tokenizer: <path relative to it>` (the model's vocab_size must be >= "
        f"{tokenizer.vocab_size})"
    )


def split_data(args: argparse.Namespace) -> None:
    from ..data import TokenizerError, load_tokenizer
    from ..data.corpus_split import SplitError, split_corpora
    from ..plan.templates import data_owner_names
    from .plans import print_split

    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        split = split_corpora(
            data_owner_names(args.orgs),
            args.by,
            alpha=args.alpha,
            seed=args.seed,
            heldout=args.heldout,
            corpora=[Path(p) for p in args.corpora] if args.corpora else None,
        )
    except (SplitError, TokenizerError) as e:
        raise CliError(f"cannot split: {e}", USAGE) from None
    out = split.write(args.out)
    print_split(split, tokenizer)
    say(
        f"wrote {out}/<org>/train.jsonl and eval.jsonl for {len(split.train)} organisations, and {out}/split.json; "
        f"point each organisation's data: {{train: ..., eval: ...}} at its own"
    )
