#!/usr/bin/env python
"""Load the exported adapters with peft onto transformers' model of the base, check that they
compute what fedsplit's fine-tuned model of the run computes, and generate text with them.

    .venv/bin/python examples/lora_finetune/generate.py RUN_DIR ADAPTER_DIR [PROMPT]
"""

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedsplit.sampling import load_model


def main(run: Path, adapter: Path, prompt: str) -> int:
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours = load_model(run).model.eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((tuned(tokens).logits - ours(tokens)[0]).abs().max())
    print(f"max |peft(base + adapters) - fedsplit(run)| logits = {diff:.2e}")
    torch.manual_seed(0)
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        out = tuned.generate(
            input_ids=ids, max_new_tokens=120, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0
        )
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print("".join(c if c.isprintable() or c == "\n" else "?" for c in text))
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ROMEO:"))
