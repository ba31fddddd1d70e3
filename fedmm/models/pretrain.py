"""`fedmm pretrain`: build a small multi-modal foundation base the way such bases are built.

A ViT image encoder and a BERT text encoder (the architectures fedmm fine-tunes) are trained from
scratch by contrastive image-caption pretraining (CLIP: symmetric InfoNCE over the batch with a
learnable temperature), optionally with a masked-language-model term on the text side, on the
generated corpus of `fedmm.data.corpus` (not the clients' data). The output folder holds standard Hugging
Face folders that `model.image_encoder` / `model.text_encoder` load with `from_pretrained`:

    DIR/image/   config.json, model.safetensors, preprocessor_config.json
    DIR/text/    config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    DIR/card.json  the config, corpus, steps, final loss, held-out retrieval accuracy, file hashes

While it runs, DIR/checkpoint/ holds the last checkpoint; running the same command again resumes
from it and gives the same weights as an unbroken run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from transformers import BertModel, BertTokenizerFast, ViTModel

from fedmm.core.config import read_config_file, split_overrides
from fedmm.core.schema import ConfigError, ModelConfig
from fedmm.data.corpus import HELD_OUT, TRAIN, Corpus, make_corpus
from fedmm.models.encoders import pixel_values, small_encoder_config

CARD = "card.json"
CHECKPOINT = "checkpoint"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_DEFAULT_SIZES = ModelConfig()


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.05
    embed_dim: int = 64  # width of the shared image-text embedding space
    temperature: float = 0.07  # initial softmax temperature (learned from there)
    mlm_weight: float = 0.0  # > 0 adds a masked-language-model term on the text encoder
    mask_prob: float = 0.15
    corpus_pairs: int = 24000  # generated training pairs, cycled over the steps
    held_out_pairs: int = 1000  # pairs for the card's retrieval accuracy
    vocab_size: int = 600  # WordPiece vocabulary: special tokens, characters, then the corpus's words
    max_text_length: int = 32  # tokens per caption in pretraining (longer captions are cut)
    max_positions: int = 64  # text positions the base supports
    checkpoint_every: int = 250
    # Encoder sizes: the defaults are those of `model.*`, so the base fits fedmm's default model.
    hidden_size: int = _DEFAULT_SIZES.hidden_size
    num_layers: int = _DEFAULT_SIZES.num_layers
    num_heads: int = _DEFAULT_SIZES.num_heads
    intermediate_size: int = _DEFAULT_SIZES.intermediate_size
    image_size: int = _DEFAULT_SIZES.image_size
    patch_size: int = _DEFAULT_SIZES.patch_size


# --- config -------------------------------------------------------------------------------------


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type = PretrainConfig,
                         validate: Callable[[Any], None] | None = None) -> Any:
    """Defaults of `schema`, then a YAML file, then `key=value` overrides; checked by `validate`
    (default: validate_pretrain), bad keys named. `fedmm pretrain-lm` reads its own schema with it."""
    cfg = OmegaConf.structured(schema)
    layers: list[dict[str, Any]] = [read_config_file(path)] if path is not None else []
    layers += [{key: yaml.safe_load(value) if value.strip() else value}
               for key, value in split_overrides(overrides).items()]
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or next(iter(layer), "")
            if "not in" in str(err) or "Key '" in str(err):
                raise ConfigError(f"unknown pretrain config key {key!r}; known: "
                                  f"{[f.name for f in dataclasses.fields(schema)]}") from None
            raise ConfigError(f"bad value for pretrain config key {key!r}: {str(err).splitlines()[0]}") from None
    config = OmegaConf.to_object(cfg)
    (validate or validate_pretrain)(config)
    return config


def validate_pretrain(cfg: PretrainConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"pretrain config key {key!r} {what}, got {getattr(cfg, key)!r}")

    for key in ("steps", "batch_size", "embed_dim", "hidden_size", "num_layers", "num_heads",
                "intermediate_size", "image_size", "patch_size", "max_text_length", "checkpoint_every"):
        need(getattr(cfg, key) > 0, key, "must be > 0")
    need(cfg.batch_size >= 2, "batch_size", "must be >= 2 (the contrastive loss needs negatives)")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.warmup_steps < cfg.steps, "warmup_steps", "must be in [0, steps)")
    need(0 <= cfg.min_lr_fraction <= 1, "min_lr_fraction", "must be in [0, 1]")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 < cfg.temperature < 1, "temperature", "must be in (0, 1)")
    need(cfg.mlm_weight >= 0, "mlm_weight", "must be >= 0")
    need(0 < cfg.mask_prob < 1, "mask_prob", "must be in (0, 1)")
    need(cfg.corpus_pairs >= cfg.batch_size, "corpus_pairs", f"must be >= batch_size ({cfg.batch_size})")
    need(cfg.held_out_pairs >= 2, "held_out_pairs", "must be >= 2")
    floor = len(SPECIAL_TOKENS) + 2 * len(ALPHABET)
    need(cfg.vocab_size > floor, "vocab_size", f"must be > {floor} (the special tokens and the alphabet's pieces)")
    need(cfg.max_positions >= cfg.max_text_length, "max_positions", f"must be >= max_text_length ({cfg.max_text_length})")
    need(cfg.hidden_size % cfg.num_heads == 0, "hidden_size", f"must be a multiple of num_heads ({cfg.num_heads})")
    need(cfg.image_size % cfg.patch_size == 0, "image_size", f"must be a multiple of patch_size ({cfg.patch_size})")


def _sizes(cfg: PretrainConfig) -> ModelConfig:
    return ModelConfig(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                       intermediate_size=cfg.intermediate_size, image_size=cfg.image_size,
                       patch_size=cfg.patch_size, max_text_length=cfg.max_text_length)


# --- tokenizer and model ------------------------------------------------------------------------


ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
MIN_WORD_COUNT = 20


def train_tokenizer(captions: Sequence[str], vocab_size: int) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer from the corpus: the special tokens, every character alone
    and as a continuation piece (so any word splits into known pieces), then the corpus's words by
    frequency (ties by spelling) up to `vocab_size`, if seen at least MIN_WORD_COUNT times (a stray
    word stays a string of pieces). Built by counting, not by `tokenizers`' trainer,
    whose ties fall differently from run to run: the same corpus gives the same vocabulary."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in captions
                     for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    pieces = [*SPECIAL_TOKENS, *ALPHABET, *(f"##{c}" for c in ALPHABET)]
    known = set(pieces)
    words = [w for w, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
             if w not in known and n >= MIN_WORD_COUNT]
    vocab = {piece: i for i, piece in enumerate([*pieces, *words][:vocab_size])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class ContrastiveBase(nn.Module):
    """The two encoders, their projections into a shared space and the temperature (and an MLM head).

    An encoder's embedding is the mean of its output tokens, as fedmm's fusion block reads them."""

    def __init__(self, cfg: PretrainConfig, vocab_size: int, pad_token_id: int) -> None:
        super().__init__()
        sizes = _sizes(cfg)
        # Pooling layers are kept (unused) so the saved folders load without newly initialised weights.
        self.image = ViTModel(small_encoder_config("image", sizes))
        self.text = BertModel(small_encoder_config("text", sizes, vocab_size, cfg.max_positions, pad_token_id))
        self.image_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        self.mlm_head = nn.Linear(cfg.hidden_size, vocab_size) if cfg.mlm_weight > 0 else None

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.image(pixel_values=pixels).last_hidden_state
        return nn.functional.normalize(self.image_proj(hidden.mean(1)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        return nn.functional.normalize(self.text_proj(_masked_mean(hidden, mask)), dim=-1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: each image's caption among the batch's captions, and each caption's image."""
    logits = logit_scale.clamp(max=math.log(100.0)).exp() * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int,
                prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: `prob` of the real tokens are predicted; of those 80% become [MASK], 10% a
    random token, 10% stay. Returns the inputs and the labels (-100 where nothing is predicted)."""
    chosen = (torch.rand(ids.shape) < prob) & mask.bool() & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape)
    masked = torch.where(chosen & (draw < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked)
    return masked, labels


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_fraction` of `lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- data ---------------------------------------------------------------------------------------


@dataclass
class EncodedCorpus:
    pixels: torch.Tensor  # uint8 (N, H, W, 3); converted per batch
    ids: torch.Tensor
    mask: torch.Tensor
    keys: list[tuple]


def encode_corpus(corpus: Corpus, tokenizer: BertTokenizerFast, max_length: int) -> EncodedCorpus:
    enc = tokenizer(corpus.captions, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return EncodedCorpus(torch.from_numpy(corpus.images), enc["input_ids"], enc["attention_mask"], corpus.keys)


def batch_indices(cfg: PretrainConfig, step: int) -> torch.Tensor:
    """The examples of `step`: a function of the seed and the step alone, so a resumed run draws the
    same batches as an unbroken one."""
    rng = np.random.default_rng([cfg.seed, TRAIN, step])
    return torch.from_numpy(rng.choice(cfg.corpus_pairs, size=cfg.batch_size, replace=False))


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def retrieval_accuracy(model: ContrastiveBase, data: EncodedCorpus, image_size: int) -> dict[str, float]:
    """Zero-shot top-1 retrieval over the held-out pairs: an image's nearest caption (and a caption's
    nearest image) counts as right when it describes the same scene."""
    model.eval()
    images = torch.cat([model.embed_images(pixel_values(data.pixels[i : i + 256], image_size))
                        for i in range(0, len(data.keys), 256)])
    texts = torch.cat([model.embed_texts(data.ids[i : i + 256], data.mask[i : i + 256])
                       for i in range(0, len(data.keys), 256)])
    sims = images @ texts.T
    keys = data.keys
    i2t = np.mean([keys[j] == keys[i] for i, j in enumerate(sims.argmax(1).tolist())])
    t2i = np.mean([keys[j] == keys[i] for i, j in enumerate(sims.argmax(0).tolist())])
    model.train()
    return {"image_to_text": float(i2t), "text_to_image": float(t2i)}


# --- the run ------------------------------------------------------------------------------------


def _check_out(out: Path) -> bool:
    """Whether to resume. Refuses a finished base, and a folder that holds anything else."""
    if (out / CARD).exists():
        raise ConfigError(f"--out {str(out)!r} already holds a finished base ({CARD}); choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    if (out / CHECKPOINT / "state.pt").is_file():
        return True
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty and holds no pretraining checkpoint; "
                          "choose an empty or new folder")
    return False


def _save_checkpoint(out: Path, cfg: PretrainConfig, step: int, model: ContrastiveBase,
                     optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
    folder = out / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "losses": torch.tensor(losses, dtype=torch.float64)}, tmp)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tmp.replace(folder / "state.pt")  # a kill mid-write leaves the previous checkpoint whole


def _load_checkpoint(out: Path, cfg: PretrainConfig, model: ContrastiveBase,
                     optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    folder = out / CHECKPOINT
    saved = json.loads((folder / "config.json").read_text())
    ours = dataclasses.asdict(cfg)
    differ = sorted(k for k in ours.keys() | saved.keys() if ours.get(k) != saved.get(k))
    if differ:
        raise ConfigError(f"--out {str(out)!r} holds a checkpoint of another pretraining config (keys "
                          f"{', '.join(f'{k}: {saved.get(k)!r} there, {ours.get(k)!r} now' for k in differ)}); "
                          "give the same config to resume, or another folder")
    state = torch.load(folder / "state.pt", weights_only=True)  # tensors and plain values only
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), state["losses"].tolist()


def _loss_window(cfg: PretrainConfig) -> int:
    """Steps the card's first and final loss average over."""
    return max(1, min(50, cfg.steps // 10))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_base(out: Path, model: ContrastiveBase, tokenizer: BertTokenizerFast, cfg: PretrainConfig) -> None:
    """The two encoders as standard Hugging Face folders."""
    try:  # transformers 5 names the torchvision-free processor apart
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor
    model.image.save_pretrained(out / "image")
    ViTImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(out / "image")
    model.text.save_pretrained(out / "text")
    tokenizer.model_max_length = cfg.max_positions
    tokenizer.save_pretrained(out / "text")


def card_files(out: Path) -> dict[str, str]:
    """sha256 of every weight and tokenizer file of the base, by path relative to `out`."""
    return {str(p.relative_to(out)): _sha256(p) for folder in ("image", "text")
            for p in sorted((out / folder).iterdir()) if p.is_file()}


def pretrain(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the pretraining into `out` (resuming from its checkpoint if there is one); returns the card."""
    out = Path(out)
    resume = _check_out(out)
    started = time.perf_counter()
    corpus = make_corpus(cfg.corpus_pairs, cfg.seed, TRAIN, cfg.image_size)
    tokenizer = train_tokenizer(corpus.captions, cfg.vocab_size)
    train = encode_corpus(corpus, tokenizer, cfg.max_text_length)
    held_out = encode_corpus(make_corpus(cfg.held_out_pairs, cfg.seed, HELD_OUT, cfg.image_size), tokenizer,
                             cfg.max_text_length)
    del corpus
    torch.manual_seed(cfg.seed)
    model = ContrastiveBase(cfg, len(tokenizer), tokenizer.pad_token_id)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    step, losses = _load_checkpoint(out, cfg, model, optimizer) if resume else (0, [])
    if resume:
        print(f"fedmm pretrain: resuming {str(out)!r} from step {step}")
    special = torch.isin(train.ids, torch.tensor(tokenizer.all_special_ids))
    model.train()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=step, loss="-")
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            # Dropout and masking draw from a seed of the step, so a resumed run matches an unbroken one.
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            index = batch_indices(cfg, step)
            ids, mask = train.ids[index], train.mask[index]
            loss = clip_loss(model.embed_images(pixel_values(train.pixels[index], cfg.image_size)),
                             model.embed_texts(ids, mask), model.logit_scale)
            if model.mlm_head is not None:
                masked, labels = mask_tokens(ids, mask, special[index], tokenizer.mask_token_id, len(tokenizer),
                                             cfg.mask_prob)
                hidden = model.text(input_ids=masked, attention_mask=mask).last_hidden_state
                mlm = nn.functional.cross_entropy(model.mlm_head(hidden).flatten(0, 1), labels.flatten())
                loss = loss + cfg.mlm_weight * mlm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.detach().item())
            step += 1
            bar.update(task, completed=step, loss=f"{np.mean(losses[-_loss_window(cfg):]):.3f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint(out, cfg, step, model, optimizer, losses)
    retrieval = retrieval_accuracy(model, held_out, cfg.image_size)
    save_base(out, model, tokenizer, cfg)
    card = {
        "config": dataclasses.asdict(cfg),
        "corpus": {"train_pairs": cfg.corpus_pairs, "held_out_pairs": cfg.held_out_pairs,
                   "stream": "fedmm.data.corpus.make_corpus (seed stream 0xBA5E, not the clients')"},
        "steps": cfg.steps,
        "final_loss": float(np.mean(losses[-_loss_window(cfg):])),
        "first_loss": float(np.mean(losses[: _loss_window(cfg)])),
        "retrieval_top1": retrieval,
        "vocab_size": len(tokenizer),
        "files": card_files(out),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / CARD).write_text(json.dumps(card, indent=1) + "\n")
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return card
