"""The worked examples run as their READMEs say, in a copy of the example (fewer steps)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.slow


def run(*args: str, cwd) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_the_lora_fine_tune_example_exports_adapters_that_peft_loads_and_generates_with(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    example = tmp_path / "examples" / "lora_finetune"
    shutil.copytree(ROOT / "examples" / "lora_finetune", example)
    (tmp_path / "data").symlink_to(ROOT / "data")
    python, fedsplit = sys.executable, [sys.executable, "-m", "fedsplit.cli"]
    run(python, "examples/lora_finetune/make_base.py", "examples/lora_finetune/base", cwd=tmp_path)
    steps = ["--rounds", "1", "--steps", "2", "--insecure"]
    run(*fedsplit, "simulate", "examples/lora_finetune/federation.yaml", "--runs-dir", "runs", *steps, cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    run(*fedsplit, "export", str(run_dir), "adapter", "--format", "peft", cwd=tmp_path)
    out = run(python, "examples/lora_finetune/generate.py", str(run_dir), "adapter", "ROMEO:", cwd=tmp_path)
    first, generated = out.split("\n", 1)
    assert first.startswith("max |peft(base + adapters) - fedsplit(run)| logits = ")
    assert float(first.rsplit("= ", 1)[1]) <= 1e-5
    assert generated.startswith("ROMEO:") and len(generated) > len("ROMEO:")
