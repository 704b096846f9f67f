"""Hugging Face checkpoints in and out: fedsplit computes what transformers computes, before and
after split-federated training, and refuses, by name, what it cannot represent."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsplit.cli import main
from fedsplit.federation.verify import verify
from fedsplit.interop import CheckpointError, open_checkpoint, save_hf
from fedsplit.interop.adapters import merge_adapters
from fedsplit.model import ModelConfig, MoETransformer
from fedsplit.model.config import RouterConfig
from fedsplit.plan import PlanError, load_plan, select
from fedsplit.runtime import InProcessFederation, initial_weights, synthetic_batches

transformers = pytest.importorskip("transformers")

from ..conftest import ROOT  # noqa: E402
from ..interop_helpers import fedsplit_logits, write_plan  # noqa: E402

COMMON = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    rms_norm_eps=1e-6,
)
MODELS = {
    # head_dim differs from hidden/heads, and a sliding window shorter than the sequence
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            intermediate_size=16,
            num_local_experts=4,
            head_dim=12,
            sliding_window=5,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        ),
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            moe_intermediate_size=16,
            num_experts=4,
            intermediate_size=48,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
        ),
    ),
    "qwen2-moe-tied": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        dict(
            moe_intermediate_size=16,
            num_experts=4,
            intermediate_size=48,
            shared_expert_intermediate_size=24,
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
    ),
    # shared experts without a gate, fedsplit's default (configs/models/*.yaml)
    "granite-shared": (
        "GraniteMoeSharedForCausalLM",
        "GraniteMoeSharedConfig",
        dict(intermediate_size=16, num_local_experts=4, shared_intermediate_size=24, attention_multiplier=8**-0.5),
    ),
}
SHARED = {"qwen2-moe", "qwen2-moe-tied", "granite-shared"}


def hf_model(kind: str, seed: int = 0):
    """A random tiny HF model whose every parameter (norms, biases and gates included) is random,
    so that a mapping mistake cannot hide behind a zero or a one."""
    cls, cfg_cls, extra = MODELS[kind]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**COMMON, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_model_gives_the_logits_of_transformers(tmp_path, kind, tokens):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "hf" and ckpt.architecture == MODELS[kind][0]
    diff = (fedsplit_logits(ckpt.config, ckpt.reader.read_all(), tokens) - hf_logits(hf, tokens)).abs().max()
    print(f"{kind}: max |fedsplit - transformers| logits = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_fused_expert_layout_reads_the_same_weights(tmp_path, kind):
    # transformers 5 holds experts fused in memory (experts.gate_up_proj, experts.down_proj) and
    # splits them per expert on save; a checkpoint written in the fused layout reads the same.
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "per-expert")
    (tmp_path / "fused").mkdir()
    shutil.copy(tmp_path / "per-expert" / "config.json", tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    a, b = (open_checkpoint(tmp_path / d).reader.read_all() for d in ("per-expert", "fused"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", list(MODELS))
def test_sharded_export_loads_in_transformers_and_reads_back(tmp_path, kind, tokens):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "in")
    ckpt = open_checkpoint(tmp_path / "in")
    weights = ckpt.reader.read_all()
    save_hf(ckpt.config, weights, tmp_path / "out", max_shard_bytes=16_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = getattr(transformers, MODELS[kind][0]).from_pretrained(tmp_path / "out").eval()
    assert (hf_logits(back, tokens) - hf_logits(hf, tokens)).abs().max() <= 1e-5
    again = open_checkpoint(tmp_path / "out").reader.read_all()
    assert all(torch.equal(again[k], weights[k]) for k in weights)


SPLIT = {
    "owner": ["embed", "layers.0.router", "layers.0.shared_experts", "layers.0.experts.0-1", "final_norm", "lm_head"],
    "heads-a": ["layers.0.attention.heads.0-1"],
    "heads-b": ["layers.0.attention.heads.2-3"],
    "experts": ["layers.0.experts.2-3"],
    "back": ["layers.1"],
}


def split_for(kind: str) -> dict[str, list[str]]:
    if kind in SHARED:
        return SPLIT
    return {org: [h for h in holds if "shared" not in h] for org, holds in SPLIT.items()}


@pytest.mark.parametrize("kind", list(MODELS))
def test_split_training_from_a_hf_checkpoint_exports_what_transformers_loads(tmp_path, kind, tokens):
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "hf-model")
    plan = load_plan(write_plan(tmp_path, "hf-model", split_for(kind)))
    start = initial_weights(plan)
    assert all(torch.equal(start[k], v) for k, v in open_checkpoint(tmp_path / "hf-model").reader.read_all().items())

    federation = InProcessFederation(plan, start)
    for step in range(plan.training.steps_per_round):
        federation.train_step(step, synthetic_batches(plan, step))
    trained = federation.reassembled()
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-3  # it did train

    save_hf(plan.model, trained, tmp_path / "exported")
    back = getattr(transformers, MODELS[kind][0]).from_pretrained(tmp_path / "exported").eval()
    diff = (hf_logits(back, tokens) - fedsplit_logits(plan.model, trained, tokens)).abs().max()
    print(f"{kind}: after split training, max |transformers(export) - fedsplit| logits = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("kind", ["mixtral", "qwen2-moe"])
def test_split_training_of_an_imported_model_equals_monolithic(tmp_path, kind):
    # q/k/v biases cut with their head groups, the shared-expert gate served with its experts,
    # the sliding window in every head group. Head groups add up partial o_proj outputs, so the
    # gradients equal the monolith's to rounding, and AdamW's first steps turn rounding in
    # near-zero gradients into update differences proportional to the learning rate (measured
    # for qwen2-moe: 1.6e-3 * lr, the same after 4 and 10 steps): a fine-tuning rate keeps that
    # well inside the bound.
    hf_model(kind).save_pretrained(tmp_path / "hf-model")
    result = verify(load_plan(write_plan(tmp_path, "hf-model", split_for(kind), lr=1e-3)), steps=4)
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


def test_an_organisation_reads_only_its_slices_of_the_checkpoint(tmp_path):
    hf_model("qwen2-moe").save_pretrained(tmp_path / "hf-model")
    plan = load_plan(write_plan(tmp_path, "hf-model", SPLIT))
    full = initial_weights(plan)
    for org in plan.orgs:
        mine = plan.checkpoint_slices(org)
        expected = select(full, plan.slices_of(org))
        assert mine.keys() == expected.keys() and all(torch.equal(mine[k], expected[k]) for k in mine)
    heads = plan.checkpoint_slices("heads-b")
    assert heads["layers.0.attention.q_proj.bias[16:32]"].shape == (16,)
    assert heads["layers.0.attention.o_proj.weight[:, 16:32]"].shape == (32, 16)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize(
    "kind, changes, field",
    [
        ("qwen2-moe", {"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ("qwen2-moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("qwen2-moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        (
            "qwen2-moe",
            {"use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]},
            "layer_types",
        ),
        (
            "mixtral",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_parameters.rope_type",
        ),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
        ("mixtral", {"attention_dropout": 0.1}, "attention_dropout"),
    ],
)
def test_unsupported_config_fields_are_refused_by_name(tmp_path, kind, changes, field):
    hf_model(kind).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint(tmp_path)
    assert exc.value.field == field and f"field '{field}'" in str(exc.value)


def test_a_tensor_fedsplit_has_no_place_for_is_refused_by_name(tmp_path):
    hf_model("mixtral").save_pretrained(tmp_path)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no place for: model\.layers\.0\.self_attn\.o_proj\.bias"):
        open_checkpoint(tmp_path)


def test_a_checkpoint_whose_shapes_do_not_match_its_config_is_refused_by_tensor_when_opened(tmp_path):
    hf_model("qwen2-moe").save_pretrained(tmp_path / "hf-model")
    _edit_config(tmp_path / "hf-model", moe_intermediate_size=32)  # the stored experts are 16 wide
    with pytest.raises(PlanError) as exc:
        load_plan(write_plan(tmp_path, "hf-model", SPLIT))
    text = str(exc.value)
    assert "model.safetensors" in text and "mlp.experts." in text and "has shape" in text, text


def test_a_plan_naming_an_unsupported_checkpoint_says_which_field(tmp_path):
    hf_model("qwen2-moe").save_pretrained(tmp_path / "hf-model")
    _edit_config(tmp_path / "hf-model", mlp_only_layers=[0])
    with pytest.raises(PlanError) as exc:
        load_plan(write_plan(tmp_path, "hf-model", SPLIT))
    text = str(exc.value)
    assert "field 'model'" in text and "config.json" in text and "field 'mlp_only_layers'" in text


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "models").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_model_config_exports_what_transformers_computes(tmp_path, config, tokens):
    cfg = ModelConfig.from_yaml(config)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    save_hf(cfg, model.state_dict(), tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        diff = (hf_logits(back, tokens) - model(tokens)[0]).abs().max()
    print(f"{config.stem} as {type(back).__name__}: max |transformers - fedsplit| logits = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"qkv_bias": True}, "qkv_bias"),
        ({"normalize_top_k": False}, "normalize_top_k"),
        ({"sliding_window": 8}, "sliding_window"),
        ({"router": RouterConfig(kind="hierarchical", groups=4)}, "router.kind"),
        ({"router": RouterConfig(capacity_factor=1.0)}, "router.capacity_factor"),
    ],
)
def test_export_refuses_what_no_supported_architecture_computes(tmp_path, changes, field):
    cfg = ModelConfig.from_yaml(ROOT / "configs" / "models" / "tiny.yaml").model_copy(update=changes)
    with pytest.raises(CheckpointError) as exc:
        save_hf(cfg, MoETransformer(cfg).state_dict(), tmp_path)
    assert exc.value.field == field


@pytest.mark.parametrize(
    "router",
    [
        {"top_k": 8, "router": {"kind": "soft"}},
        {"top_k": 1, "router": {"kind": "hard"}},
        {"top_k": 1, "router": {"kind": "hard"}, "shared_expert_gate": True, "normalize_top_k": False},
    ],
    ids=["soft", "hard", "hard-as-qwen2-moe"],
)
def test_a_soft_or_hard_router_exports_the_model_that_computes_it_at_inference(tmp_path, router, tokens):
    # Soft is top-k over every expert; hard evaluates with the argmax, i.e. top-1 of weight one.
    tiny = ModelConfig.from_yaml(ROOT / "configs" / "models" / "tiny.yaml")
    cfg = ModelConfig.model_validate({**tiny.model_dump(), **router})
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    save_hf(cfg, model.state_dict(), tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf_logits(back, tokens) - model(tokens)[0]).abs().max() <= 1e-5


def test_cli_imports_and_exports_hf(tmp_path, tokens, capsys):
    hf = hf_model("qwen2-moe")
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.yaml").exists()
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "back"), "--format", "hf"]) == 0
    back = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (hf_logits(back, tokens) - hf_logits(hf, tokens)).abs().max() <= 1e-5
    assert main(["import", str(tmp_path / "ours"), str(tmp_path / "again")]) == 2
    assert "fedsplit model directory already" in capsys.readouterr().err


def test_a_lora_fine_tune_of_a_hf_checkpoint_exports_merged_and_loads_in_transformers(tmp_path, tokens):
    """LoRA on the attention (its head groups on two organisations, q/k/v biases included) and
    experts of a Qwen2-MoE checkpoint, split across the five organisations of SPLIT; the merged
    export computes in transformers what the fine-tuned model computes in fedsplit."""
    hf = hf_model("qwen2-moe")
    hf.save_pretrained(tmp_path / "hf-model")
    path = write_plan(tmp_path, "hf-model", SPLIT)
    document = {**json.loads(path.read_text()), "finetune": {"rank": 2, "alpha": 4.0}}
    path.write_text(json.dumps(document))
    plan = load_plan(path)
    start = initial_weights(plan)
    federation = InProcessFederation(plan, start)
    for step in range(plan.training.steps_per_round):
        federation.train_step(step, synthetic_batches(plan, step))
    trained = federation.reassembled()
    base = open_checkpoint(tmp_path / "hf-model").reader.read_all()
    assert all(torch.equal(trained[k], v) for k, v in base.items())  # the base never moved
    with pytest.raises(CheckpointError, match="--merge"):
        save_hf(plan.model, trained, tmp_path / "unmerged")
    cfg, merged = merge_adapters(plan.model, trained)
    save_hf(cfg, merged, tmp_path / "merged")
    back = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    diff = (hf_logits(back, tokens) - fedsplit_logits(plan.model, trained, tokens)).abs().max()
    assert diff <= 1e-5
    assert (hf_logits(back, tokens) - hf_logits(hf, tokens)).abs().max() > 1e-4  # the fine-tune changed it
