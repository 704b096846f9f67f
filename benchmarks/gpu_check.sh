#!/usr/bin/env bash
# One GPU host, one script (under 8 minutes on an H100/H200):
#   (a) fedsplit verify on the GPU: a layer, an expert and a head plan, fp32 and bf16-mixed, in one
#       process; the same plans with the whole training recipe (clipping that clips, warmup +
#       cosine, activation checkpointing), in one process and (layers) over gRPC between processes;
#   (b) tokens/s of the base model (~150M parameters), bf16-mixed, batch 8 x 512: the monolith vs a
#       2-stage and an expert split with every organisation in one simulation process (in memory),
#       and with one process per organisation (gRPC through pinned host buffers);
#   (c) each organisation's peak GPU memory (one process per organisation);
#   (d) the base model's memory per organisation, one step at batch 8 x 512: fp32, bf16-mixed,
#       bf16-mixed + activation checkpointing.
# DEVICE=cpu runs the same checks on the CPU with a small model (to try the script without a GPU).
# A section that fails says so and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GRPC_VERBOSITY=ERROR
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

echo "== (a) verify on $DEVICE, 10 AdamW steps (max abs parameter difference; bitwise = 0)"
for plan in layers experts heads; do
  for precision in fp32 bf16-mixed; do
    line=$("$PY" -m fedsplit.cli verify "configs/plans/$plan/federation.yaml" --steps 10 --device "$DEVICE" \
      --precision "$precision" --tolerance 1 --json) || { echo "$plan $precision: verify FAILED"; continue; }
    "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); print(f'{sys.argv[2]:8} {sys.argv[3]:11} max abs diff {d[\"max_abs_diff\"]:.3e}  ({d[\"worst_parameter\"]})')" \
      "$line" "$plan" "$precision"
  done
done

echo "== (a') the training recipe on $DEVICE (grad_clip 0.5 that clips, warmup 3 + cosine, activation checkpointing), fp32, 10 steps"
"$PY" - "$DEVICE" <<'EOF' || echo "!! (a') FAILED"
import sys
from pathlib import Path

from fedsplit.federation.verify import verify
from fedsplit.plan import load_plan

device = sys.argv[1]
schedule = {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1}
for name, transport in [("layers", "inprocess"), ("experts", "inprocess"), ("heads", "inprocess"), ("layers", "grpc")]:
    plan = load_plan(Path("configs/plans") / name / "federation.yaml")
    optimizer = {**plan.training.optimizer.model_dump(), "schedule": schedule}
    plan = plan.with_training(grad_clip=0.5, activation_checkpointing=True, optimizer=optimizer)
    r = verify(plan, 10, device, transport=transport, insecure=True)
    clip = max(abs(a - b) / b for a, b in zip(r.clip_split, r.clip_mono)) if r.clip_split else float("nan")
    print(f"{name:8} {transport:9} max abs diff {r.max_abs_diff:.3e}  clip factor rel diff {clip:.1e}  "
          f"clip factors {min(r.clip_mono, default=1):.3f}-{max(r.clip_mono, default=1):.3f}")
EOF

echo "== (b, c) base model, bf16-mixed, every organisation in one process on $DEVICE"
"$PY" - "$DEVICE" <<'EOF' || echo "!! (b, c) FAILED"
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
    # One process per organisation (one allocator each): gRPC between them, and each one's peak.
    with ProcessFederation(plan, weights, device, insecure=True) as fed:
        tps = tokens_per_s(lambda s: fed.train_step(s, synthetic_batches(plan, s)))
        memory = fed.memory()
    print(f"{'':18} {tps:10,.0f} tok/s   {tps / mono_tps:.2f}x the monolith (a process per organisation, gRPC)")
    for org, m in memory.items():
        gpu, rss = m["peak_device_bytes"] / 2**20, m["peak_rss_bytes"] / 2**20
        print(f"    {org:14} peak GPU memory {gpu:8,.0f} MiB   peak RSS {rss:8,.0f} MiB")
EOF

echo "== (d) memory per organisation, one step, batch 8 x 512 in one micro-batch (cpu: small model, 8 x 128)"
"$PY" - "$DEVICE" <<'EOF' || echo "!! (d) FAILED"
import sys, tempfile
from pathlib import Path

from fedsplit.hosting.processes import ProcessFederation
from fedsplit.plan import load_plan
from fedsplit.runtime import initial_weights, synthetic_batches

device = sys.argv[1]
root = Path.cwd()
model, seq, rest = ("base", 512, "1-7") if device != "cpu" else ("small", 128, "1-3")
work = Path(tempfile.mkdtemp())
(work / "memory.yaml").write_text(
    f"name: gpu-memory\nmodel: {root / 'configs/models' / (model + '.yaml')}\n"
    f"training: {{rounds: 1, steps_per_round: 1, batch_size: 8, seq_len: {seq}, micro_batches: 1, eval_tokens: 0}}\n"
    f"orgs:\n  - {{org: data-owner, data: {{train: {root / 'data/tinyshakespeare.txt'}}}, "
    f"holds: [embed, layers.0, final_norm, lm_head]}}\n  - {{org: compute, holds: [layers.{rest}]}}\n"
)
base = load_plan(work / "memory.yaml")
weights = initial_weights(base)
variants = {
    "fp32": base,
    "bf16-mixed": base.with_training(precision="bf16-mixed"),
    "bf16-mixed + checkpointing": base.with_training(precision="bf16-mixed", activation_checkpointing=True),
}
MiB = 2**20
transient = {}
print(f"{'variant':28} {'organisation':12} {'parameters':>12} {'held MiB':>9} {'peak MiB':>9} {'peak - held MiB':>16}")
for label, plan in variants.items():
    with ProcessFederation(plan, weights, device, insecure=True) as fed:
        fed.train_step(0, synthetic_batches(plan, 0))
        memory = fed.memory()
    for org, m in memory.items():
        held, peak = m["device_bytes"], m["peak_device_bytes"]
        transient[(label, org)] = peak - held
        print(f"{label:28} {org:12} {plan.parameter_count(org):12,} {held / MiB:9,.0f} {peak / MiB:9,.0f} "
              f"{(peak - held) / MiB:16,.0f}")
if device != "cpu":
    cut = transient[("bf16-mixed", "data-owner")] / max(transient[("bf16-mixed + checkpointing", "data-owner")], 1)
    print(f"data owner's peak - held (activations, gradients, working memory), bf16-mixed / + checkpointing: {cut:.1f}x")
EOF
