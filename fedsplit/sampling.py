"""``fedsplit generate``: sample text from a reassembled checkpoint.

The checkpoint is a run directory (its last complete round), a ``checkpoints/round-NNNN``
directory, or a ``model.safetensors`` (also one written by ``fedsplit export``). The model
configuration comes from the run's ``plan.json`` (found beside or above the checkpoint, or given),
the tokenizer from the run's ``tokenizer.json`` (UTF-8 bytes when the run has none). Sampling
recomputes the whole window for each new token: no KV cache, which is fine at these model sizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .data.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer
from .federation.checkpoint import find_checkpoint, model_weights
from .federation.export import withdrawn_experts
from .federation.rundir import PLAN_FILE, find_run_plan
from .interop import CheckpointError
from .interop.withdraw import without_experts
from .model import MoETransformer
from .plan import resolved_model


class GenerateError(ValueError):
    """A checkpoint, plan or tokenizer that cannot be used; the message says what to give instead."""


@dataclass
class LoadedModel:
    model: MoETransformer
    tokenizer: Tokenizer
    context: int  # tokens the model sees at once: the run's training sequence length
    description: str  # what was loaded, for the user


def load_model(
    source: str | Path,
    *,
    plan_file: str | Path | None = None,
    tokenizer_file: str | Path | None = None,
    device: str = "cpu",
    without: Sequence[str] = (),
) -> LoadedModel:
    """The checkpoint at ``source`` in a monolithic model, with its tokenizer; a run's checkpoint
    without the owned experts of ``without`` and of the organisations its plan withdraws."""
    source = Path(source)
    ckpt = None
    if source.is_file():
        weights, description = load_file(source), str(source)
    else:
        ckpt = find_checkpoint(source)
        if ckpt is None:
            raise GenerateError(
                f"no complete checkpoint in {source}: give a run directory, a checkpoints/round-NNNN "
                f"directory or a model.safetensors"
            )
        weights, description = ckpt.weights, f"round {ckpt.round} ({ckpt.path})"
    plan_path = Path(plan_file) if plan_file else find_run_plan(source)
    if plan_path is None:
        raise GenerateError(
            f"no {PLAN_FILE} beside or above {source}: give the run's plan with --plan RUN_DIR/{PLAN_FILE}"
        )
    try:
        cfg = resolved_model(plan_path)
    except (OSError, ValueError, KeyError, TypeError, CheckpointError) as e:
        raise GenerateError(f"{plan_path} is not a run's {PLAN_FILE} with a model configuration ({e})") from None
    if ckpt is not None:
        try:
            weights = model_weights(ckpt, cfg)
            orgs, removed = withdrawn_experts(plan_path, without)
            if removed:
                cfg, weights = without_experts(cfg, weights, removed)
                description += f", without the experts of {', '.join(orgs)}"
        except CheckpointError as e:
            raise GenerateError(f"cannot load {ckpt.path}: {e}") from None
    elif without:
        raise GenerateError(
            f"--without applies to a run's checkpoint: give the run directory or its checkpoints/round-NNNN "
            f"directory, not the file {source}"
        )
    tokenizer_path = Path(tokenizer_file) if tokenizer_file else plan_path.parent / TOKENIZER_FILE
    try:
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path.exists() or tokenizer_file else ByteTokenizer()
    except TokenizerError as e:
        raise GenerateError(str(e)) from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GenerateError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size {cfg.vocab_size}: "
            f"give the tokenizer the run trained with (--tokenizer)"
        )
    model = MoETransformer(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise GenerateError(f"the checkpoint {source} does not fit the model of {plan_path}: {e}") from None
    context = int((json.loads(plan_path.read_text(encoding="utf-8")).get("training") or {}).get("seq_len", 256))
    return LoadedModel(model.to(device).eval(), tokenizer, context, description)


@torch.no_grad()
def sample(
    model: MoETransformer,
    prompt: Sequence[int],
    max_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    context: int = 256,
    vocab_size: int | None = None,
) -> list[int]:
    """``max_tokens`` new token ids after ``prompt``: temperature 0 is greedy, otherwise softmax
    sampling at ``temperature`` over the ``top_k`` most likely tokens (all when None), then over
    the smallest set of those whose probabilities add up to ``top_p`` (nucleus sampling; 1: all),
    drawn from a generator seeded with ``seed``. Only ids below ``vocab_size`` (the tokenizer's)
    are drawn; the model sees the last ``context`` tokens."""
    if not prompt:
        raise ValueError("the prompt encodes to no tokens: give some text")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(max_tokens):
        logits, _ = model(torch.tensor([ids[-context:]], device=device))
        logits = logits[0, -1].float().cpu()
        if vocab_size is not None:
            logits[vocab_size:] = float("-inf")
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < logits.numel():
            kth = logits.topk(top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1:
            ranked, order = probs.sort(descending=True)
            outside = ranked.cumsum(0) - ranked >= top_p  # the tokens after the nucleus is full
            probs[order[outside]] = 0.0
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids[len(prompt) :]


def generate_text(
    loaded: LoadedModel,
    prompt: str,
    max_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """``prompt`` followed by ``max_tokens`` sampled tokens, decoded (bytes that are not UTF-8,
    which a byte-level model can sample, decode to U+FFFD)."""
    ids = loaded.tokenizer.encode(prompt)
    new = sample(
        loaded.model,
        ids,
        max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        context=loaded.context,
        vocab_size=loaded.tokenizer.vocab_size,
    )
    return loaded.tokenizer.decode(ids + new)
