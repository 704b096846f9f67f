"""Round checkpoints that are checked: the manifest records every file's size and SHA-256, a
resume passes over a truncated or corrupted last round to the newest whole one (and says so in
the run's log), a full disk mid-write leaves the rounds before as they were, and the commands
that read a checkpoint name the bad file instead of showing a decoder's traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fedsplit.cli import main
from fedsplit.federation import checkpoint as checkpoint_module
from fedsplit.federation.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    SERVER_STATE_FILE,
    CheckpointWriteError,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    plan_hash,
    write_checkpoint,
)
from fedsplit.federation.rundir import MetricsLog
from fedsplit.federation.server_app import Coordinator
from fedsplit.federation.settings import CoordinatorSettings
from fedsplit.interop import CheckpointError
from fedsplit.model import MoETransformer
from fedsplit.plan import load_plan, write_resolved

from ..conftest import PLANS

FEDERATION = PLANS / "u-shape-3" / "federation.yaml"


def weights_of(round: int) -> dict[str, torch.Tensor]:
    """Small tensors that differ from round to round."""
    g = torch.Generator().manual_seed(round)
    return {"embed.weight": torch.randn(8, 4, generator=g), "head.bias": torch.randn(8, generator=g)}


def write_round(directory: Path, round: int, manifest: dict | None = None) -> Path:
    """A round as the coordinator writes it: the model, two organisations' local pieces and the
    server optimizer's state."""
    local = {"a": {"x": torch.full((3,), float(round))}, "b": {"y": torch.arange(4.0) + round}}
    server = {"p::m::w": torch.ones(2) * round}
    return write_checkpoint(directory, round, weights_of(round), local, manifest or {"plan": "t"}, server)


def write_old_round(directory: Path, round: int) -> Path:
    """A round as fedsplit wrote it before manifests listed their files: no sizes, no checksums."""
    path = directory / f"round-{round:04d}"
    path.mkdir(parents=True)
    save_file(weights_of(round), path / MODEL_FILE, metadata={"format": "pt", "round": str(round)})
    (path / MANIFEST).write_text(json.dumps({"round": round, "plan": "t"}))
    return path


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- writing -------------------------------------------------------------------------------------


def test_manifest_records_a_checksum_of_every_file(tmp_path):
    path = write_round(tmp_path, 1)
    files = json.loads((path / MANIFEST).read_text())["files"]
    on_disk = {f.name for f in path.iterdir()} - {MANIFEST}
    assert set(files) == on_disk == {MODEL_FILE, "local-a.safetensors", "local-b.safetensors", SERVER_STATE_FILE}
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_written_round_loads_back_as_written_and_leaves_no_temporary_files(tmp_path):
    write_round(tmp_path, 1)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.skipped == []
    assert same(ckpt.weights, weights_of(1))
    assert same(ckpt.local["b"], {"y": torch.arange(4.0) + 1}) and same(ckpt.server_state, {"p::m::w": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["round-0001"]


def _failing_save(monkeypatch, name: str, error: Exception) -> None:
    """safetensors' save raises ``error`` for the file ``name`` (the disk fills up there)."""
    real = checkpoint_module.save_file

    def save(tensors, filename, metadata=None):
        if Path(filename).name == name:
            raise error
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", save)


def _failing_manifest(monkeypatch, name: str, error: Exception) -> None:
    """Writing the manifest raises ``error`` (the disk fills up with the last, smallest file)."""

    def open_(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise error
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", open_, raising=False)


FULL_DISK = OSError(errno.ENOSPC, "No space left on device")
# what safetensors itself raises on a full disk (seen on a 64 KiB tmpfs)
FULL_DISK_SAFETENSORS = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    ("name", "error", "fail"),
    [
        (MODEL_FILE, FULL_DISK, _failing_save),
        ("local-b.safetensors", FULL_DISK, _failing_save),
        (SERVER_STATE_FILE, FULL_DISK_SAFETENSORS, _failing_save),
        (MANIFEST, FULL_DISK, _failing_manifest),
    ],
)
def test_full_disk_while_writing_leaves_the_previous_round_usable(tmp_path, monkeypatch, name, error, fail):
    write_round(tmp_path, 1)
    with monkeypatch.context() as m:
        fail(m, name, error)
        with pytest.raises(CheckpointWriteError) as raised:
            write_round(tmp_path, 2)
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == str(tmp_path / "round-0002.partial" / name)
    assert f"{tmp_path / 'round-0002.partial' / name}: No space left on device" in str(raised.value)
    assert [p.name for p in tmp_path.iterdir()] == ["round-0001"]  # the half-written round is gone
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.skipped == [] and same(ckpt.weights, weights_of(1))


def test_rewriting_a_bad_round_replaces_it_whole(tmp_path):
    for r in (1, 2):
        write_round(tmp_path, r)
    truncate(tmp_path / "round-0002" / MODEL_FILE)
    write_round(tmp_path, 2)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.skipped == [] and same(ckpt.weights, weights_of(2))


# -- reading, checked ----------------------------------------------------------------------------


def test_latest_checkpoint_falls_back_to_the_newest_complete_round_when_the_last_is_truncated(tmp_path):
    for r in (1, 2, 3):
        write_round(tmp_path, r)
    truncate(tmp_path / "round-0003" / MODEL_FILE)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 2 and same(ckpt.weights, weights_of(2))
    [skipped] = ckpt.skipped
    assert skipped.round == 3 and skipped.error.file == tmp_path / "round-0003" / MODEL_FILE
    assert "truncated or corrupted" in skipped.error.reason


def test_a_corrupted_file_of_the_right_size_is_caught_by_its_checksum(tmp_path):
    for r in (1, 2):
        write_round(tmp_path, r)
    flip_last_byte(tmp_path / "round-0002" / "local-a.safetensors")
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1
    assert str(ckpt.skipped[0].error) == (
        f"{tmp_path / 'round-0002' / 'local-a.safetensors'}: checksum mismatch (truncated or corrupted)"
    )


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_round_whose_manifest_is_truncated_or_missing_is_passed_over_naming_the_manifest(tmp_path, damage):
    for r in (1, 2):
        write_round(tmp_path, r)
    manifest = tmp_path / "round-0002" / MANIFEST
    truncate(manifest) if damage == "truncated" else manifest.unlink()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.skipped[0].error.file == manifest


def test_a_round_missing_a_file_its_manifest_lists_is_passed_over(tmp_path):
    for r in (1, 2):
        write_round(tmp_path, r)
    (tmp_path / "round-0002" / SERVER_STATE_FILE).unlink()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and "missing" in str(ckpt.skipped[0].error)


def test_no_usable_checkpoint_is_an_error_naming_each_bad_file(tmp_path):
    for r in (1, 2):
        write_round(tmp_path, r)
    truncate(tmp_path / "round-0001" / "local-b.safetensors")
    flip_last_byte(tmp_path / "round-0002" / MODEL_FILE)
    with pytest.raises(CheckpointError) as raised:
        latest_checkpoint(tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "round-0001" / "local-b.safetensors") in message
    assert str(tmp_path / "round-0002" / MODEL_FILE) in message


def test_a_checkpoints_directory_without_rounds_has_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_an_old_checkpoint_without_checksums_still_loads(tmp_path):
    write_old_round(tmp_path, 1)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and same(ckpt.weights, weights_of(1)) and ckpt.local == {} and ckpt.server_state == {}


def test_an_old_checkpoint_that_is_truncated_is_caught_by_the_size_its_header_implies(tmp_path):
    for r in (1, 2):
        write_old_round(tmp_path, r)
    truncate(tmp_path / "round-0002" / MODEL_FILE)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.round == 1 and ckpt.skipped[0].error.file == tmp_path / "round-0002" / MODEL_FILE
    assert "bytes where its header needs" in ckpt.skipped[0].error.reason


def test_a_round_named_directly_is_checked_and_never_swapped_for_another(tmp_path):
    for r in (1, 2):
        write_round(tmp_path, r)
    truncate(tmp_path / "round-0002" / MODEL_FILE)
    with pytest.raises(CheckpointError, match="round-0002/model.safetensors"):
        find_checkpoint(tmp_path / "round-0002")
    with pytest.raises(CheckpointError, match="round-0002/model.safetensors"):
        load_checkpoint(tmp_path / "round-0002")
    assert find_checkpoint(tmp_path / "round-0001").round == 1


# -- resume, export, generate --------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A run directory of the u-shape-3 plan with three rounds' checkpoints and their log lines."""
    plan = load_plan(FEDERATION)
    run = tmp_path / "run"
    run.mkdir()
    write_resolved(plan, run / "plan.json")
    log = MetricsLog(run / "metrics.jsonl")
    weights = MoETransformer(plan.model).state_dict()
    for r in (1, 2, 3):
        record = {"round": r, "event": "round", "loss": 1.0 / r, "tokens": 64.0, "seconds": 1.0, "alive": []}
        manifest = {"plan": plan.name, "plan_hash": plan_hash(plan), "metrics": record}
        path = write_checkpoint(run / "checkpoints", r, weights, {}, manifest)
        log.write({**record, "checkpoint": str(path)})
    return run


def test_resume_falls_back_to_the_newest_complete_round_when_the_last_is_truncated(run_dir, caplog):
    bad = run_dir / "checkpoints" / "round-0003" / MODEL_FILE
    truncate(bad)
    settings = CoordinatorSettings(plan=str(FEDERATION), run_dir=str(run_dir), resume=True)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        coordinator = Coordinator(None, settings)
    assert coordinator.first_round == 3
    assert f"{bad}: " in caplog.text and "(truncated or corrupted); resuming from round 2" in caplog.text
    [skipped] = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["event"] == "checkpoint-skipped"]
    assert skipped["round"] == 3 and skipped["path"] == str(bad) and skipped["resumed_from"] == 2
    assert "truncated or corrupted" in skipped["reason"]


@pytest.mark.timeout(120)  # were the check to miss, the simulation would start: stop it soon
def test_resume_with_no_usable_round_stops_before_any_worker_starts_naming_each_bad_file(run_dir, capsys):
    bad = [run_dir / "checkpoints" / f"round-{r:04d}" / MANIFEST for r in (1, 2, 3)]
    for manifest in bad:
        truncate(manifest)
    code = main(["simulate", str(FEDERATION), "--resume", str(run_dir), "--insecure"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot resume" in err and all(str(m) in err for m in bad), err
    assert not (run_dir / "workers").exists()


def test_export_of_a_corrupted_round_names_the_file(run_dir, tmp_path, capsys):
    bad = run_dir / "checkpoints" / "round-0003" / MODEL_FILE
    flip_last_byte(bad)
    code = main(["export", str(run_dir / "checkpoints" / "round-0003"), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}: checksum mismatch" in err and "Traceback" not in err, err


def test_generate_from_a_run_whose_rounds_are_all_corrupted_names_each_file(run_dir, capsys):
    bad = [run_dir / "checkpoints" / f"round-{r:04d}" / MODEL_FILE for r in (1, 2, 3)]
    for model in bad:
        truncate(model)
    code = main(["generate", str(run_dir), "--prompt", "ROMEO:", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "no usable checkpoint" in err and all(str(m) in err for m in bad), err
