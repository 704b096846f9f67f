"""One-organisation plans written into a test's directory, for the data tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from .conftest import MODELS

TINY = MODELS / "tiny.yaml"


def write_plan(
    root: Path,
    data: dict,
    *,
    org: str = "owner",
    training: dict | None = None,
    tokenizer: str | None = None,
    model: Path = TINY,
) -> Path:
    """``root/federation.yaml`` and ``root/orgs/<org>.yaml``: ``org`` holds the whole model and
    ``data`` (paths relative to ``root/orgs``); returns the federation file."""
    (root / "orgs").mkdir(parents=True, exist_ok=True)
    (root / "orgs" / f"{org}.yaml").write_text(
        yaml.safe_dump({"org": org, "data": data, "holds": ["embed", "layers.0-3", "final_norm", "lm_head"]})
    )
    federation = {
        "name": "data-test",
        "model": str(model),
        "orgs": ["orgs/*.yaml"],
        "training": {"batch_size": 2, "seq_len": 16, "seed": 0, **(training or {})},
    }
    if tokenizer is not None:
        federation["tokenizer"] = tokenizer
    (root / "federation.yaml").write_text(yaml.safe_dump(federation))
    return root / "federation.yaml"


def write_model(root: Path, **overrides) -> Path:
    """A copy of tiny.yaml with ``overrides``, as ``root/model.yaml``."""
    path = root / "model.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(TINY.read_text()), **overrides}))
    return path
