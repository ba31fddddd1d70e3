"""Mixture-of-Experts LoRA on a frozen feed-forward block (MixLoRA-style), with modality-aware routing.

The block y = W2 act(W1 x + b1) + b2 stays frozen. Expert e adds LoRA deltas to both maps:
y_e = (W2 + s B2_e A2_e) act((W1 + s B1_e A1_e) x + b1) + b2, with s = alpha / r. A router scores the
experts from the token and a bias per modality (the router knows each token's modality), each token
goes to its top-k experts, and their outputs are mixed with the router's probabilities renormalised
over those k. Only real tokens (not padding) are routed, counted and trained.

Two auxiliary losses shape the router during training:
- load balance (Switch Transformer): E * sum_e f_e * P_e, with f_e the share of routing slots expert e
  took and P_e its mean router probability;
- modality guidance: for each modality, the router probability put on experts that modality uses less
  than uniformly (weighted by how far under 1/E they are) — it discourages experts a modality rarely
  uses, so experts specialise by modality while the balance term keeps every expert in use overall.

With a sampler set (`sampled_routing`), tokens instead go to k experts sampled from the router's
distribution without replacement (Gumbel top-k), and the layer records each example's log-probability
of its sampled routing (Plackett-Luce) and its KL to the reference router: the terms of
`fedmm.models.grpo`'s policy loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fedmm.core.components import component_of, expert_component, layer_index
from fedmm.core.tasks import MODALITIES

Activation = Callable[[torch.Tensor], torch.Tensor]


class LoRAPair(nn.Module):
    """LoRA factors on both linear maps of a feed-forward block: one expert (or the dense adapter)."""

    def __init__(self, dim: int, hidden: int, r: int, alpha: int) -> None:
        super().__init__()
        self.up_A = nn.Parameter(torch.empty(r, dim))
        self.up_B = nn.Parameter(torch.zeros(hidden, r))
        self.down_A = nn.Parameter(torch.empty(r, hidden))
        self.down_B = nn.Parameter(torch.zeros(dim, r))
        # peft's initialisation: A ~ Kaiming-uniform, B = 0, so a new adapter changes nothing.
        nn.init.kaiming_uniform_(self.up_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.down_A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor, up_base: torch.Tensor, activation: Activation,
                down: nn.Linear) -> torch.Tensor:
        """The adapted block on tokens `x`, given the frozen first map's output `up_base` for them."""
        h = activation(up_base + (x @ self.up_A.T) @ self.up_B.T * self.scaling)
        return down(h) + (h @ self.down_A.T) @ self.down_B.T * self.scaling


def load_balance_loss(probs: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e over routed tokens (probs (N, E), chosen (N, k)); 1 when perfectly balanced."""
    f = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype) / chosen.numel()
    return num_experts * (f * probs.mean(0)).sum()


def modality_guidance_loss(probs: torch.Tensor, chosen: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Mean over modalities of the router mass each modality's tokens put on experts it under-uses.

    An expert's weight for modality m is max(0, 1/E - u_me) * E, with u_me its (detached) share of m's
    routing slots; 0 for experts used at least uniformly, 1 for experts m never chose.
    """
    num_experts = probs.shape[1]
    terms = []
    for m in modality.unique().tolist():
        rows = modality == m
        usage = torch.bincount(chosen[rows].reshape(-1), minlength=num_experts).to(probs.dtype)
        usage = usage / usage.sum()
        weight = (1.0 / num_experts - usage).clamp_min(0) * num_experts
        terms.append((probs[rows] * weight).sum(-1).mean())
    return torch.stack(terms).mean() if terms else probs.new_zeros(())


def plackett_luce_log_prob(log_probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """log P(drawing `chosen` in order, without replacement) under the categorical `log_probs` (N, E)."""
    picked = log_probs.gather(1, chosen)  # (N, k)
    taken = picked.exp().cumsum(1) - picked.exp()  # probability mass drawn before each pick
    return (picked - torch.log1p(-taken.clamp(max=1 - 1e-6))).sum(1)


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


@dataclass
class PolicyTerms:
    """What a sampled forward recorded, per example: log-probability of its routing and KL to the reference."""

    log_prob: torch.Tensor
    kl: torch.Tensor


class RoutedExperts(nn.Module):
    """k LoRA experts on a frozen feed-forward block, behind a modality-aware top-k router."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, r: int, alpha: int,
                 num_modalities: int, balance_weight: float, guidance_weight: float) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.router.modality_bias = nn.Parameter(torch.zeros(num_modalities, num_experts))
        self.experts = nn.ModuleList(LoRAPair(dim, hidden, r, alpha) for _ in range(num_experts))
        self.top_k = top_k
        self.balance_weight, self.guidance_weight = balance_weight, guidance_weight
        self.register_buffer("routed", torch.zeros(num_modalities, num_experts, dtype=torch.long), persistent=False)
        self.entropy_sum, self.entropy_count = 0.0, 0
        self.aux_loss: torch.Tensor | None = None
        self.sampler: torch.Generator | None = None
        self.policy: PolicyTerms | None = None
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def router_logits(self, x: torch.Tensor, modality: torch.Tensor,
                      weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        weight, bias = weights or (self.router.weight, self.router.modality_bias)
        return x @ weight.T + bias[modality]

    def reset_stats(self) -> None:
        self.routed.zero_()
        self.entropy_sum, self.entropy_count = 0.0, 0

    def keep_reference(self) -> None:
        """Freeze the current router as the reference the policy's KL term measures against."""
        self.reference = (self.router.weight.detach().clone(), self.router.modality_bias.detach().clone())

    def forward(self, x: torch.Tensor, up: nn.Linear, activation: Activation, down: nn.Linear,
                modality: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), modality (B, T) indices, valid (B, T) bool -> the block's output (0 at padding)."""
        batch, length, dim = x.shape
        rows = valid.reshape(-1).nonzero().squeeze(1)
        tokens, token_modality = x.reshape(-1, dim)[rows], modality.reshape(-1)[rows]
        # A sampled (policy) forward trains only the router: its input is taken as given.
        router_input = tokens if self.sampler is None else tokens.detach()
        log_probs = torch.log_softmax(self.router_logits(router_input, token_modality).float(), dim=-1)
        probs = log_probs.exp()
        if self.sampler is None:
            chosen = probs.topk(self.top_k, dim=-1).indices
        else:
            u = torch.rand(probs.shape, generator=self.sampler, device="cpu").to(probs.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
            chosen = (log_probs.detach() + gumbel).topk(self.top_k, dim=-1).indices
        gates = probs.gather(1, chosen)
        gates = (gates / gates.sum(-1, keepdim=True)).to(x.dtype)
        up_base = up(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                y = expert(tokens[token_idx], up_base[token_idx], activation, down)
                out = out.index_add(0, token_idx, y * gates[token_idx, slot, None])
        if self.sampler is not None:
            self._record_policy(router_input, token_modality, log_probs, chosen, rows // length, batch)
        elif self.training and rows.numel():
            self._record_training(probs, chosen, token_modality)
        full = torch.zeros(batch * length, dim, dtype=out.dtype, device=out.device)
        return full.index_copy(0, rows, out).reshape(batch, length, dim)

    def _record_training(self, probs: torch.Tensor, chosen: torch.Tensor, modality: torch.Tensor) -> None:
        self.aux_loss = (self.balance_weight * load_balance_loss(probs, chosen, self.num_experts)
                         + self.guidance_weight * modality_guidance_loss(probs, chosen, modality))
        with torch.no_grad():
            pairs = modality.unsqueeze(1).expand_as(chosen) * self.num_experts + chosen
            self.routed += torch.bincount(pairs.reshape(-1), minlength=self.routed.numel()).view_as(self.routed)
            self.entropy_sum += float(routing_entropy(probs).sum())
            self.entropy_count += int(probs.shape[0])

    def _record_policy(self, tokens: torch.Tensor, modality: torch.Tensor, log_probs: torch.Tensor,
                       chosen: torch.Tensor, example: torch.Tensor, batch: int) -> None:
        token_log_prob = plackett_luce_log_prob(log_probs, chosen)
        if self.reference is None:
            raise RuntimeError("a sampled routing needs a reference router: call keep_reference() first")
        ref = torch.log_softmax(self.router_logits(tokens, modality, self.reference).float(), dim=-1)
        token_kl = (log_probs.exp() * (log_probs - ref)).sum(-1)
        per_example = torch.zeros(batch, dtype=token_log_prob.dtype, device=tokens.device)
        counts = per_example.index_add(0, example, torch.ones_like(token_kl)).clamp_min(1)
        self.policy = PolicyTerms(per_example.index_add(0, example, token_log_prob),
                                  per_example.index_add(0, example, token_kl) / counts)


class DenseLoRA(nn.Module):
    """One LoRA adapter on a frozen feed-forward block: the dense baseline MoE-LoRA is measured against."""

    def __init__(self, dim: int, hidden: int, r: int, alpha: int) -> None:
        super().__init__()
        self.lora = LoRAPair(dim, hidden, r, alpha)

    def forward(self, x: torch.Tensor, up: nn.Linear, activation: Activation, down: nn.Linear,
                modality: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.lora(x, up(x), activation, down) * valid.unsqueeze(-1).to(x.dtype)


def routed_layers(model: nn.Module) -> list[RoutedExperts]:
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the routing losses the model's MoE layers recorded in their last training forward."""
    losses = [m.aux_loss for m in routed_layers(model) if m.aux_loss is not None]
    for m in routed_layers(model):
        m.aux_loss = None
    return torch.stack(losses).sum() if losses else None


@contextlib.contextmanager
def sampled_routing(model: nn.Module, generator: torch.Generator) -> Iterator[list[RoutedExperts]]:
    """Within the block, every MoE layer samples its routing from `generator` and records PolicyTerms."""
    layers = routed_layers(model)
    for m in layers:
        m.sampler, m.policy = generator, None
    try:
        yield layers
    finally:
        for m in layers:
            m.sampler = None


def routed_tokens(model: nn.Module) -> dict[str, dict[str, int]]:
    """Tokens each expert component was routed since the last reset, per modality name: the fusion
    block's experts, and those of Hugging Face MoE encoders (an encoder's `expert_counter`)."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            routed = module.routed.cpu().tolist()
            for e in range(module.num_experts):
                component = component_of(f"{name}.experts.{e}.up_A")
                counts[component] = {m: routed[i][e] for i, m in enumerate(MODALITIES) if routed[i][e]}
        counter = getattr(module, "expert_counter", None)
        if counter:
            modality = module.modality
            for layer, routed_layer in counter.routed.items():
                for e, n in enumerate(routed_layer.tolist()):
                    counts[expert_component(layer, e, f"encoder.{modality}")] = {modality: n} if n else {}
    return counts


def reset_routing_stats(model: nn.Module) -> None:
    """Restart every routing count of the model (fusion experts and MoE encoders)."""
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.reset_stats()
        counter = getattr(module, "expert_counter", None)
        if counter:
            counter.reset_stats()


def mean_routing_entropy(model: nn.Module) -> float | None:
    """Mean routing entropy (nats) over the tokens routed since the last reset, over every MoE layer."""
    layers = [m for m in routed_layers(model) if m.entropy_count]
    if not layers:
        return None
    return sum(m.entropy_sum for m in layers) / sum(m.entropy_count for m in layers)


# --- Hugging Face mixture-of-experts backbones ------------------------------------------------
#
# peft's LoRA on a fused expert tensor (`ParamWrapper`) packs every expert's factors into one pair:
# lora_A (E*r, in) holds expert e's A in rows e*r..(e+1)*r, and lora_B (out, r*E) holds its B in
# columns e, e+E, e+2E, ... (peft reshapes them to (E, r, in) and (out, r, E)). fedmm splits them into
# one view per expert, named `<parameter>@<expert>`, so each expert is a component of its own.

PACKED_SEPARATOR = "@"


def packed_expert_lora(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Parameter name -> (experts, "A" or "B") for every packed per-expert LoRA factor in `model`."""
    from peft.tuners.lora.layer import ParamWrapper

    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper) and module.num_experts > 1:
            for adapter in module.lora_A:
                packed[f"{name}.lora_A.{adapter}.weight"] = (module.num_experts, "A")
                packed[f"{name}.lora_B.{adapter}.weight"] = (module.num_experts, "B")
    return packed


def expert_views(name: str, param: torch.Tensor, packing: tuple[int, str] | None) -> dict[str, torch.Tensor]:
    """`{name: param}`, or for a packed factor one view per expert (writes go through to `param`)."""
    if packing is None:
        return {name: param}
    experts, factor = packing
    if factor == "A":
        per_expert = param.view(experts, -1, param.shape[1])
        return {f"{name}{PACKED_SEPARATOR}{e}": per_expert[e] for e in range(experts)}
    per_expert = param.view(param.shape[0], -1, experts)
    return {f"{name}{PACKED_SEPARATOR}{e}": per_expert[:, :, e] for e in range(experts)}


class ExpertTokenCounter:
    """Counts, during training, the real tokens a Hugging Face MoE backbone routes to each expert.

    transformers' MoE layers call their `experts` module as experts(hidden, top_k_index, top_k_weights);
    a forward pre-hook reads the chosen experts there. `valid` (the flattened attention mask) is set by
    the encoder before each forward so padding is not counted.
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.routed: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None
        self.active = False
        for name, module in backbone.named_modules():
            parts = name.split(".")
            if parts[-1] != "experts" or not any(p.dim() == 3 for p in module.parameters()):
                continue
            layer = int(layer_index(parts, len(parts) - 1))
            experts = next(p.shape[0] for p in module.parameters() if p.dim() == 3)
            self.routed[layer] = torch.zeros(experts, dtype=torch.long)
            module.register_forward_pre_hook(self._hook(layer))

    def __bool__(self) -> bool:
        return bool(self.routed)

    def _hook(self, layer: int):
        def count(module: nn.Module, args: tuple) -> None:
            if not self.active or len(args) < 2:
                return
            chosen = args[1]
            if self.valid is not None and self.valid.numel() == chosen.shape[0]:
                chosen = chosen[self.valid.to(chosen.device)]
            self.routed[layer] += torch.bincount(chosen.reshape(-1).cpu(), minlength=self.routed[layer].numel())
        return count

    def reset_stats(self) -> None:
        for counts in self.routed.values():
            counts.zero_()
