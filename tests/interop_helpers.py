"""Helpers of the checkpoint interop tests: a plan over a model directory, and fedsplit's logits."""

import json
from pathlib import Path

import torch

from fedsplit.interop import save_hf
from fedsplit.model import ModelConfig, MoETransformer

from .conftest import ROOT

SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


def fedsplit_logits(cfg: ModelConfig, weights: dict, tokens: torch.Tensor) -> torch.Tensor:
    model = MoETransformer(cfg)
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        return model.eval()(tokens)[0]


def write_plan(root: Path, model: str, orgs: dict[str, list[str]], lr: float = 1e-2) -> Path:
    """A plan whose first organisation owns the data; ``model`` is relative to ``root``."""
    (root / "orgs").mkdir(parents=True, exist_ok=True)
    fed = {
        "name": "hf",
        "model": model,
        "orgs": ["orgs/*.yaml"],
        "training": {
            "steps_per_round": 3,
            "batch_size": 2,
            "seq_len": 12,
            "micro_batches": 2,
            "optimizer": {"name": "adamw", "lr": lr},
        },
    }
    (root / "federation.yaml").write_text(json.dumps(fed))
    for i, (org, holds) in enumerate(orgs.items()):
        spec = {"org": org, "holds": holds, **({"data": {"train": str(SHAKESPEARE)}} if i == 0 else {})}
        (root / "orgs" / f"{org}.yaml").write_text(json.dumps(spec))
    return root / "federation.yaml"


def write_random_base(directory: Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """A Hugging Face checkpoint of ``cfg`` whose every weight (norms and gates included) is random,
    so that a mapping mistake cannot hide behind a zero or a one."""
    torch.manual_seed(seed)
    weights = {
        name: 1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p)
        for name, p in MoETransformer(cfg).state_dict().items()
    }
    return save_hf(cfg, weights, directory)
