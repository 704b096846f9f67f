#!/usr/bin/env python
"""Write a small random Qwen2-MoE checkpoint with transformers' own initialisation, standing in
for a downloaded one: config.json and model.safetensors, nothing fetched.

    .venv/bin/python examples/lora_finetune/make_base.py examples/lora_finetune/base

Byte-level vocabulary (256 tokens, fedsplit's default tokenizer), 4 layers, 8 heads over 4 KV
heads, 8 experts (top-2), a gated shared expert and q/k/v biases.
"""

import sys

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


def main(out: str) -> None:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        intermediate_size=256,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
    )
    model = Qwen2MoeForCausalLM(config)
    model.save_pretrained(out)
    print(f"wrote {out}: Qwen2MoeForCausalLM, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "base")
