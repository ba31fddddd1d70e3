"""A small causal LM that half knows multi-step arithmetic: SPEAR's offline base.

`fedmm pretrain-lm --out DIR` trains a GPT-2 (character tokenizer) on generated worked solutions
(fedmm.data.arithmetic, a stream no client draws from) and stops as soon as its greedy first-try
accuracy on held-out problems reaches `target_accuracy`, so the base knows the format and some of the
sums but leaves room to learn. A fraction of the examples are revisions (the task, a wrong previous
answer, the feedback with its hint, the task again, then the solution), so the base can use a hint as
an instruction-tuned model would. Saved with `save_pretrained` (model and tokenizer) plus `card.json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from fedmm.core.schema import ConfigError
from fedmm.data.arithmetic import Problem, chain_steps, is_correct, make_problems, revision_prompt
from fedmm.models.causal_lm import char_tokenizer, encode_pairs, generate, tiny_lm_config

PRETRAIN_SEED_OFFSET = 1_000_003  # the corpus's problems come from a seed no client uses


@dataclass
class LMPretrainConfig:
    seed: int = 0
    max_steps: int = 4000
    target_accuracy: float = 0.3  # stop once greedy held-out first-try accuracy reaches this
    eval_every: int = 100
    eval_problems: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    corpus_problems: int = 40000
    revision_fraction: float = 0.3
    layers: int = 3
    width: int = 128
    heads: int = 4
    max_new_tokens: int = 48


def _wrong_attempt(problem: Problem, rng: np.random.Generator) -> str:
    """A plausible wrong completion: one step's result off by a little and the rest carried on from
    it, so a revision must follow the hint (the right steps but the last) and redo the last step."""
    steps = problem.steps()
    slip = int(rng.integers(len(steps)))
    expression, result = steps[slip].rsplit("=", 1)
    value = int(result) + int(rng.choice([-10, -2, -1, 1, 2, 10]))
    lines = [*steps[:slip], f"{expression}={value}",
             *chain_steps(value, problem.kind[slip + 1:], problem.numbers[slip + 2:])]
    return "\n".join([*lines, f"A: {value if not lines[slip + 1:] else lines[-1].rsplit('=', 1)[1]}"])


def _example(problem: Problem, rng: np.random.Generator, revision: bool) -> tuple[str, str]:
    if not revision:
        return problem.prompt, problem.solution
    return revision_prompt(problem, _wrong_attempt(problem, rng)), problem.solution


def first_tries(model, tokenizer, problems: list[Problem], max_new_tokens: int = 48) -> tuple[float, list[str]]:
    """Greedy first-try accuracy on `problems`, and the completions it was read from."""
    completions = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    return float(np.mean([is_correct(p, c) for p, c in zip(problems, completions)])), completions


def validate_lm_pretrain(cfg: LMPretrainConfig) -> None:
    if not 0 < cfg.target_accuracy < 1:
        raise ConfigError(f"pretrain-lm config key 'target_accuracy' must be in (0, 1), got {cfg.target_accuracy}")
    for key in ("max_steps", "eval_every", "eval_problems", "batch_size", "corpus_problems", "layers", "width",
                "heads", "max_new_tokens", "warmup_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"pretrain-lm config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0 or not 0 <= cfg.revision_fraction <= 1 or cfg.width % cfg.heads:
        raise ConfigError("pretrain-lm config keys: lr must be > 0, revision_fraction in [0, 1], width divisible "
                          f"by heads; got lr={cfg.lr}, revision_fraction={cfg.revision_fraction}, width={cfg.width}, "
                          f"heads={cfg.heads}")


def pretrain_lm(cfg: LMPretrainConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train the base, save it (model, tokenizer, card.json) in `out` and return its card."""
    out = Path(out)
    validate_lm_pretrain(cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokenizer = char_tokenizer()
    model = GPT2LMHeadModel(tiny_lm_config(len(tokenizer), cfg.layers, cfg.width, cfg.heads))
    corpus = make_problems(cfg.corpus_problems, cfg.seed + PRETRAIN_SEED_OFFSET)
    held_out = make_problems(cfg.eval_problems, cfg.seed + PRETRAIN_SEED_OFFSET, split=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    start, history, step, evaluated = time.monotonic(), [], 0, -1
    while step < cfg.max_steps:
        step += 1
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        picks = rng.integers(len(corpus), size=cfg.batch_size)
        pairs = [_example(corpus[i], rng, rng.random() < cfg.revision_fraction) for i in picks]
        ids, mask, labels = encode_pairs(tokenizer, pairs)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % cfg.eval_every == 0:
            accuracy, first = first_tries(model, tokenizer, held_out, cfg.max_new_tokens)
            evaluated = step
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy})
            if progress:
                print(f"step {step}: loss {loss.item():.3f}, held-out first-try accuracy {accuracy:.3f}", flush=True)
            if accuracy >= cfg.target_accuracy:
                break
    # What a client's revision sees: its own wrong first try, the feedback with its hint, the task again.
    if evaluated != step:  # the loop ended between evaluations: measure the final model
        accuracy, first = first_tries(model, tokenizer, held_out, cfg.max_new_tokens)
    failed = [(p, c) for p, c in zip(held_out, first) if not is_correct(p, c)]
    revised = generate(model, tokenizer, [revision_prompt(p, c) for p, c in failed], cfg.max_new_tokens)
    card = {"config": asdict(cfg), "steps": step, "first_try_accuracy": accuracy,
            "revision_success": float(np.mean([is_correct(p, c) for (p, _), c in zip(failed, revised)]))
            if failed else None,
            "history": history, "seconds": round(time.monotonic() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
