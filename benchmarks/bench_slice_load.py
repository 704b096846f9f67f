#!/usr/bin/env python
"""Peak memory of loading one organisation's slices of a checkpoint vs the whole model.

    .venv/bin/python benchmarks/bench_slice_load.py [--quick] [--repeats 3]

Writes a random MoE in the Hugging Face layout (``fedsplit.interop.save_hf``, sharded at 256 MiB,
as ``save_pretrained`` shards) and a plan naming that directory as its model, in which
``expert-host`` holds one routed expert (``layers.1.experts.3``), ``heads-host`` one head group
(``layers.0.attention.heads.0-1``: rows of q/k/v, columns of o_proj) and ``owner`` the rest. Then,
each in a fresh child process so that peaks do not mix:

* ``expert``: ``plan.checkpoint_slices("expert-host")``;
* ``heads``: ``plan.checkpoint_slices("heads-host")``;
* ``whole``: ``plan.checkpoint.reader.read_all()``, the full model (what the coordinator holds).

Each child reports its RSS after ``load_plan`` (Python, torch and the safetensors headers: the
baseline), resets the kernel's high-water mark (``/proc/self/clear_refs``), loads, and reports
the new peak (``VmHWM``); the load's cost is the difference. The
page cache is warm for every child (the files were just written), so this measures memory, not
disk speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import loadavg, provenance, table  # noqa: E402

MODES = {"expert": "expert-host", "heads": "heads-host", "whole": None}


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(federation: str, mode: str) -> None:
    from fedsplit.plan import load_plan

    plan = load_plan(federation)
    # Imports peak above the steady state; reset the high-water mark (Linux >= 4.0) so that the
    # peak below is the load's own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    started = time.perf_counter()
    org = MODES[mode]
    tensors = plan.checkpoint.reader.read_all() if org is None else plan.checkpoint_slices(org)
    # safetensors may hand back pages it has not read yet; touch every byte, as copying the
    # tensors into a partition's parameters does.
    for t in tensors.values():
        t.sum()
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    print(
        json.dumps(
            {"base_kib": base, "peak_kib": peak, "held_bytes": held, "tensors": len(tensors), "seconds": seconds}
        )
    )


def write_checkpoint(root: Path, quick: bool) -> Path:
    import torch

    from fedsplit.interop import save_hf
    from fedsplit.model import ModelConfig, parameter_shapes

    size = (
        dict(hidden_size=256, expert_ffn_size=512, num_layers=2)
        if quick
        else dict(hidden_size=512, expert_ffn_size=1024, num_layers=4)
    )
    cfg = ModelConfig(
        vocab_size=32000,
        num_heads=8,
        num_kv_heads=4,
        head_dim=size["hidden_size"] // 8,
        num_experts=16,
        top_k=2,
        num_shared_experts=1,
        shared_expert_gate=True,
        qkv_bias=True,
        **{k: v for k, v in size.items() if k != "hidden_size"},
        hidden_size=size["hidden_size"],
    )
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in parameter_shapes(cfg).items()}
    save_hf(cfg, state, root / "hf-model", max_shard_bytes=256 * 2**20)
    (root / "orgs").mkdir()
    (root / "data.txt").write_text("hello " * 100)
    fed = {"name": "slice-load", "model": "hf-model", "orgs": ["orgs/*.yaml"]}
    orgs = {
        "owner": {
            "org": "owner",
            "data": {"train": "../data.txt"},
            "holds": [
                "embed",
                "layers.0.router",
                "layers.0.experts",
                "layers.0.shared_experts",
                "layers.1-3" if not quick else "layers.1",
                "final_norm",
                "lm_head",
            ],
        },
        "heads-host": {"org": "heads-host", "holds": ["layers.0.attention.heads.0-1"]},
        "expert-host": {"org": "expert-host", "holds": ["layers.1.experts.3"]},
    }
    orgs["owner"]["holds"].append("layers.0.attention.heads.2-7")
    (root / "federation.yaml").write_text(json.dumps(fed))
    for name, spec in orgs.items():
        (root / "orgs" / f"{name}.yaml").write_text(json.dumps(spec))
    return root / "federation.yaml"


def run_child(federation: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(federation), mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a 2-layer model (about 60 MB) instead of 4 layers (about 500 MB)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("FEDERATION", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    print("\n".join(["# bench_slice_load", *provenance("fedsplit"), f"load average before: {loadavg()}"]))
    with tempfile.TemporaryDirectory() as tmp:
        federation = write_checkpoint(Path(tmp), args.quick)
        files = sorted((Path(tmp) / "hf-model").glob("*.safetensors"))
        on_disk = sum(f.stat().st_size for f in files)
        print(f"checkpoint: {on_disk / 2**20:.0f} MiB in {len(files)} safetensors shards")
        results = {mode: [run_child(federation, mode) for _ in range(args.repeats)] for mode in MODES}
    cost = {m: statistics.median((r["peak_kib"] - r["base_kib"]) / 1024 for r in rs) for m, rs in results.items()}
    rows = []
    for mode, rs in results.items():
        rows.append(
            [
                mode,
                f"{rs[0]['tensors']}",
                f"{rs[0]['held_bytes'] / 2**20:.2f}",
                f"{statistics.median(r['base_kib'] for r in rs) / 1024:.0f}",
                f"{statistics.median(r['peak_kib'] for r in rs) / 1024:.0f}",
                f"{cost[mode]:.1f}",
                f"{statistics.median(r['seconds'] for r in rs) * 1000:.0f}",
            ]
        )
    print(
        "\n".join(
            table(["load", "tensors", "held MiB", "baseline RSS MiB", "peak RSS MiB", "load cost MiB", "ms"], rows)
        )
    )
    print(f"medians of {args.repeats} child processes each; load cost = peak RSS during the load - RSS before it")
    for mode in ("expert", "heads"):
        print(f"whole model / {mode} partition load cost: {cost['whole'] / max(cost[mode], 0.1):.0f}x")
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
