"""Round checkpoints: the reassembled model (safetensors), the pieces each organisation keeps
local, and a manifest. A checkpoint directory appears whole or not at all (written aside, each
file synced to disk, the manifest last, then renamed), so a crash or a full disk mid-write never
leaves a round that looks complete.

The manifest records the size and SHA-256 of every file (``files``), and a checkpoint is checked
against it before it is used: resuming passes over a truncated or corrupted last round to the
newest one that is whole (:attr:`Checkpoint.skipped` says which and why). A checkpoint written
before ``files`` existed is checked by the sizes its safetensors headers imply.

A fine-tune over a frozen base checkpoints only what trains (adapters, unfrozen pieces: megabytes
where the base is gigabytes) and names its base in the manifest (``base``:
:func:`~fedsplit.runtime.weights.base_identity`); :func:`model_weights` puts the two together."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..interop import CheckpointError
from ..interop.reader import safetensors_header
from ..model import ModelConfig
from ..plan import Plan
from ..runtime.weights import base_weights
from .exchange import FederationError

MODEL_FILE = "model.safetensors"
MANIFEST = "manifest.json"
SERVER_STATE_FILE = "server-optimizer.safetensors"
CHECKPOINTS = "checkpoints"  # a run directory's folder of round-NNNN checkpoints
ROUND_GLOB = "round-[0-9][0-9][0-9][0-9]"
CHUNK = 1 << 20  # files are hashed a MiB at a time: a base model's gigabytes never sit in memory twice
DAMAGED = "(truncated or corrupted)"


def _digest(plan: Plan, training: dict) -> str:
    spec = {
        "model": plan.model.model_dump(mode="json"),
        "training": training,
        "replica_sync": plan.aggregation.replica_sync,
        "partitions": [
            [p.name, sorted(map(str, p.units)), list(p.holders), sorted(p.local_holders)] for p in plan.partitions
        ],
    }
    # Only when set, so that the hashes of runs from before these fields existed stay the same.
    if plan.owner_of:
        spec["owned"] = sorted((str(u), owner) for u, owner in plan.owner_of.items())
    if plan.privacy is not None:
        spec["privacy"] = plan.privacy.model_dump(mode="json")
    if plan.tasks:  # the heads are in the model; which data trains each, and its weight, are not
        spec["tasks"] = {name: task.model_dump(mode="json") for name, task in sorted(plan.tasks.items())}
        spec["task_of"] = {org: o.task for org, o in sorted(plan.orgs.items()) if o.task is not None}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def plan_hash(plan: Plan) -> str:
    """What the weights depend on: model, partitions and training settings."""
    return _digest(plan, plan.training.model_dump(mode="json"))


def layout_hash(plan: Plan) -> str:
    """What every organisation must agree on to work together: the model, the partitions, the
    shape of the batches and whether replicas are kept in step (not the number of rounds or
    steps, which the coordinator may set)."""
    return _digest(plan, plan.training.model_dump(mode="json", exclude={"rounds", "steps_per_round"}))


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A newer round passed over on the way to the newest usable one: its number, and the file at
    fault and why (``error.file``, ``error.reason``)."""

    round: int
    error: CheckpointError


@dataclass
class Checkpoint:
    round: int
    path: Path
    weights: dict[str, Tensor]
    local: dict[str, dict[str, Tensor]]  # organisation -> its own version of its local pieces
    manifest: dict
    server_state: dict[str, Tensor]  # the coordinator's optimizer state (FedAdam moments), if any
    skipped: list[SkippedCheckpoint] = field(default_factory=list)  # newer rounds that were not usable


class CheckpointWriteError(OSError):
    """Writing a round's checkpoint failed (a full disk, say); the rounds before it are untouched.
    ``filename`` is the path that was being written, ``errno`` the system's error number."""

    def __str__(self) -> str:
        return f"cannot write the checkpoint file {self.filename}: {self.strerror}"


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to the disk, so that a rename after it never
    publishes data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` into a :class:`CheckpointWriteError` that names it.
    safetensors reports a full disk as a ``SafetensorError`` ("... (os error 28)"), not an
    ``OSError``: its error number is read off the message."""
    try:
        yield
    except OSError as e:
        raise CheckpointWriteError(e.errno, e.strerror or str(e), str(path)) from e
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise CheckpointWriteError(None, str(e), str(path)) from e
        raise CheckpointWriteError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def _write_tensors(path: Path, state: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write and sync one safetensors file; its manifest entry (size and SHA-256 as on disk)."""
    with _writing(path):
        save_file(_contiguous(state), path, metadata=metadata)
        _sync(path)
        return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_manifest(path: Path, manifest: dict) -> None:
    with _writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())


def _tensor_files(
    round: int,
    weights: Mapping[str, Tensor],
    local: Mapping[str, Mapping[str, Tensor]],
    server_state: Mapping[str, Tensor] | None,
) -> Iterator[tuple[str, Mapping[str, Tensor], dict[str, str] | None]]:
    """(file name, tensors, metadata) of each safetensors file of a round's checkpoint."""
    yield MODEL_FILE, weights, {"format": "pt", "round": str(round)}
    for org, state in local.items():
        if state:
            yield f"local-{org}.safetensors", state, None
    if server_state:
        yield SERVER_STATE_FILE, server_state, None


def write_checkpoint(
    directory: Path,
    round: int,
    weights: Mapping[str, Tensor],
    local: Mapping[str, Mapping[str, Tensor]],
    manifest: dict,
    server_state: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``round``'s checkpoint into ``directory``/round-NNNN and return that path. Raises
    :class:`CheckpointWriteError` naming the file when the disk is full (or any write fails), with
    the half-written round removed and the earlier ones as they were."""
    final = Path(directory) / f"round-{round:04d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _writing(tmp):
            tmp.mkdir(parents=True)
        files = {
            name: _write_tensors(tmp / name, state, meta)
            for name, state, meta in _tensor_files(round, weights, local, server_state)
        }
        _write_manifest(tmp / MANIFEST, {"round": round, **manifest, "files": files})
        with _writing(final):
            _sync(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _sync(final.parent)
    finally:  # a failed write leaves nothing behind; a finished one has no tmp any more
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- reading, checked ---------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError("missing: the checkpoint is incomplete", file=file)
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"not valid JSON {DAMAGED}: {e}", file=file) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("round"), int):
        raise CheckpointError(f"has no round number {DAMAGED}", file=file)
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        raise CheckpointError(f"its list of files is not a mapping of name to size and checksum {DAMAGED}", file=file)
    return manifest


def _check_recorded(file: Path, entry: dict) -> None:
    """``file`` is as the manifest recorded it: there, of its size, with its SHA-256."""
    if not file.is_file():
        raise CheckpointError("missing (the manifest lists it)", file=file)
    size = file.stat().st_size
    if size != entry.get("bytes"):
        raise CheckpointError(f"{size} bytes where the manifest records {entry.get('bytes')} {DAMAGED}", file=file)
    if _sha256(file) != entry.get("sha256"):
        raise CheckpointError(f"checksum mismatch {DAMAGED}", file=file)


def _check_layout(file: Path) -> None:
    """A safetensors file without a recorded checksum (an earlier fedsplit's checkpoint) is as
    long as its header says: an 8-byte header length, the JSON header, then the tensors' bytes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header = safetensors_header(f) or b""
    length = len(header)
    try:
        entries = json.loads(header)
        end = max((e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
        raise CheckpointError(f"no readable safetensors header {DAMAGED}", file=file) from None
    if size != 8 + length + end:
        raise CheckpointError(f"{size} bytes where its header needs {8 + length + end} {DAMAGED}", file=file)


def _file_names(path: Path, manifest: dict) -> list[str]:
    """The safetensors files of a checkpoint: those its manifest lists, or (written before
    manifests listed them) those in its directory."""
    if "files" in manifest:
        return sorted(manifest["files"])
    return sorted(f.name for f in path.glob("*.safetensors"))


def verify_checkpoint(path: Path) -> dict:
    """The manifest of the checkpoint at ``path`` once every file of it is checked: present, of
    the size and checksum the manifest records (or, for a checkpoint without checksums, of the
    size its header implies). Raises :class:`CheckpointError` naming the first file at fault."""
    path = Path(path)
    manifest = _read_manifest(path)
    names = _file_names(path, manifest)
    if MODEL_FILE not in names:
        raise CheckpointError("missing: the checkpoint is incomplete", file=path / MODEL_FILE)
    for name in names:
        if "files" in manifest:
            _check_recorded(path / name, manifest["files"][name])
        else:
            _check_layout(path / name)
    return manifest


@dataclass(frozen=True)
class UsableRound:
    """The newest round of a checkpoints directory that passed :func:`verify_checkpoint`, and the
    newer ones that did not."""

    path: Path
    manifest: dict
    skipped: list[SkippedCheckpoint]


def newest_usable_round(directory: Path) -> UsableRound | None:
    """The newest whole round under ``directory``, None when there is no round at all. Checks
    without loading (a resume checks before any worker starts). Raises :class:`CheckpointError`
    naming each bad file when there are rounds but none is usable."""
    skipped: list[SkippedCheckpoint] = []
    for path in sorted(Path(directory).glob(ROUND_GLOB), reverse=True):
        try:
            return UsableRound(path, verify_checkpoint(path), skipped)
        except CheckpointError as e:
            skipped.append(SkippedCheckpoint(int(path.name.removeprefix("round-")), e))
    if skipped:
        raise CheckpointError("no usable checkpoint: " + "; ".join(str(s.error) for s in skipped), file=Path(directory))
    return None


def _load(path: Path, manifest: dict, skipped: list[SkippedCheckpoint] | None = None) -> Checkpoint:
    names = _file_names(path, manifest)
    local = {n[len("local-") : -len(".safetensors")]: load_file(path / n) for n in names if n.startswith("local-")}
    server = load_file(path / SERVER_STATE_FILE) if SERVER_STATE_FILE in names else {}
    weights = load_file(path / MODEL_FILE)
    return Checkpoint(int(manifest["round"]), path, weights, local, manifest, server, skipped or [])


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest usable round's checkpoint under ``directory``, if there is any round (see
    :func:`newest_usable_round`)."""
    found = newest_usable_round(directory)
    return _load(found.path, found.manifest, found.skipped) if found else None


def find_checkpoint(source: Path) -> Checkpoint | None:
    """The checkpoint a user names: a ``round-NNNN`` directory itself, else the newest usable
    round of a run directory (its ``checkpoints/``) or of a checkpoints directory."""
    source = Path(source)
    if (source / MANIFEST).exists() or source.match(ROUND_GLOB):
        return load_checkpoint(source)
    return latest_checkpoint(source / CHECKPOINTS) or latest_checkpoint(source)


def load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path``, checked first (:func:`verify_checkpoint`)."""
    path = Path(path)
    return _load(path, verify_checkpoint(path))


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
