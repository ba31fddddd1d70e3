"""Online fine-tuning of a causal LM from feedback on its own answers: SPEAR and its baselines.

Each round a client draws `feedback.prompts_per_round` prompts from its partition (its arrivals) and
answers each once by sampling. A verifier says correct or incorrect; no training step ever sees a
reference answer. Under `spear`, a wrong answer is revised up to `max_revisions` times, each revision
prompted with the previous answer and feedback with a hint; the first correct revision is a win stored
with the ORIGINAL prompt, the first wrong answer a lose (confidence 1.0 if a revision fixed it, 0.5 if
none did). The loss is lambda_win * token-mean MLE on wins + lambda_lose * confidence-weighted
unlikelihood on N tokens of each lose's working (from its slip, or its last ones: `ul_window`), where
the model gives the token more than `ul_threshold` probability, never on EOS or the answer line.
Baselines by `train.objective`: `feedback_sft` (the same wins, no unlikelihood), `rejection_sft`
(first-try wins only, no revisions), `grpo` (a group of samples per prompt, 0/1 reward, clipped policy
gradient with a KL to the received model). A client with no win does not train; the server weighs
replies by their wins.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedmm.core import protocol
from fedmm.core.schema import FeedbackConfig, RunConfig, TrainConfig
from fedmm.data.arithmetic import (ANSWER_MARKER, Problem, client_problems, hinted_working, is_correct, parse_answer,
                                   revision_prompt)
from fedmm.models.causal_lm import LanguageModel, encode_pairs, sample
from fedmm.models.model import client_components, component_vectors, load_component_vectors, module_bank
from fedmm.training.local import TaskScore, autocast_for, lr_at, resolve_device

@dataclass
class Collected:
    """What a round's arrivals gave: training pairs and the counts behind them."""

    wins: list[tuple[str, str]] = field(default_factory=list)  # (original prompt, correct completion)
    # (prompt, wrong completion, confidence, the revision that fixed it or "", the working the hint revealed)
    loses: list[tuple[str, str, float, str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def cut_after_answer(completion: str) -> str:
    """The completion up to the end of its first answer line: what the verifier read, and what a
    win teaches (the EOS comes right after it)."""
    marker = completion.find(ANSWER_MARKER)
    if marker < 0:
        return completion.strip()
    end = completion.find("\n", marker)
    return (completion if end < 0 else completion[:end]).strip()


def encodable(model: LanguageModel, prompts: Sequence[str], max_new_tokens: int) -> list[bool]:
    """Whether the tokenizer encodes each prompt without unknown tokens, and prompt + completion fit
    the model's positions (a prompt that fails either is recorded and skipped, not answered)."""
    tokenizer, room = model.tokenizer, model.max_length() - max_new_tokens - 1  # and the EOS a win is taught
    unk = tokenizer.unk_token_id
    ok = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ok.append(bool(ids) and len(ids) <= room and (unk is None or unk not in ids))
    return ok


def _answerable(model: LanguageModel, problems: Sequence[Problem], cfg: FeedbackConfig,
                counts: Counter) -> list[Problem]:
    """The arrivals whose prompts the model can answer; the others counted `unencodable`, the rest `prompts`."""
    usable = encodable(model, [p.prompt for p in problems], cfg.max_new_tokens)
    counts["unencodable"] += usable.count(False)
    problems = [p for p, ok in zip(problems, usable) if ok]
    counts["prompts"] = len(problems)
    return problems


def _attempts(model: LanguageModel, prompts: list[str], cfg: FeedbackConfig, seed: int, counts: Counter,
              precision: str = "auto") -> list[str]:
    """One sampled answer per prompt (bf16 on a GPU that has it, as `train.precision` says), cut after its
    answer line; empty and over-long ones counted."""
    out = []
    with autocast_for(next(model.parameters()).device, precision):
        answers = sample(model.lm, model.tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed)
    for text, ended in answers:
        answer = cut_after_answer(text)
        if not answer:
            counts["empty"] += 1
        elif parse_answer(answer) is None and not ended:
            counts["over-long"] += 1  # cut at max_new_tokens before any answer line
        out.append(answer)
    return out


def collect(model: LanguageModel, problems: Sequence[Problem], objective: str, cfg: FeedbackConfig,
            seed: int, precision: str = "auto") -> Collected:
    """Answer each arrival (and, under spear / feedback_sft, revise wrong answers from feedback)."""
    got = Collected()
    problems = _answerable(model, problems, cfg, got.counts)
    first = _attempts(model, [p.prompt for p in problems], cfg, seed, got.counts, precision)
    wrong = []
    for problem, answer in zip(problems, first):
        if is_correct(problem, answer):
            got.wins.append((problem.prompt, answer))
        else:
            wrong.append((problem, answer))
    got.counts["first-correct"], got.counts["wrong"] = len(got.wins), len(wrong)
    revisions = cfg.max_revisions if objective in ("spear", "feedback_sft") else 0
    pending = list(wrong)  # (problem, its latest wrong answer)
    fixed: dict[int, str] = {}  # id(problem) -> the revision that fixed it
    for attempt in range(1, revisions + 1):
        if not pending:
            break
        prompts = [revision_prompt(p, latest) for p, latest in pending]
        ok = encodable(model, prompts, cfg.max_new_tokens)
        got.counts["unencodable"] += ok.count(False)
        answers = iter(_attempts(model, [q for q, good in zip(prompts, ok) if good], cfg, seed + attempt, got.counts,
                                 precision))
        still = []
        for (problem, latest), good in zip(pending, ok):
            answer = next(answers) if good else latest
            if good and is_correct(problem, answer):
                got.wins.append((problem.prompt, answer))  # the original prompt: no feedback at test time
                fixed[id(problem)] = answer
            else:
                still.append((problem, answer))
        pending = still
    got.counts["revised-correct"] = len(fixed)
    for problem, answer in wrong:
        if answer:  # an empty answer has no token to unlearn
            fix = fixed.get(id(problem), "")
            got.loses.append((problem.prompt, answer, 1.0 if fix else 0.5, fix, hinted_working(problem)))
    return got


def capped_loses(loses: list[tuple], wins: int, ratio: float, rng: np.random.Generator) -> list[tuple]:
    """At most ratio x wins loses, the surest (fixed later, confidence 1.0) first, the rest drawn."""
    cap = int(math.floor(ratio * wins))
    order = sorted(range(len(loses)), key=lambda i: (-loses[i][2], rng.random()))
    return [loses[i] for i in order[:cap]]


def _slip(completion: str, pair: tuple, window: str) -> int | None:
    """Where a lose departs from a correct working, or None where that is not known: from the revision
    that fixed it (`divergence`, `feedback`), else from the working the hint revealed (`feedback`; not
    known if the lose follows all of it, so its slip came in the unrevealed last line). Spaces are
    layout, skipped on both sides: `37 + 48 = 85` has not slipped from `37+48=85`."""
    fix = pair[3] if len(pair) > 3 else ""
    reference = fix or (pair[4] if window == "feedback" and len(pair) > 4 else "")
    if not reference:
        return None
    at = [i for i, ch in enumerate(completion) if ch not in " \t"]  # the completion's characters that count
    wanted = [ch for ch in reference if ch not in " \t"]
    departs = next((k for k, (i, y) in enumerate(zip(at, wanted)) if completion[i] != y), None)
    if departs is None:
        if not fix:
            return None
        departs = min(len(at), len(wanted))  # one ends where the other goes on
    return at[departs] if departs < len(at) else len(completion)


def _completion_mask(model: LanguageModel, pairs: Sequence[tuple], labels: torch.Tensor, tokens: int,
                     window: str = "last") -> torch.Tensor:
    """Per lose, the label positions unlikelihood may push down: `tokens` (0: all) tokens of the working,
    the last ones (window `last`) or those from its slip on (`divergence`, `feedback`: see `_slip`; a lose
    whose slip is not known gets none). Never EOS, never the answer line (its marker, and its value, which
    restates the working's last result: pushing it down teaches the model not to copy, not to compute),
    never a token of whitespace only (layout)."""
    mask = (labels != -100) & (labels != model.tokenizer.eos_token_id)
    for row, pair in enumerate(pairs):
        completion = pair[1]
        positions = torch.nonzero(mask[row]).flatten()
        start = completion.find(ANSWER_MARKER)
        end = len(completion) if start < 0 or completion.find("\n", start) < 0 else completion.find("\n", start)
        departs = _slip(completion, pair, window) if window != "last" else None
        spans = model.tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for index, (a, b) in enumerate(spans[: len(positions)]):
            on_answer_line = start >= 0 and a < end and b > start
            before_slip = window != "last" and (departs is None or b <= departs)
            if on_answer_line or before_slip or not completion[a:b].strip():
                mask[row, positions[index]] = False
        kept = torch.nonzero(mask[row]).flatten()
        if tokens and len(kept) > tokens:
            drop = kept[: len(kept) - tokens] if window == "last" else kept[tokens:]
            mask[row, drop] = False
    return mask


def _token_logprobs(model: LanguageModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) at every position t >= 1, aligned with the labels (position 0: 0)."""
    logits = model.lm(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def mle_loss(model: LanguageModel, wins: Sequence[tuple[str, str]], device: torch.device) -> torch.Tensor:
    """Token-mean negative log-likelihood of the wins' completions (and EOS) after their prompts."""
    ids, mask, labels = (t.to(device) for t in encode_pairs(model.tokenizer, wins))
    logp = _token_logprobs(model, ids, mask)
    targets = labels != -100
    return -(logp * targets).sum() / targets.sum()


def unlikelihood_loss(model: LanguageModel, loses: Sequence[tuple], cfg: FeedbackConfig,
                      device: torch.device) -> torch.Tensor:
    """Confidence-weighted mean over loses of the mean over their masked tokens of
    -log(1 - p(token)) where p(token) > ul_threshold (0 elsewhere)."""
    ids, mask, labels = (t.to(device) for t in encode_pairs(model.tokenizer, [(lose[0], lose[1]) for lose in loses]))
    where = _completion_mask(model, loses, labels, cfg.ul_tokens, cfg.ul_window).to(device)
    p = _token_logprobs(model, ids, mask).exp()
    gated = where & (p > cfg.ul_threshold)
    terms = -torch.log1p(-p.clamp(max=1 - 1e-6)) * gated
    per_lose = terms.sum(1) / where.sum(1).clamp_min(1)
    confidence = torch.tensor([lose[2] for lose in loses], device=device)
    return (confidence * per_lose).mean()


@dataclass
class LocalResult:
    steps: int
    losses: dict[str, float]  # mean over steps of each loss term
    nonfinite: int  # steps skipped because the loss was NaN or Inf


def _step(model: LanguageModel, optimizer: torch.optim.Optimizer, loss: torch.Tensor, cfg: TrainConfig) -> bool:
    """One optimizer step, or none when the loss is not finite (the model is left as it was)."""
    if not torch.isfinite(loss):
        optimizer.zero_grad()
        return False
    optimizer.zero_grad()
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip if cfg.grad_clip else float("inf"))
    if not torch.isfinite(norm):  # a finite loss can still overflow its gradient
        optimizer.zero_grad()
        return False
    optimizer.step()
    return True


def _train_steps(model: LanguageModel, train: TrainConfig, lr: float,
                 step_loss: Callable[[], tuple[torch.Tensor, dict[str, float]]]) -> LocalResult:
    """`train.local_steps` steps of `step_loss()` (the loss to minimise and the terms to report) with a
    fresh AdamW, as SPEAR's reference: no moment carries over from another model. Reported terms are
    averaged over the steps, skipped ones included."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=train.weight_decay)
    sums: Counter = Counter()
    done = skipped = 0
    model.train()
    for _ in range(train.local_steps):
        loss, terms = step_loss()
        sums.update(terms)
        if _step(model, optimizer, loss, train):
            done += 1
        else:
            skipped += 1
    return LocalResult(done, {k: v / max(train.local_steps, 1) for k, v in sums.items()}, skipped)


def train_on_pairs(model: LanguageModel, collected: Collected, cfg: FeedbackConfig, train: TrainConfig, lr: float,
                   seed: int, device: torch.device) -> LocalResult:
    """`train.local_steps` steps on batches of wins (MLE) and of the loses collected (unlikelihood; only
    spear keeps any, see `feedback_round`)."""
    rng = np.random.default_rng(seed)
    wins = collected.wins
    loses = collected.loses if cfg.lose_weight > 0 else []

    def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
        with autocast_for(device, train.precision):
            batch = [wins[i] for i in rng.choice(len(wins), min(train.batch_size, len(wins)), replace=False)]
            mle = mle_loss(model, batch, device)
            loss, terms = cfg.win_weight * mle, {"mle-loss": mle.item()}
            if loses:
                chosen = rng.choice(len(loses), min(train.batch_size, len(loses)), replace=False)
                ul = unlikelihood_loss(model, [loses[i] for i in chosen], cfg, device)
                loss = loss + cfg.lose_weight * ul
                terms["ul-loss"] = ul.item()
        return loss, terms

    return _train_steps(model, train, lr, step_loss)


def grpo_round(model: LanguageModel, problems: Sequence[Problem], cfg: FeedbackConfig, train: TrainConfig,
               lr: float, seed: int, device: torch.device) -> tuple[Collected, LocalResult]:
    """GRPO: `grpo_group` samples per prompt, reward 1 when correct; advantages normalised within each
    group; a PPO-clipped objective on the samples' token log-probabilities (old = the received model,
    also the KL reference, with the k3 estimator)."""
    got = Collected()
    problems = _answerable(model, problems, cfg, got.counts)
    prompts = [p.prompt for p in problems for _ in range(cfg.grpo_group)]
    answers = _attempts(model, prompts, cfg, seed, got.counts, train.precision)
    rewards = np.array([float(is_correct(p, a)) for p, a in zip([p for p in problems for _ in range(cfg.grpo_group)],
                                                                 answers)]).reshape(-1, cfg.grpo_group)
    got.counts["first-correct"] = int(rewards[:, 0].sum()) if len(rewards) else 0
    got.counts["wrong"] = len(problems) - got.counts["first-correct"]
    advantages = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)
    samples = [(q, a, float(adv)) for q, a, adv in zip(prompts, answers, advantages.reshape(-1))
               if adv != 0 and a]
    got.wins = [(q, a) for q, a, r in zip(prompts, answers, rewards.reshape(-1)) if r > 0]
    if not samples:
        return got, LocalResult(0, {}, 0)
    rng = np.random.default_rng(seed)
    ids, mask, labels = encode_pairs(model.tokenizer, [(q, a) for q, a, _ in samples])
    targets = labels != -100
    with torch.no_grad(), autocast_for(device, train.precision):  # the precision training compares against
        model.eval()
        old = torch.cat([_token_logprobs(model, ids[i: i + 64].to(device), mask[i: i + 64].to(device)).cpu()
                         for i in range(0, len(samples), 64)])
    advantage = torch.tensor([s[2] for s in samples])

    def step_loss() -> tuple[torch.Tensor, dict[str, float]]:
        pick = torch.from_numpy(rng.choice(len(samples), min(train.batch_size, len(samples)), replace=False))
        t = targets[pick].to(device)
        with autocast_for(device, train.precision):
            logp = _token_logprobs(model, ids[pick].to(device), mask[pick].to(device))
        ratio = torch.exp(logp - old[pick].to(device))
        a = advantage[pick].to(device)[:, None]
        policy = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.grpo_clip, 1 + cfg.grpo_clip) * a)
        log_ref_ratio = old[pick].to(device) - logp
        kl = (torch.expm1(log_ref_ratio) - log_ref_ratio).clamp_min(0)  # k3; >= 0 but for rounding
        per_token = policy + cfg.grpo_kl * kl
        loss = ((per_token * t).sum(1) / t.sum(1).clamp_min(1)).mean()
        return loss, {"grpo-kl": ((kl * t).sum(1) / t.sum(1).clamp_min(1)).mean().item()}

    return got, _train_steps(model, train, lr, step_loss)


def feedback_round(model: LanguageModel, problems: Sequence[Problem], objective: str, cfg: FeedbackConfig,
                   train: TrainConfig, lr: float, seed: int, device: torch.device) -> tuple[Collected, LocalResult]:
    """One client round of `objective` on `problems` (the arrivals): collect pairs, then train on them
    (no training without a win)."""
    if objective == "grpo":
        got, result = grpo_round(model, problems, cfg, train, lr, seed, device)
    else:
        got = collect(model, problems, objective, cfg, seed, train.precision)
        if objective != "spear":  # only spear learns from loses
            got.loses = []
        got.loses = capped_loses(got.loses, len(got.wins), cfg.lose_ratio, np.random.default_rng(seed))
        result = (train_on_pairs(model, got, cfg, train, lr, seed, device) if got.wins
                  else LocalResult(0, {}, 0))
    got.counts["wins"], got.counts["loses"] = len(got.wins), len(got.loses)
    got.counts["nonfinite-steps"] = result.nonfinite
    return got, result


@torch.no_grad()
def first_try_score(model: LanguageModel, problems: Sequence[Problem], max_new_tokens: int,
                    device: torch.device, precision: str) -> TaskScore:
    """Greedy first-try accuracy on held-out problems (correct / count), and as the loss the token-mean
    NLL of their worked solutions (summed over problems)."""
    if not problems:
        return TaskScore(0, 0, 0.0)
    with autocast_for(device, precision):
        answers = [cut_after_answer(a) for a, _ in sample(model.lm, model.tokenizer, [p.prompt for p in problems],
                                                          max_new_tokens)]
        loss_sum = 0.0
        for first in range(0, len(problems), 64):
            chunk = problems[first: first + 64]
            ids, mask, labels = (t.to(device) for t in encode_pairs(model.tokenizer,
                                                                      [(p.prompt, p.solution) for p in chunk]))
            logp = _token_logprobs(model, ids, mask)
            targets = labels != -100
            loss_sum += float((-(logp * targets).sum(1) / targets.sum(1)).sum())
    return TaskScore(sum(is_correct(p, a) for p, a in zip(problems, answers)), len(problems), loss_sum)


# --- a client's messages -------------------------------------------------------------------------


def _client_model(run: RunConfig, tasks: Sequence[str], arrays) -> tuple[LanguageModel, tuple[str, ...], torch.device]:
    model = module_bank(run).language_model()
    components = client_components(list(tasks), run)
    load_component_vectors(model, dict(arrays), list(components))
    device = resolve_device(run.train.device)
    return model.to(device), components, device


def arrivals(run: RunConfig, partition_id: int, server_round: int) -> list[Problem]:
    """The prompts arriving at a client this round: `feedback.prompts_per_round` of its training
    problems, drawn without replacement (seeded by run seed, client and round)."""
    pool, _ = client_problems(run, partition_id)
    rng = np.random.default_rng([run.seed, partition_id, server_round, 0xFEED])
    picks = rng.choice(len(pool), min(run.feedback.prompts_per_round, len(pool)), replace=False)
    return [pool[i] for i in picks]


def train_client(run: RunConfig, partition_id: int, tasks: Sequence[str], arrays, server_round: int, seed: int):
    """A language-model client's training message: (vectors, wins, wins per component, metrics), or
    nothing to aggregate ({}, 0, {}, metrics) when the round gave no win or every step was skipped."""
    model, components, device = _client_model(run, tasks, arrays)
    lr = lr_at(server_round, run.rounds, run.train)
    got, result = feedback_round(model, arrivals(run, partition_id, server_round), run.train.objective,
                                 run.feedback, run.train, lr, seed, device)
    metrics = {f"{protocol.FEEDBACK_PREFIX}{k}": float(got.counts[k]) for k in protocol.FEEDBACK_COUNTS}
    metrics |= {f"{protocol.FEEDBACK_PREFIX}{k}": v for k, v in result.losses.items() if math.isfinite(v)}
    metrics[protocol.TRAIN_STEPS] = float(result.steps)
    wins = len(got.wins)
    if not result.steps:
        return {}, 0, {}, metrics
    return component_vectors(model, list(components)), wins, {c: wins for c in components}, metrics


def evaluate_client(run: RunConfig, partition_id: int, tasks: Sequence[str], arrays) -> dict[str, TaskScore]:
    """Greedy first-try accuracy of the received model on this client's held-out prompts."""
    model, _, device = _client_model(run, tasks, arrays)
    _, held_out = client_problems(run, partition_id)
    score = first_try_score(model, held_out, run.feedback.max_new_tokens, device, run.train.precision)
    return {task: score for task in tasks}
