"""Non-IID splits of the shipped corpora across organisations, for simulation.

Each corpus is one *domain* (its file name: ``tinyshakespeare``, ``python-stdlib``, ...), cut at
line boundaries into chunks of about :data:`CHUNK_CHARS` characters. Flower Datasets'
partitioners deal the chunks to the organisations, deterministically by seed:

* ``iid``: the chunks shuffled, then cut into equal shares (``IidPartitioner``);
* ``domain``: each organisation gets whole domains, organisation ``i`` domain ``i mod D``
  (more than one when there are fewer organisations than domains), a domain's chunks split
  evenly among the organisations that get it (``PathologicalPartitioner``);
* ``dirichlet``: per domain, shares drawn from Dirichlet(alpha) over the organisations
  (``DirichletPartitioner``): small alpha, skewed mixtures; large alpha, close to IID.

Every chunk goes to exactly one organisation, and within it to train or held-out (the last
``heldout`` fraction of its chunks, at least one). Files: ``<org>/train.jsonl`` and
``<org>/eval.jsonl`` with ``{"text": ..., "domain": ...}`` per line, and ``split.json``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .tokenizer import ByteTokenizer, Tokenizer

Method = Literal["iid", "domain", "dirichlet"]
METHODS: tuple[str, ...] = ("iid", "domain", "dirichlet")
CHUNK_CHARS = 2048
SHIPPED = Path(__file__).resolve().parents[2] / "data"


class SplitError(ValueError):
    """Arguments no split fits; the message says which and what to change."""


def shipped_corpora() -> list[Path]:
    """The corpora shipped in ``data/``, one per domain, sorted."""
    return sorted(SHIPPED.glob("*.txt"))


@dataclass(frozen=True)
class Chunk:
    domain: str
    text: str


@dataclass
class CorpusSplit:
    """Which chunks each organisation trains and is evaluated on."""

    by: str
    alpha: float
    seed: int
    heldout: float
    corpora: list[Path]
    train: dict[str, list[Chunk]] = field(default_factory=dict)
    eval: dict[str, list[Chunk]] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return sorted(
            {c.domain for chunks in self.train.values() for c in chunks}
            | {c.domain for chunks in self.eval.values() for c in chunks}
        )

    def files(self, prefix: str = "") -> dict[str, str]:
        """The split's files by path relative to its output directory, under ``prefix``."""
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        out = {}
        for org in self.train:
            for role, chunks in (("train", self.train[org]), ("eval", self.eval[org])):
                out[f"{base}{org}/{role}.jsonl"] = "".join(
                    json.dumps({"text": c.text, "domain": c.domain}) + "\n" for c in chunks
                )
        manifest = {
            "by": self.by,
            "alpha": self.alpha if self.by == "dirichlet" else None,
            "seed": self.seed,
            "heldout": self.heldout,
            "corpora": [p.name for p in self.corpora],
            "chunk_chars": CHUNK_CHARS,
            "orgs": {org: {"train": len(self.train[org]), "eval": len(self.eval[org])} for org in self.train},
        }
        out[f"{base}split.json"] = json.dumps(manifest, indent=2) + "\n"
        return out

    def write(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        for relative, text in self.files().items():
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / relative).write_text(text, encoding="utf-8")
        return out_dir

    def token_counts(self, tokenizer: Tokenizer = ByteTokenizer()) -> dict[str, dict[str, dict[str, int]]]:
        """``org -> role (train, eval) -> domain -> tokens``."""
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for org in self.train:
            counts[org] = {}
            for role, chunks in (("train", self.train[org]), ("eval", self.eval[org])):
                per = dict.fromkeys(self.domains, 0)
                for c in chunks:
                    per[c.domain] += len(tokenizer.encode(c.text))
                counts[org][role] = per
        return counts


def chunk_corpora(corpora: Sequence[Path], chunk_chars: int = CHUNK_CHARS) -> list[Chunk]:
    """Each corpus cut at line ends into chunks of at least ``chunk_chars`` characters (the last
    of a corpus may be shorter), labelled with the corpus's domain (its file name, less suffix)."""
    chunks = []
    for path in map(Path, corpora):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SplitError(f"cannot read corpus {path}: {e}; give UTF-8 text files with --corpora") from None
        current: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if size >= chunk_chars:
                chunks.append(Chunk(path.stem, "".join(current)))
                current, size = [], 0
        if current and "".join(current).strip():
            chunks.append(Chunk(path.stem, "".join(current)))
    return chunks


def split_corpora(
    orgs: Sequence[str],
    by: Method = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    heldout: float = 0.1,
    corpora: Sequence[Path] | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> CorpusSplit:
    """Deal the chunks of ``corpora`` (default: the shipped ones) to ``orgs``; see the module doc."""
    corpora = [Path(p) for p in (corpora if corpora is not None else shipped_corpora())]
    if by not in METHODS:
        raise SplitError(f"unknown split {by!r}: use one of {', '.join(METHODS)}")
    if not orgs:
        raise SplitError("no organisations to split the corpora between")
    if not 0 < heldout < 1:
        raise SplitError(f"--heldout must be a fraction between 0 and 1, got {heldout}")
    if by == "dirichlet" and alpha <= 0:
        raise SplitError(f"--alpha must be positive, got {alpha}")
    if not corpora:
        raise SplitError("no corpora to split: give text files with --corpora")
    chunks = chunk_corpora(corpora, chunk_chars)
    if len(chunks) < 2 * len(orgs):
        raise SplitError(
            f"{len(chunks)} chunks of text for {len(orgs)} organisations: each needs at least two (train and "
            f"held-out); give more text or fewer organisations"
        )
    shares = _partition([c.domain for c in chunks], len(orgs), by, alpha, seed)
    split = CorpusSplit(by, alpha, seed, heldout, corpora)
    for org, indices in zip(orgs, shares):
        if len(indices) < 2:
            raise SplitError(
                f"organisation '{org}' got {len(indices)} chunk(s) of text, too few for train and held-out; "
                f"use a larger --alpha, fewer organisations or more text"
            )
        n_eval = max(1, round(heldout * len(indices)))
        split.train[org] = [chunks[i] for i in indices[:-n_eval]]
        split.eval[org] = [chunks[i] for i in indices[-n_eval:]]
    return split


def _partition(domains: list[str], n: int, by: str, alpha: float, seed: int) -> list[list[int]]:
    """Chunk indices per organisation, from Flower Datasets' partitioners on an in-memory dataset."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    dataset = Dataset.from_dict({"domain": domains, "index": list(range(len(domains)))})
    if by == "iid":
        partitioner = IidPartitioner(num_partitions=n)
        dataset = dataset.shuffle(seed=seed)  # IidPartitioner cuts contiguous shards
    elif by == "domain":
        per_org = math.ceil(len(set(domains)) / n)
        partitioner = PathologicalPartitioner(
            num_partitions=n,
            partition_by="domain",
            num_classes_per_partition=per_org,
            class_assignment_mode="deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="domain",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dirichlet's resampling notices: a failure raises anyway
            return [list(partitioner.load_partition(i)["index"]) for i in range(n)]
    except ValueError as e:
        raise SplitError(f"cannot split {len(domains)} chunks {by} across {n} organisations: {e}") from None
