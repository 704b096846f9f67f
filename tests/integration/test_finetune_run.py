"""A LoRA fine-tune of a Hugging Face checkpoint through the real Flower simulation: its rounds
equal monolithic LoRA training, its checkpoints carry only the adapters and name their base,
its PEFT and merged exports compute in peft and transformers what fedsplit computes, and a
resume against another base is refused."""

from __future__ import annotations

import json

import pytest
import torch

from fedsplit.cli import main
from fedsplit.federation.checkpoint import latest_checkpoint, model_weights
from fedsplit.federation.simulate import SimulationFailed, SimulationOptions, simulate
from fedsplit.federation.verify import verify
from fedsplit.model import ModelConfig, is_adapter
from fedsplit.plan import load_plan

from ..interop_helpers import fedsplit_logits, write_plan, write_random_base
from ..recipes import ALL, finetuned
from ..reference_training import max_diff, monolithic

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

# Ungated shared experts (fedsplit's default; Granite-MoE-Shared in transformers) or gated ones
# (Qwen2-MoE), two layers: the data owner holds both ends and layer 0, two organisations split
# layer 1 (one of them holds half its experts).
BASE = dict(
    vocab_size=256,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=4,
    top_k=2,
    expert_ffn_size=16,
    num_shared_experts=1,
    rms_norm_eps=1e-6,
)
ORGS = {
    "owner": ["embed", "layers.0", "final_norm", "lm_head"],
    "middle": ["layers.1"],
    "experts": ["layers.1.experts.2-3"],
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts", "shared_experts"]


def lora_plan(tmp_path, gated: bool, dropout: float = 0.0):
    write_random_base(tmp_path / "base", ModelConfig(**BASE, shared_expert_gate=gated))
    path = write_plan(tmp_path, "base", ORGS)
    document = json.loads(path.read_text())
    document["training"]["rounds"] = 2
    document["finetune"] = {"rank": 2, "alpha": 4.0, "targets": TARGETS, "dropout": dropout}
    path.write_text(json.dumps(document))
    return load_plan(path)


@pytest.mark.parametrize(
    "gated, dropout", [(False, 0.0), (True, 0.1)], ids=["granite-shared", "qwen2-moe-with-dropout"]
)
def test_a_federated_lora_fine_tune_exports_adapters_that_peft_loads(tmp_path, gated, dropout):
    plan = lora_plan(tmp_path, gated, dropout)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path / "runs", insecure=True))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.round == 2
    assert ckpt.weights and all(is_adapter(k) for k in ckpt.weights)  # the base is not in it
    assert ckpt.manifest["base"]["source"] == str((tmp_path / "base").resolve())
    full = model_weights(ckpt, plan.model)
    steps = plan.training.rounds * plan.training.steps_per_round
    diff = max_diff(full, monolithic(plan, steps))
    print(f"shared gate {gated}: max |split - monolithic| after {steps} LoRA steps in 2 rounds = {diff:.2e}")
    assert diff <= 1e-5

    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = fedsplit_logits(plan.model, full, tokens)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert (base(tokens).logits - ours).abs().max() > 1e-3  # the fine-tune changed the model

    assert main(["export", str(run_dir), str(tmp_path / "adapter"), "--format", "peft"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["lora_dropout"] == 0.0  # for inference; PEFT refuses dropout on the fused experts
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_diff = float((tuned(tokens).logits - ours).abs().max())
    assert main(["export", str(run_dir), str(tmp_path / "merged"), "--format", "hf", "--merge"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_diff = float((merged(tokens).logits - ours).abs().max())
    print(f"{type(base).__name__}: |peft - fedsplit| = {peft_diff:.2e}, |merged - fedsplit| = {merged_diff:.2e}")
    assert peft_diff <= 1e-5 and merged_diff <= 1e-5


def test_lora_dropout_over_grpc_draws_the_masks_the_monolith_draws(tmp_path):
    plan = finetuned("three-orgs", tmp_path, rank=4, alpha=8.0, targets=ALL, dropout=0.3)
    result = verify(plan, steps=10, transport="grpc")
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


def test_resuming_or_exporting_a_fine_tune_over_another_base_is_refused(tmp_path, capsys):
    plan = lora_plan(tmp_path, gated=False)
    run_dir = simulate(plan, SimulationOptions(runs_root=tmp_path / "runs", insecure=True))
    write_random_base(tmp_path / "base", ModelConfig(**BASE), seed=1)  # same shapes, other weights
    with pytest.raises(SimulationFailed, match="fine-tuned over the base"):
        simulate(load_plan(tmp_path / "federation.yaml"), SimulationOptions(resume=run_dir, insecure=True))
    assert main(["export", str(run_dir), str(tmp_path / "merged"), "--format", "hf", "--merge"]) == 2
    assert "is not the base this run fine-tuned" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    assert latest_checkpoint(run_dir / "checkpoints").round == 2
