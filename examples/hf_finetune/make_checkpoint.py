#!/usr/bin/env python
"""Write a small random Qwen2-MoE checkpoint with transformers, as an organisation would hold a
downloaded one: config.json and model.safetensors.

    .venv/bin/python examples/hf_finetune/make_checkpoint.py examples/hf_finetune/hf-model

Byte-level vocabulary (256 tokens, fedsplit's default tokenizer), 3 layers, 8 experts (top-2),
a gated shared expert and q/k/v biases: every Qwen2-MoE feature fedsplit maps.
"""

import sys

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM


def main(out: str) -> None:
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        intermediate_size=128,
        norm_topk_prob=False,
        rms_norm_eps=1e-6,
    )
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # transformers starts biases at zero; give them values so that their mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    print(f"wrote {out}: Qwen2MoeForCausalLM, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hf-model")
