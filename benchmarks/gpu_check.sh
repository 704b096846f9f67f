#!/usr/bin/env bash
# One GPU host, one script (under 8 minutes on an H100/H200):
#   (a) fedsplit verify on the GPU: a layer, an expert and a head plan, fp32 and bf16-mixed;
#   (b) tokens/s of the base model (~150M parameters), bf16-mixed, batch 8 x 512: the monolith vs a
#       2-stage and an expert split with every organisation in one simulation process (in memory);
#   (c) each organisation's peak GPU memory (one process per organisation, two steps).
# DEVICE=cpu runs the same checks on the CPU with a small model (to try the script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== (a) verify on $DEVICE, 10 AdamW steps (max abs parameter difference; bitwise = 0)"
for plan in layers experts heads; do
  for precision in fp32 bf16-mixed; do
    line=$("$PY" -m fedsplit.cli verify "configs/plans/$plan/federation.yaml" --steps 10 --device "$DEVICE" \
      --precision "$precision" --tolerance 1 --json)
    "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); print(f'{sys.argv[2]:8} {sys.argv[3]:11} max abs diff {d[\"max_abs_diff\"]:.3e}  ({d[\"worst_parameter\"]})')" \
      "$line" "$plan" "$precision"
  done
done

echo "== (b, c) base model, bf16-mixed, every organisation in one process on $DEVICE"
"$PY" - "$DEVICE" <<'EOF'
import sys, tempfile, time
from pathlib import Path

import torch

from fedsplit.hosting.processes import ProcessFederation
from fedsplit.plan import load_plan
from fedsplit.runtime import MonolithicTrainer, initial_weights, synthetic_batches

device = sys.argv[1]
root = Path.cwd()
model, seq = ("base", 512) if device != "cpu" else ("small", 128)
orgs = {
    "2-stage": "  - {org: data-owner, data: {train: DATA}, holds: [embed, layers.0-3, final_norm, lm_head]}\n"
    "  - {org: compute, holds: [layers.4-7]}\n",
    "experts": "  - {org: data-owner, data: {train: DATA}, holds: [embed, layers.0-7, final_norm, lm_head]}\n"
    "  - {org: experts-b, holds: [layers.0-7.experts.0-3]}\n"
    "  - {org: experts-c, holds: [layers.0-7.experts.4-7]}\n",
}
layers = 8 if model == "base" else 4
work = Path(tempfile.mkdtemp())


def plan_of(name: str):
    text = orgs[name].replace("DATA", str(root / "data/tinyshakespeare.txt"))
    if layers == 4:
        text = text.replace("layers.0-3", "layers.0-1").replace("layers.4-7", "layers.2-3").replace("0-7", "0-3")
    (work / f"{name}.yaml").write_text(
        f"name: gpu-{name}\nmodel: {root / 'configs/models' / (model + '.yaml')}\n"
        f"training: {{rounds: 1, steps_per_round: 10, batch_size: 8, seq_len: {seq}, micro_batches: 2, "
        f"eval_tokens: 0, precision: bf16-mixed, optimizer: {{name: adamw, lr: 3.0e-4}}}}\norgs:\n{text}"
    )
    return load_plan(work / f"{name}.yaml")


def sync():
    if device != "cpu":
        torch.cuda.synchronize()


def tokens_per_s(step, steps=5, warmup=2):
    for s in range(warmup):
        step(s)
    sync()
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    sync()
    return steps * 8 * seq / (time.perf_counter() - start)


plan = plan_of("2-stage")
weights = initial_weights(plan)
mono = MonolithicTrainer(plan, weights, device)
mono_tps = tokens_per_s(lambda s: mono.train_step(s, synthetic_batches(plan, s)))
peak = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else 0
print(f"monolith           {mono_tps:10,.0f} tok/s   peak GPU memory {peak:,.0f} MiB")
del mono
for name in orgs:
    plan = plan_of(name)
    with ProcessFederation(plan, weights, device, insecure=True, groups=[list(plan.orgs)]) as fed:
        tps = tokens_per_s(lambda s: fed.train_step(s, synthetic_batches(plan, s)))
    print(f"{name:18} {tps:10,.0f} tok/s   {tps / mono_tps:.2f}x the monolith (one process, in memory)")
    # Each organisation's own peak: one process per organisation (one allocator each), two steps.
    with ProcessFederation(plan, weights, device, insecure=True) as fed:
        for s in range(2):
            fed.train_step(s, synthetic_batches(plan, s))
        memory = fed.memory()
    for org, m in memory.items():
        gpu, rss = m["peak_device_bytes"] / 2**20, m["peak_rss_bytes"] / 2**20
        print(f"    {org:14} peak GPU memory {gpu:8,.0f} MiB   peak RSS {rss:8,.0f} MiB")
EOF
