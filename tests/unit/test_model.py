"""The MoE transformer's maths, checked against direct (slow, obvious) formulas."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from fedsplit.model import Attention, ModelConfig, MoETransformer, parameter_count, rope_tables
from fedsplit.model.moe import MoE, load_balancing_loss

from ..conftest import MODELS


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.from_yaml(MODELS / "tiny.yaml")


def test_expert_dispatch_equals_dense_mixture_of_all_experts(cfg):
    torch.manual_seed(0)
    moe = MoE(cfg, 0)
    x = torch.randn(2, 5, cfg.hidden_size)
    out, _ = moe(x)
    flat = x.reshape(-1, cfg.hidden_size)
    probs = torch.softmax(moe.router(flat), dim=-1)
    top = probs.topk(cfg.top_k, dim=-1)
    gate = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    dense = sum(gate[:, e, None] * moe.experts[e](flat) for e in range(cfg.num_experts)) + moe.shared_experts(flat)
    torch.testing.assert_close(out.reshape(-1, cfg.hidden_size), dense, atol=1e-6, rtol=1e-5)


def test_load_balancing_loss_is_top_k_when_balanced_and_larger_when_collapsed(cfg):
    n, e, k = 64, cfg.num_experts, cfg.top_k
    uniform = torch.full((n, e), 1.0 / e)
    balanced = torch.stack([torch.arange(k) + (i * k) % e for i in range(n)])
    assert float(load_balancing_loss(uniform, balanced, e)) == pytest.approx(k)
    collapsed_probs = torch.zeros(n, e)
    collapsed_probs[:, :k] = 1.0 / k
    collapsed = torch.arange(k).expand(n, k)
    assert float(load_balancing_loss(collapsed_probs, collapsed, e)) == pytest.approx(e)


def test_attention_is_causal(cfg):
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.vocab_size
    a, _ = model(tokens)
    b, _ = model(changed)
    torch.testing.assert_close(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_head_group_partials_sum_to_full_attention(cfg):
    torch.manual_seed(0)
    full = Attention(cfg)
    per, hd = cfg.heads_per_kv_head, cfg.head_dim
    x = torch.randn(2, 7, cfg.hidden_size)
    rope = rope_tables(cfg, 7)
    total = 0
    for g0, g1 in [(0, 1), (1, 3), (3, 4)]:
        part = Attention(cfg, (g1 - g0) * per, g1 - g0)
        q, kv = slice(g0 * per * hd, g1 * per * hd), slice(g0 * hd, g1 * hd)
        with torch.no_grad():
            part.q_proj.weight.copy_(full.q_proj.weight[q])
            part.k_proj.weight.copy_(full.k_proj.weight[kv])
            part.v_proj.weight.copy_(full.v_proj.weight[kv])
            part.o_proj.weight.copy_(full.o_proj.weight[:, q])
        total = total + part(x, rope)
    torch.testing.assert_close(total, full(x, rope), atol=1e-6, rtol=1e-5)


def test_grouped_query_attention_matches_repeated_kv_heads(cfg):
    torch.manual_seed(0)
    attn = Attention(cfg)
    x = torch.randn(1, 6, cfg.hidden_size)
    cos, sin = rope_tables(cfg, 6)
    q = attn.q_proj(x).view(1, 6, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, 6, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(1, 6, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    from fedsplit.model.moe import apply_rope

    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    heads = []
    for h in range(cfg.num_heads):
        g = h // cfg.heads_per_kv_head
        scores = (q[:, h] @ k[:, g].transpose(-1, -2)) / cfg.head_dim**0.5
        scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        heads.append(F.softmax(scores, -1) @ v[:, g])
    expected = attn.o_proj(torch.stack(heads, 1).transpose(1, 2).reshape(1, 6, -1))
    torch.testing.assert_close(attn(x, (cos, sin)), expected, atol=1e-6, rtol=1e-5)


def test_shipped_model_sizes():
    sizes = {}
    for name in ("tiny", "small", "base"):
        with torch.device("meta"):
            sizes[name] = parameter_count(MoETransformer(ModelConfig.from_yaml(MODELS / f"{name}.yaml")))
    assert sizes["tiny"] < 1_000_000
    assert 2_000_000 < sizes["small"] < 10_000_000
    assert sizes["base"] > 100_000_000


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_heads": 6, "num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"top_k": 9}, "exceeds num_experts"),
        ({"hidden_sise": 3}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_model_config_is_rejected_with_the_reason(cfg, change, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig.model_validate(cfg.model_dump() | change)
