"""The multi-modal, multi-task model: LoRA-adapted encoders, a fusion block and one head per task.

Parameter names follow `fedmm.core.components`: `encoders.<modality>.…`, `fusion.…`, `heads.<task>.…`.
A process keeps one :class:`ModuleBank` per run config, so the base encoders load once and every
virtual client served by the process reuses them; a client's model is a view over the modules of its
own modalities and tasks.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from fedmm.core.components import component_layouts, component_of, component_order, flatten, unflatten
from fedmm.core.lora_ranks import from_rank, to_rank
from fedmm.core.schema import MoEConfig, RunConfig
from fedmm.models.causal_lm import LanguageModel, LoraSettings, add_lm_lora, language_model_source, load_causal_lm
from fedmm.models.encoders import (CARRIES_BASE, add_lora, build_tokenizer, carry_lora_bases, image_size_of,
                                   load_base_encoder)
from fedmm.models.moe import DenseLoRA, ExpertTokenCounter, RoutedExperts, expert_views, packed_expert_lora
from fedmm.core.tasks import MODALITIES, TaskSpec, profile_modalities, task_specs


class ModalityEncoder(nn.Module):
    """A frozen backbone with LoRA adapters and a trainable projection into the fusion width."""

    def __init__(self, modality: str, backbone: nn.Module, fusion_dim: int) -> None:
        super().__init__()
        self.modality = modality
        self.backbone = backbone
        self.proj = nn.Linear(backbone.config.hidden_size, fusion_dim)
        self.expert_counter = ExpertTokenCounter(backbone)  # empty unless the backbone is a MoE model

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.expert_counter.active = self.training
        if self.modality == "image":
            self.expert_counter.valid = None
            hidden = self.backbone(pixel_values=inputs["pixel_values"]).last_hidden_state
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        else:
            self.expert_counter.valid = inputs["attention_mask"].reshape(-1).bool()
            hidden = self.backbone(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            mask = inputs["attention_mask"].bool()
        return self.proj(hidden), mask


class AdaptedFusionLayer(nn.TransformerEncoderLayer):
    """A pre-norm encoder layer whose feed-forward maps are frozen and adapted by `adapter`
    (fedmm.models.moe.DenseLoRA or RoutedExperts), which also sees each token's modality and padding."""

    def __init__(self, dim: int, heads: int, adapter_factory) -> None:
        # The base layer is built first, so its weights are those `fusion_ffn=full` starts from.
        super().__init__(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.linear1.requires_grad_(False)
        self.linear2.requires_grad_(False)
        self.adapter = adapter_factory(dim, 2 * dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x + self._sa_block(self.norm1(x), None, padding)
        return x + self.adapter(self.norm2(x), self.linear1, self.activation, self.linear2, modality, ~padding)


def _adapter_factory(moe: MoEConfig):
    if moe.fusion_ffn == "lora":
        return lambda dim, hidden: DenseLoRA(dim, hidden, moe.expert_r, moe.expert_alpha)
    return lambda dim, hidden: RoutedExperts(dim, hidden, moe.num_experts, moe.top_k, moe.expert_r,
                                             moe.expert_alpha, len(MODALITIES), moe.balance_weight,
                                             moe.guidance_weight)


class FusionBlock(nn.Module):
    """Transformer layers over the concatenated tokens of the modalities a task reads."""

    def __init__(self, dim: int, layers: int, heads: int, moe: MoEConfig | None = None) -> None:
        super().__init__()
        self.modality_embedding = nn.Embedding(len(MODALITIES), dim)
        self.adapted = moe is not None and moe.fusion_ffn != "full"
        if self.adapted:
            layer = AdaptedFusionLayer(dim, heads, _adapter_factory(moe))
        else:
            layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        tokens = torch.cat(
            [t + self.modality_embedding.weight[MODALITIES.index(m)] for m, t, _ in parts], dim=1
        )
        mask = torch.cat([k for _, _, k in parts], dim=1)
        if self.adapted:
            modality = torch.cat([torch.full(k.shape, MODALITIES.index(m), device=k.device) for m, _, k in parts], 1)
            hidden = tokens
            for layer in self.layers.layers:
                hidden = layer(hidden, ~mask, modality)
        else:
            hidden = self.layers(tokens, src_key_padding_mask=~mask)
        hidden = self.norm(hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MultiModalModel(nn.Module):
    def __init__(self, encoders: dict[str, ModalityEncoder], fusion: FusionBlock,
                 heads: dict[str, nn.Linear], specs: dict[str, TaskSpec]) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.heads = nn.ModuleDict(heads)
        self.specs = specs

    def encode(self, task: str, inputs: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(modality, tokens, mask) of each modality `task` reads, projected to the fusion width."""
        return [(m, *self.encoders[m](inputs)) for m in self.specs[task].modalities]

    def forward(self, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[task](self.fusion(self.encode(task, inputs)))


def _seeded(seed: int, name: str):
    torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


class ModuleBank:
    """Every module a process may need, each built on first use and kept for the process's life."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.specs = task_specs(run)
        self._encoders: dict[str, ModalityEncoder] = {}
        self._heads: dict[str, nn.Linear] = {}
        self._fusion: FusionBlock | None = None
        self._tokenizer = None
        self._language_model: LanguageModel | None = None
        self._components: dict[tuple[str, ...], tuple[str, ...]] = {}
        # Trainable tensors as first built (by parameter name): the untrained starting point that
        # local-only baselines begin from, whatever global model a client later receives.
        self._initial: dict[str, np.ndarray] = {}

    def _snapshot(self, prefix: str, module: nn.Module) -> None:
        for name, value in trainable_state(module).items():
            self._initial[f"{prefix}.{name}"] = value

    def encoder(self, modality: str) -> ModalityEncoder:
        if modality not in self._encoders:
            m = self.run.model
            backbone = load_base_encoder(modality, m, self.run.seed)
            with torch.random.fork_rng():
                _seeded(self.run.seed, f"lora:{modality}")
                backbone = add_lora(backbone, m)
                if self.run.strategy.lora_aggregation == "flora":
                    carry_lora_bases(backbone)
                self._encoders[modality] = ModalityEncoder(modality, backbone, m.fusion_dim)
            self._snapshot(f"encoders.{modality}", self._encoders[modality])
        return self._encoders[modality]

    def fusion(self) -> FusionBlock:
        if self._fusion is None:
            m = self.run.model
            with torch.random.fork_rng():
                _seeded(self.run.seed, "fusion")
                self._fusion = FusionBlock(m.fusion_dim, m.fusion_layers, m.fusion_heads, self.run.moe)
            self._snapshot("fusion", self._fusion)
        return self._fusion

    def head(self, task: str) -> nn.Linear:
        if task not in self._heads:
            with torch.random.fork_rng():
                _seeded(self.run.seed, f"head:{task}")
                self._heads[task] = nn.Linear(self.run.model.fusion_dim, self.specs[task].num_classes)
            self._snapshot(f"heads.{task}", self._heads[task])
        return self._heads[task]

    def language_model(self) -> LanguageModel:
        """The causal LM of `model.language_model`, LoRA-adapted (the same adapters for every task)."""
        if self._language_model is None:
            m = self.run.model
            lm, tokenizer = load_causal_lm(language_model_source(m.language_model))
            with torch.random.fork_rng():
                _seeded(self.run.seed, "lora:lm")
                lm = add_lm_lora(lm, LoraSettings(m.lora_r, m.lora_alpha, m.lora_dropout))
            self._language_model = LanguageModel(lm, tokenizer)
            self._snapshot("lm", self._language_model.lm)
        return self._language_model

    def model(self, tasks: list[str] | tuple[str, ...]) -> MultiModalModel | LanguageModel:
        if self.run.model.language_model:
            return self.language_model()
        encoders = {m: self.encoder(m) for m in profile_modalities(tasks, self.specs)}
        return MultiModalModel(encoders, self.fusion(), {t: self.head(t) for t in tasks}, self.specs)

    def components(self, tasks: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        """See `client_components`; one tuple per task set, shared by every client holding it."""
        key = tuple(tasks)
        if key not in self._components:
            self._components[key] = tuple(sorted(trainable_layouts(self.model(key)), key=component_order))
        return self._components[key]

    def initial_vectors(self, tasks: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
        """Component vectors of `tasks`' model as first built, before any training or loading."""
        layouts = trainable_layouts(self.model(tasks))
        return {c: flatten(layout, self._initial) for c, layout in layouts.items()}

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.run.model)
        return self._tokenizer

    @torch.no_grad()
    def tokens_per_example(self, modality: str) -> int:
        """Fusion tokens one example of `modality` brings at most: the encoder's output length."""
        if modality == "text":
            return int(self.tokenizer()([""])["input_ids"].shape[1])
        size = self.image_size()
        return int(self.encoder("image")({"pixel_values": torch.zeros(1, 3, size, size)})[0].shape[1])

    def image_size(self) -> int:
        return image_size_of(self.encoder("image").backbone, self.run.model.image_size)


_BANKS: dict[str, ModuleBank] = {}


def module_bank(run: RunConfig) -> ModuleBank:
    """The process-wide bank for this run's model and data config (built once, reused per message)."""
    key = json.dumps([asdict(run.model), asdict(run.data), asdict(run.moe), run.seed,
                      run.strategy.lora_aggregation == "flora"], sort_keys=True)
    if key not in _BANKS:
        _BANKS[key] = ModuleBank(run)
    return _BANKS[key]


def server_tasks(run: RunConfig) -> list[str]:
    return sorted({t for tasks in run.clients.profiles.values() for t in tasks})


def server_model(run: RunConfig) -> MultiModalModel:
    """The server's view: every task some profile holds, and the modalities they read."""
    return module_bank(run).model(server_tasks(run))


def initial_global_vectors(run: RunConfig) -> dict[str, np.ndarray]:
    """The global model before round 1: the modules as first built, whatever a process that also
    hosts clients (an in-process test grid) has trained into them since."""
    return module_bank(run).initial_vectors(server_tasks(run))


# --- trainable state --------------------------------------------------------------------------


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _trainable(model: nn.Module, components: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Trainable tensors of `components` (or all), by name: the one filter every helper here uses.

    A packed per-expert LoRA factor of a Hugging Face MoE backbone appears as one view per expert
    (fedmm.models.moe.expert_views), so each expert belongs to its own component.
    """
    wanted = None if components is None else set(components)
    packed = packed_expert_lora(model)
    carried = {f"{n}.base_layer.weight" if n else "base_layer.weight"
               for n, m in model.named_modules() if getattr(m, CARRIES_BASE, False)}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad or n in carried:
                for name, tensor in expert_views(n, p, packed.get(n)).items():
                    if wanted is None or component_of(name) in wanted:
                        out[name] = tensor
    return out


def trainable_state(model: nn.Module, components: list[str] | None = None) -> dict[str, np.ndarray]:
    """Trainable tensors (of `components`, or all) as float32 numpy arrays, keyed by parameter name."""
    return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in _trainable(model, components).items()}


class StateKeyError(KeyError):
    """Received or stored tensors do not match the model's expected keys or shapes."""


def load_trainable(model: nn.Module, arrays: dict[str, np.ndarray], components: list[str]) -> None:
    """Load exactly the trainable tensors of `components`: any missing or unexpected key is an error."""
    params = _trainable(model, components)
    expected = set(params)
    missing, unexpected = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing or unexpected:
        raise StateKeyError(
            f"state does not match components {components}: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name in expected:
            value = arrays[name]
            if tuple(value.shape) != tuple(params[name].shape):
                raise StateKeyError(f"{name}: shape {tuple(value.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(torch.from_numpy(np.asarray(value)))


def trainable_layouts(model: nn.Module, components: list[str] | None = None):
    """Layout of each component's flat vector, from the model's trainable parameters."""
    return component_layouts({n: tuple(p.shape) for n, p in _trainable(model, components).items()})


def component_vectors(model: nn.Module, components: list[str] | None = None) -> dict[str, np.ndarray]:
    """The wire format: one flat float32 vector per component."""
    state = trainable_state(model, components)
    layouts = component_layouts({n: v.shape for n, v in state.items()})
    return {c: flatten(layout, state) for c, layout in layouts.items()}


def load_component_vectors(model: nn.Module, vectors: dict[str, np.ndarray], components: list[str]) -> None:
    """Load exactly `components` from their flat vectors; any missing or unexpected key is an error."""
    layouts = trainable_layouts(model, components)
    missing, unexpected = sorted(set(layouts) - vectors.keys()), sorted(vectors.keys() - set(layouts))
    if missing or unexpected:
        raise StateKeyError(f"components do not match: missing {missing}, unexpected {unexpected}")
    arrays: dict[str, np.ndarray] = {}
    for component, layout in layouts.items():
        vector = np.asarray(vectors[component])
        if vector.shape != (layout.size,):
            raise StateKeyError(f"{component}: shape {vector.shape}, expected ({layout.size},)")
        arrays.update(unflatten(layout, vector))
    load_trainable(model, arrays, components)


class RankViews:
    """A client whose adapters have a lower rank than the global ones: its own model (real rank-r peft
    adapters) and the conversion of its component vectors to and from the global layout
    (fedmm.core.lora_ranks: leading terms in, zero-padded out, the same ΔW both ways)."""

    def __init__(self, run: RunConfig, tasks: Sequence[str], rank: int) -> None:
        components = list(module_bank(run).components(tasks))
        self.model = module_bank(run_at_rank(run, rank)).model(list(tasks))
        self.full = _global_layouts(run, tuple(tasks))
        self.low = trainable_layouts(self.model, components)

    def to_client(self, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {c: v if self.full[c] == self.low[c] else to_rank(np.asarray(v), self.full[c], self.low[c])
                for c, v in vectors.items()}

    def to_global(self, vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {c: v if self.full[c] == self.low[c] else from_rank(np.asarray(v), self.low[c], self.full[c])
                for c, v in vectors.items()}


def run_at_rank(run: RunConfig, rank: int) -> RunConfig:
    """The same run with encoder adapters of rank `rank`."""
    return dataclasses.replace(run, model=dataclasses.replace(run.model, lora_r=rank))


def rank_layouts(run: RunConfig, rank: int) -> dict:
    """Every component's layout at encoder LoRA rank `rank` (the server's whole model)."""
    return _global_layouts(run_at_rank(run, rank), tuple(server_tasks(run)))


_GLOBAL_LAYOUTS: dict[tuple, dict] = {}


def _global_layouts(run: RunConfig, tasks: tuple[str, ...]) -> dict:
    bank = module_bank(run)
    key = (id(bank), tasks)
    if key not in _GLOBAL_LAYOUTS:
        _GLOBAL_LAYOUTS[key] = trainable_layouts(bank.model(list(tasks)), list(bank.components(tasks)))
    return _GLOBAL_LAYOUTS[key]


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (frozen ones too)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def client_components(tasks: list[str] | tuple[str, ...], run: RunConfig) -> tuple[str, ...]:
    """Components a client holding `tasks` trains, as its model defines them: its encoders (and their
    experts), the fusion block's (and its routers and experts), its heads."""
    return module_bank(run).components(tasks)


__all__ = [
    "MultiModalModel", "ModuleBank", "module_bank", "server_model", "server_tasks", "initial_global_vectors", "trainable_state", "load_trainable",
    "component_vectors", "load_component_vectors", "trainable_layouts", "StateKeyError", "parameter_bytes",
    "client_components", "RankViews", "rank_layouts", "run_at_rank",
]
