"""Routing as a policy: group-relative policy optimisation (GRPO) of the MoE routers.

For each training batch, the router's distribution is sampled `grpo_group` times (k experts per token,
without replacement); each sampled routing is scored by the task outcome, the negative cross-entropy
of each example's prediction under it. Advantages are relative to the group: each example's reward
minus the group mean over the sampled routings, divided by their standard deviation. The policy loss
raises the log-probability of routings that beat their group, and a KL term keeps the router near the
reference, the router this client received at the start of the round. Experts and attention do not
learn from this loss: only the routers do (see fedmm.models.moe's sampled forward).

This follows the abstract of MoE-GRPO (arXiv 2603.24984); its code is not public.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmm.core.schema import MoEConfig
from fedmm.models.moe import sampled_routing


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(G, B) rewards of G sampled routings of B examples -> advantages normalised within each example's group."""
    return (rewards - rewards.mean(0)) / (rewards.std(0) + eps)


def grpo_loss(model: nn.Module, task: str, parts: list[tuple[str, torch.Tensor, torch.Tensor]],
              labels: torch.Tensor, cfg: MoEConfig, generator: torch.Generator) -> torch.Tensor:
    """The weighted policy loss (-A log pi + beta KL) over `cfg.grpo_group` sampled routings of one batch."""
    parts = [(m, t.detach(), k) for m, t, k in parts]  # the encoders are not part of the policy
    rewards, log_probs, kls = [], [], []
    for _ in range(cfg.grpo_group):
        with sampled_routing(model, generator) as layers:
            logits = model.heads[task](model.fusion(parts))
        rewards.append(-nn.functional.cross_entropy(logits.detach().float(), labels, reduction="none"))
        log_probs.append(torch.stack([m.policy.log_prob for m in layers]).sum(0))
        kls.append(torch.stack([m.policy.kl for m in layers]).sum(0))
    advantages = group_advantages(torch.stack(rewards))
    policy = -(advantages * torch.stack(log_probs)).mean()
    return cfg.grpo_weight * (policy + cfg.grpo_kl * torch.stack(kls).mean())
