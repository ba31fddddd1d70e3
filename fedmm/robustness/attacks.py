"""The attack suite: who is malicious, how their training data is poisoned, how their updates are forged.

A simulation knows which clients are malicious (`malicious_clients`, seeded); the defence never does.
Data poisoning (label flip, backdoor triggers) runs on the malicious clients' own training data.
Model poisoning runs on the malicious clients' updates Δ = (trained - sent) of one component, stacked
as an (M, P) float32 matrix, after honest or poisoned local training; colluders share their updates and
know the previous global update (every client sees consecutive global models), nothing else.

A model attack is a plain function `(deltas, context) -> deltas`; users plug in their own with
`attack.name=module:function`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from scipy.stats import norm as normal_dist

from fedmm.core.schema import AttackConfig, ConfigError, RunConfig


@dataclass
class AttackContext:
    """What colluding attackers know when forging one component's updates."""

    config: AttackConfig
    rng: np.random.Generator
    benign_estimate: np.ndarray | None  # last round's global update of this component, if they saw one
    num_sampled: int  # clients in this round holding the component (attackers included)


ModelAttack = Callable[[np.ndarray, AttackContext], np.ndarray]


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x, axis=1, keepdims=True)


def bounded_scaling(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """Δ × scale, clipped to norm_bound × ||Δ|| (so a norm check sees a plausible update)."""
    scaled = deltas * ctx.config.scale
    bound = ctx.config.norm_bound * _row_norms(deltas)
    return scaled * np.minimum(1.0, bound / np.maximum(_row_norms(scaled), 1e-30))


def sign_flip(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    return -deltas


def gaussian_noise(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """Pure noise with std noise_std × the RMS of the honest update."""
    rms = _row_norms(deltas) / math.sqrt(deltas.shape[1])
    return (ctx.rng.standard_normal(deltas.shape) * (ctx.config.noise_std * rms)).astype(np.float32)


def euclidean_constrained(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """Project Δ onto the ball of radius `radius` × ||b|| around the benign estimate b."""
    b = ctx.benign_estimate
    if b is None:
        return deltas
    offset = deltas - b
    radius = ctx.config.radius * float(np.linalg.norm(b))
    return b + offset * np.minimum(1.0, radius / np.maximum(_row_norms(offset), 1e-30))


def cosine_constrained(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """Rotate Δ towards the benign estimate until their cosine reaches min_cosine; keep ||Δ||."""
    b = ctx.benign_estimate
    if b is None:
        return deltas
    b_hat = b / max(float(np.linalg.norm(b)), 1e-30)
    norms = _row_norms(deltas)
    d_hat = deltas / np.maximum(norms, 1e-30)
    # The unit vector at angle acos(min_cosine) from b_hat in the plane of (b_hat, d_hat).
    along = d_hat @ b_hat
    ortho = d_hat - along[:, None] * b_hat
    ortho /= np.maximum(_row_norms(ortho), 1e-30)
    c = ctx.config.min_cosine
    target = c * b_hat + math.sqrt(1 - c * c) * ortho
    rotated = np.where((along >= c)[:, None], d_hat, target)
    return (rotated * norms).astype(np.float32)


def neurotoxin(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """The poisoned update only on the coordinates benign updates change least (by |b|), where it
    persists longest; the benign estimate elsewhere; all boosted."""
    b = ctx.benign_estimate
    if b is None:
        return deltas * ctx.config.boost
    keep = max(1, int(round(ctx.config.neurotoxin_keep * b.size)))
    mask = np.zeros(b.size, dtype=bool)
    mask[np.argpartition(np.abs(b), keep - 1)[:keep]] = True
    return (np.where(mask, deltas, b) * ctx.config.boost).astype(np.float32)


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s z_max: the most deviation that still leaves the attackers inside the majority."""
    # Attackers that are already a majority need no deviation to hide; cap the quantile below 1
    # so z stays finite.
    supporters = max(num_clients // 2 + 1 - num_malicious, 1)
    return float(normal_dist.ppf(min(max(num_clients - supporters, 1) / num_clients, 1 - 0.5 / num_clients)))


# ALIE's attackers each add noise of this share of the per-coordinate std, so no two send the same
# vector: identical replies are a giveaway no real attacker would leave.
ALIE_JITTER = 0.1


def alie(deltas: np.ndarray, ctx: AttackContext) -> np.ndarray:
    """"A little is enough": every attacker sends mean - z × std of the colluders' honest updates,
    plus its own small jitter (ALIE_JITTER × std per coordinate)."""
    z = ctx.config.alie_z or alie_z(ctx.num_sampled, deltas.shape[0])
    std = deltas.std(axis=0)
    forged = deltas.mean(axis=0) - z * std
    jitter = ctx.rng.standard_normal(deltas.shape) * (ALIE_JITTER * std)
    return (forged + jitter).astype(np.float32)


@dataclass(frozen=True)
class Attack:
    data: str  # none | backdoor | label_flip
    model: ModelAttack | None


ATTACKS: dict[str, Attack] = {
    "label_flip": Attack("label_flip", None),
    "backdoor": Attack("backdoor", None),
    "scaling": Attack("backdoor", bounded_scaling),
    "euclidean": Attack("backdoor", euclidean_constrained),
    "cosine": Attack("backdoor", cosine_constrained),
    "neurotoxin": Attack("backdoor", neurotoxin),
    "sign_flip": Attack("none", sign_flip),
    "gaussian": Attack("none", gaussian_noise),
    "alie": Attack("none", alie),
}


def resolve_attack(cfg: AttackConfig) -> Attack | None:
    """The configured attack (None for `none`); a ConfigError naming the key if it cannot be found."""
    if cfg.name == "none":
        return None
    if cfg.name in ATTACKS:
        attack = ATTACKS[cfg.name]
    elif ":" in cfg.name:
        module_name, _, attr = cfg.name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"config key 'attack.name'={cfg.name!r} cannot be imported: {err}") from None
        if not callable(fn):
            raise ConfigError(f"config key 'attack.name'={cfg.name!r} is not a function")
        attack = Attack("none", fn)
    else:
        raise ConfigError(f"config key 'attack.name'={cfg.name!r} is neither a built-in attack "
                          f"{sorted(ATTACKS)} nor module:function")
    return attack if cfg.data == "auto" else Attack(cfg.data, attack.model)


def measures_backdoor(cfg: AttackConfig) -> bool:
    """Whether evaluation measures a backdoor: the attack poisons data with the trigger, or is a
    trigger attack whose poisoning `attack.data=none` turned off. That run's success rate is the
    trigger's base rate: how often a model nobody poisoned maps triggered inputs to the target."""
    attack = resolve_attack(cfg)
    return attack is not None and (attack.data == "backdoor" or ATTACKS.get(cfg.name, attack).data == "backdoor")


def evaluation_views(cfg: AttackConfig) -> tuple[str, ...]:
    """The score views every evaluate reply carries (see fedmm.core.protocol.VIEW_PREFIXES)."""
    return ("global", "personal", "backdoor") if measures_backdoor(cfg) else ("global", "personal")


def malicious_clients(run: RunConfig) -> frozenset[int]:
    """Partition ids of the malicious clients: round(fraction × clients), drawn with the run's seed."""
    if run.attack.name == "none":
        return frozenset()
    count = max(1, int(round(run.attack.fraction * run.clients.num)))  # fraction > 0 means at least one
    rng = np.random.default_rng([run.seed, 0xA77AC])
    return frozenset(int(i) for i in rng.choice(run.clients.num, size=count, replace=False))


Columns = dict[str, np.ndarray | list]  # image (N, H, W, 3) uint8, text list[str], label (N,) int


def columns_of(ds: Dataset) -> Columns:
    cols = ds.with_format("numpy")
    out: Columns = {"label": np.asarray(cols["label"], dtype=np.int64)}
    if "image" in ds.column_names:
        out["image"] = np.asarray(cols["image"], dtype=np.uint8)
    if "text" in ds.column_names:
        out["text"] = [str(t) for t in cols["text"]]
    return out


def apply_trigger(columns: Columns, cfg: AttackConfig, modalities: tuple[str, ...]) -> Columns:
    """The backdoor trigger on the modalities the task has: a white patch in the image's bottom-right
    corner, the trigger word in front of the text."""
    out = dict(columns)
    if "image" in modalities:
        images = np.array(columns["image"], dtype=np.uint8, copy=True)
        images[:, -cfg.trigger_size :, -cfg.trigger_size :, :] = 255
        out["image"] = images
    if "text" in modalities:
        out["text"] = [f"{cfg.trigger_token} {t}" for t in columns["text"]]
    return out


def poison_training_split(columns: Columns, kind: str, cfg: AttackConfig, modalities: tuple[str, ...],
                          num_classes: int, seed: int) -> Columns:
    """A malicious client's training data: every label flipped (y -> C-1-y), or a `poison_fraction`
    share of the examples with the trigger and the target label."""
    labels = np.asarray(columns["label"])
    if kind == "label_flip":
        return {**columns, "label": num_classes - 1 - labels}
    if kind != "backdoor":
        return columns
    chosen = np.random.default_rng(seed).random(len(labels)) < cfg.poison_fraction
    triggered = apply_trigger(columns, cfg, modalities)
    out = {**columns, "label": np.where(chosen, cfg.target, labels)}
    if "image" in modalities:
        out["image"] = np.where(chosen[:, None, None, None], triggered["image"], columns["image"])
    if "text" in modalities:
        out["text"] = [t if c else o for t, c, o in zip(triggered["text"], chosen, columns["text"])]
    return out


def triggered_test_split(columns: Columns, cfg: AttackConfig, modalities: tuple[str, ...]) -> Columns:
    """Test inputs whose true label is not the target, with the trigger, labelled as the target: the
    accuracy on this set is the attack's success rate."""
    keep = np.flatnonzero(np.asarray(columns["label"]) != cfg.target)
    subset: Columns = {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]) for k, v in columns.items()}
    out = apply_trigger(subset, cfg, modalities)
    out["label"] = np.full(len(keep), cfg.target, dtype=np.int64)
    return out
