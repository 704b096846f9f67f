#!/usr/bin/env python
"""Load the exported checkpoint with transformers and check it computes what fedsplit's
reassembled model of the run computes, and that the round changed the original model.

    .venv/bin/python examples/hf_finetune/load_back.py RUN_DIR EXPORTED_DIR [ORIGINAL_HF_DIR]
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fedsplit.federation.checkpoint import find_checkpoint
from fedsplit.model import ModelConfig, MoETransformer


def main(run: Path, exported: Path, original: Path | None) -> int:
    ckpt = find_checkpoint(run)
    ours = MoETransformer(ModelConfig.model_validate(json.loads((run / "plan.json").read_text())["model"]))
    ours.load_state_dict(ckpt.weights, strict=True)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours.eval()(tokens)[0]
        logits = AutoModelForCausalLM.from_pretrained(exported).eval()(tokens).logits
        diff = float((logits - reference).abs().max())
        print(f"round {ckpt.round}: max |transformers(exported) - fedsplit(reassembled)| logits = {diff:.2e}")
        if original is not None:
            moved = float((AutoModelForCausalLM.from_pretrained(original).eval()(tokens).logits - logits).abs().max())
            print(f"fine-tuning moved the logits by up to {moved:.2e} from the original checkpoint")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None))
