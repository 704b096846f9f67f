"""Dense-to-MoE upcycling: the experts cut from a dense FFN add back up to it exactly, each method
cuts the way it promises, and the result is an ordinary model directory a plan splits by expert."""

import json

import pytest
import torch
import torch.nn.functional as F

from fedsplit.cli import main
from fedsplit.federation.verify import verify
from fedsplit.interop import CheckpointError, open_checkpoint, save_fedsplit
from fedsplit.interop.upcycle import check_upcycle, taylor_importance, upcycle
from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.plan import load_plan

from ..interop_helpers import fedsplit_logits, write_plan

DENSE = ModelConfig(
    vocab_size=256,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=1,
    top_k=1,
    expert_ffn_size=96,
    aux_loss_coef=0.0,
)


@pytest.fixture(scope="module")
def dense() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return MoETransformer(DENSE).state_dict()


@pytest.mark.parametrize("method", ["random", "cluster", "shared"])
def test_every_expert_at_unit_gate_reproduces_the_dense_ffn(dense, method):
    cfg, moe = upcycle(DENSE, dense, 4, method, top_k=2)
    assert cfg.num_experts == 4 and cfg.top_k == 2
    assert cfg.expert_ffn_size * 4 + (cfg.shared_expert_ffn_size or 0) == DENSE.expert_ffn_size
    report = check_upcycle(DENSE, dense, cfg, moe)
    print(
        f"{method}: all experts, unit gates: max |diff| {report.all_experts_max_abs_diff:.2e}; top-2 of 4: "
        "FFN rel. error "
        f"{report.top_k_ffn_rel_error:.3f}, logits max |diff| {report.top_k_logits_max_abs_diff:.3e} "
        f"(rel. {report.top_k_logits_rel_error:.3f})"
    )
    assert report.all_experts_max_abs_diff <= 1e-5
    assert report.top_k_ffn_rel_error > 1e-3  # top-k < N does move the output; the report says how far


def _within_expert_similarity(moe: dict, experts: int) -> float:
    sims = []
    for e in range(experts):
        rows = F.normalize(moe[f"layers.0.moe.experts.{e}.w1.weight"], dim=1)
        sims.append((rows @ rows.T).mean())
    return float(torch.stack(sims).mean())


def test_clustering_groups_neurons_that_read_alike(dense):
    # Plant structure: neurons in 4 groups whose W1 rows point in 4 directions (plus noise).
    gen = torch.Generator().manual_seed(3)
    directions = torch.randn(4, DENSE.hidden_size, generator=gen)
    planted = dict(dense)
    planted["layers.0.moe.experts.0.w1.weight"] = directions[torch.randperm(96, generator=gen) % 4] + 0.3 * torch.randn(
        96, 32, generator=gen
    )
    clustered = _within_expert_similarity(upcycle(DENSE, planted, 4, "cluster")[1], 4)
    random = _within_expert_similarity(upcycle(DENSE, planted, 4, "random")[1], 4)
    assert clustered > 0.8 > random


def test_shared_expert_holds_the_most_important_neurons(dense):
    tokens = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(5))
    cfg, moe = upcycle(DENSE, dense, 4, "shared", shared_neurons=16, calibration=tokens)
    assert cfg.shared_expert_ffn_size == 16 and cfg.expert_ffn_size == 20
    for layer, score in enumerate(taylor_importance(DENSE, dense, tokens)):
        top = score.argsort(descending=True)[:16].sort().values
        expected = dense[f"layers.{layer}.moe.experts.0.w1.weight"][top]
        assert torch.equal(moe[f"layers.{layer}.moe.shared_experts.w1.weight"], expected)


def test_upcycling_refuses_what_does_not_split(dense):
    with pytest.raises(ValueError, match="do not split into 5 equal experts"):
        upcycle(DENSE, dense, 5, "random")
    cfg, moe = upcycle(DENSE, dense, 4, "random")
    with pytest.raises(CheckpointError) as exc:
        upcycle(cfg, moe, 2, "random")
    assert exc.value.field == "num_experts"


def test_llama_upcycled_on_the_command_line_is_a_model_a_plan_splits_by_expert(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
        )
    ).eval()
    llama.save_pretrained(tmp_path / "llama")
    tokens = torch.randint(0, 256, (2, 12))
    imported = open_checkpoint(tmp_path / "llama")
    with torch.no_grad():
        diff = (fedsplit_logits(imported.config, imported.reader.read_all(), tokens) - llama(tokens).logits).abs().max()
    assert diff <= 1e-5  # the dense model reads as a one-expert MoE

    assert (
        main(
            [
                "upcycle",
                str(tmp_path / "llama"),
                "--experts",
                "4",
                "--method",
                "cluster",
                "--out",
                str(tmp_path / "moe"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert report["all_experts_max_abs_diff"] <= 1e-5
    plan = load_plan(
        write_plan(
            tmp_path,
            "moe",
            {
                "owner": [
                    "embed",
                    "layers.0-1.router",
                    "layers.0-1.attention",
                    "layers.0-1.experts.0-1",
                    "final_norm",
                    "lm_head",
                ],
                "expert-host": ["layers.0-1.experts.2-3"],
            },
        )
    )
    assert plan.model.num_experts == 4
    assert verify(plan, steps=2).max_abs_diff <= 1e-5


def test_a_fedsplit_dense_directory_upcycles_too(tmp_path, dense):
    save_fedsplit(DENSE, dense, tmp_path / "dense")
    assert (
        main(
            ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--method", "shared", "--out", str(tmp_path / "moe")]
        )
        == 0
    )
    assert open_checkpoint(tmp_path / "moe").config.num_shared_experts == 1
