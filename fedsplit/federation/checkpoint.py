"""Round checkpoints: the reassembled model (safetensors), the pieces each organisation keeps
local, and a manifest. A checkpoint directory appears whole or not at all (written aside, then
renamed), so a crash mid-write never leaves a round that looks complete.

A fine-tune over a frozen base checkpoints only what trains (adapters, unfrozen pieces: megabytes
where the base is gigabytes) and names its base in the manifest (``base``:
:func:`~fedsplit.runtime.weights.base_identity`); :func:`model_weights` puts the two together."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from ..model import ModelConfig
from ..plan import Plan
from ..runtime.weights import base_weights
from .exchange import FederationError

MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"
SERVER_STATE_FILE = "server-optimizer.safetensors"


def _digest(plan: Plan, training: dict) -> str:
    spec = {
        "model": plan.model.model_dump(mode="json"),
        "training": training,
        "replica_sync": plan.aggregation.replica_sync,
        "partitions": [
            [p.name, sorted(map(str, p.units)), list(p.holders), sorted(p.local_holders)] for p in plan.partitions
        ],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def plan_hash(plan: Plan) -> str:
    """What the weights depend on: model, partitions and training settings."""
    return _digest(plan, plan.training.model_dump(mode="json"))


def layout_hash(plan: Plan) -> str:
    """What every organisation must agree on to work together: the model, the partitions, the
    shape of the batches and whether replicas are kept in step (not the number of rounds or
    steps, which the coordinator may set)."""
    return _digest(plan, plan.training.model_dump(mode="json", exclude={"rounds", "steps_per_round"}))


@dataclass
class Checkpoint:
    round: int
    path: Path
    weights: dict[str, Tensor]
    local: dict[str, dict[str, Tensor]]  # organisation -> its own version of its local pieces
    manifest: dict
    server_state: dict[str, Tensor]  # the coordinator's optimizer state (FedAdam moments), if any


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_checkpoint(
    directory: Path,
    round: int,
    weights: Mapping[str, Tensor],
    local: Mapping[str, Mapping[str, Tensor]],
    manifest: dict,
    server_state: Mapping[str, Tensor] | None = None,
) -> Path:
    final = Path(directory) / f"round-{round:04d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(weights), tmp / MODEL_FILE, metadata={"format": "pt", "round": str(round)})
    for org, state in local.items():
        if state:
            save_file(_contiguous(state), tmp / f"local-{org}.safetensors")
    if server_state:
        save_file(_contiguous(server_state), tmp / SERVER_STATE_FILE)
    (tmp / MANIFEST).write_text(json.dumps({"round": round, **manifest}, indent=2))
    with open(tmp / MANIFEST) as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The last complete round's checkpoint under ``directory``, if any."""
    done = sorted(p for p in Path(directory).glob("round-[0-9][0-9][0-9][0-9]") if (p / MANIFEST).exists())
    return load_checkpoint(done[-1]) if done else None


def find_checkpoint(source: Path) -> Checkpoint | None:
    """The checkpoint a user names: a ``round-NNNN`` directory itself, else the last complete
    round of a run directory (its ``checkpoints/``) or of a checkpoints directory."""
    source = Path(source)
    if (source / MANIFEST).exists():
        return load_checkpoint(source)
    return latest_checkpoint(source / "checkpoints") or latest_checkpoint(source)


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    local = {f.name[len("local-") : -len(".safetensors")]: load_file(f) for f in path.glob("local-*.safetensors")}
    server = load_file(path / SERVER_STATE_FILE) if (path / SERVER_STATE_FILE).exists() else {}
    return Checkpoint(int(manifest["round"]), path, load_file(path / MODEL_FILE), local, manifest, server)


def check_base(ckpt: Checkpoint, identity: dict) -> None:
    """Refuse to go on from a fine-tune's checkpoint over another base than ``identity``."""
    recorded = ckpt.manifest.get("base") or {}
    if recorded.get("sha256") != identity["sha256"]:
        raise FederationError(
            f"{ckpt.path} was fine-tuned over the base {recorded.get('source', '(none recorded)')} "
            f"(hash {recorded.get('sha256')}), this plan's base is {identity['source']} (hash {identity['sha256']}): "
            "resume with the base it started from, or start a new run"
        )


def model_weights(ckpt: Checkpoint, cfg: ModelConfig) -> dict[str, Tensor]:
    """The full model ``cfg`` at ``ckpt``: its weights, with a fine-tune's frozen base read back
    from where its manifest says (and checked to be that base)."""
    base = ckpt.manifest.get("base")
    if base is None:
        return ckpt.weights
    frozen = {k: v for k, v in base_weights(base, cfg).items() if k not in ckpt.weights}
    return {**frozen, **ckpt.weights}
