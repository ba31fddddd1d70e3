"""Causal language models for SPEAR: any Hugging Face `AutoModelForCausalLM` by hub name or local
path, peft LoRA on its attention and MLP projections, and batched sampling with a KV cache.

fedmm's own tiny base (`fedmm pretrain-lm`) is a GPT-2 with a character tokenizer, saved with
`save_pretrained`; it loads through the same path as a Qwen2, Llama or GPT-2 checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

# The characters fedmm's arithmetic prompts and feedback are written in (fedmm.data.arithmetic).
CHARACTERS = "0123456789+-*=?:;.,'\n ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPECIAL = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}

# LoRA targets by model family: attention and MLP projections (what SPEAR's reference adapts).
LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARACTERS, plus pad / eos / bos / unk; decoding joins them back."""
    vocab = {token: i for i, token in enumerate(SPECIAL.values())}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)
    tokenizer.padding_side = "left"  # generation continues every prompt from its own last token
    return tokenizer


def tiny_lm_config(vocab_size: int, layers: int = 4, width: int = 128, heads: int = 4,
                   positions: int = 256) -> GPT2Config:
    return GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=1,
                      pad_token_id=0)


def language_model_source(name: str) -> str:
    """Where `from_pretrained` finds `model.language_model=name`: a base shipped with fedmm
    (`fedmm:<name>`), else the name itself (a save_pretrained folder or a hub id)."""
    from fedmm.models.encoders import SHIPPED_BASES_DIR, SHIPPED_PREFIX, shipped_bases

    if name.startswith(SHIPPED_PREFIX):
        if name not in shipped_bases():
            raise OSError(f"model.language_model={name!r} is not a base shipped with fedmm; shipped: {shipped_bases()}")
        return str(SHIPPED_BASES_DIR / name[len(SHIPPED_PREFIX):])
    return name


class LanguageModel(torch.nn.Module):
    """A causal LM with LoRA adapters, and its tokenizer. Its parameters are named `lm.…`, which
    fedmm.core.components maps to one component per transformer block."""

    def __init__(self, lm: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer

    def max_length(self) -> int:
        """The longest sequence (prompt + completion) its position embeddings cover."""
        config = self.lm.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 2048))


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a hub name or a `save_pretrained` folder; the tokenizer pads on the left
    and has a pad token (its EOS if it had none), as batched generation needs."""
    if not Path(name_or_path).exists() and name_or_path.startswith((".", "/")):
        raise OSError(f"could not load the causal LM {name_or_path!r}: no such folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as err:
        raise OSError(f"could not load the causal LM {name_or_path!r}: {err}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path!r} has no end-of-sequence token")
    return model, tokenizer


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = ()  # () = LORA_TARGETS of the model's family


def add_lm_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """peft LoRA on the model's attention and MLP projections; only the adapters train."""
    family = getattr(model.config, "model_type", "")
    targets = settings.targets or LORA_TARGETS.get(family)
    if not targets:
        raise ValueError(f"no default LoRA targets for model type {family!r}: name them (one of "
                         f"{sorted(LORA_TARGETS)} has defaults)")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(targets), task_type="CAUSAL_LM",
                        fan_in_fan_out=family == "gpt2")  # GPT-2's Conv1D stores weights transposed
    return get_peft_model(model, config)


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """Completions of `prompts` (text after each prompt, up to EOS), in batches with a KV cache;
    greedy at temperature 0, else nucleus sampling seeded by `seed` (the same completions for the same
    prompts, batch size and seed)."""
    return [text for text, _ in sample(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed,
                                       batch_size)]


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           batch_size: int = 64) -> list[tuple[str, bool]]:
    """`generate`'s completions, each with whether it ended (EOS) within `max_new_tokens`."""
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[str, bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for first in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[first: first + batch_size]), return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
                dict(do_sample=False)
            tokens = model.generate(**batch, max_new_tokens=max_new_tokens, use_cache=True,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **sampling)
            new = tokens[:, batch["input_ids"].shape[1]:]
            ended = (new == tokenizer.eos_token_id).any(dim=1).tolist()
            out += zip(tokenizer.batch_decode(new, skip_special_tokens=True), ended)
    return out


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) of (prompt, completion) pairs, right-padded; labels (the
    targets of a causal LM's shifted loss) only on the completion and its EOS, -100 elsewhere."""
    rows = [(tokenizer(p, add_special_tokens=False)["input_ids"],
             tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]) for p, c in pairs]
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return ids, mask, labels
