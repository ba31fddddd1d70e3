"""The run configuration: one structured OmegaConf schema with its defaults in code.

Every entry point (``fedmm simulate``, ``flwr run .``, tests, benchmarks) builds its config through
:func:`load_config` or :func:`config_from_flat`, so unknown keys and bad values stop a run before any
work, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedmm.core.lora_ranks import LORA_AGGREGATIONS
from fedmm.core.schema import DEFAULT_PROFILES, ConfigError, RunConfig


# Objectives of a language model fine-tuned from feedback (fedmm.training.feedback).
FEEDBACK_OBJECTIVES = ("spear", "feedback_sft", "rejection_sft", "grpo")
DEFENSES = ("none", "trust", "krum", "multikrum", "bulyan", "median", "trimmed_mean", "fltrust", "flame", "oracle")

_CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("synthetic", "hf", "arithmetic"),
    "train.objective": ("supervised", *FEEDBACK_OBJECTIVES),
    "feedback.ul_window": ("last", "divergence", "feedback"),
    "data.partitioner": ("iid", "dirichlet"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.precision": ("auto", "fp32", "bf16"),
    "personal.method": ("fedavg", "fedavg_ft", "local", "tap_no_distill", "tap"),
    "personal.criterion": ("validation", "train"),
    "attack.data": ("auto", "none", "backdoor", "label_flip"),
    "defense.name": DEFENSES,
    "moe.fusion_ffn": ("full", "lora", "experts"),
    "moe.routing": ("topk", "grpo"),
    "strategy.lora_aggregation": LORA_AGGREGATIONS,
    "strategy.mode": ("sync", "async"),
    "strategy.async_clock": ("simulated", "real"),
    "dp.name": ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"),
}


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


_SCHEMA = OmegaConf.structured(RunConfig)


def _parse_value(key: str, raw: Any) -> Any:
    """Parse one override value by its field's type.

    String fields keep the text as given (no YAML re-reading: `0755` stays `0755`); list fields accept
    `a,b,c` so flat run-configs can set them; other fields parse the text as a YAML scalar.
    """
    default = None if key.startswith("clients.profiles.") else OmegaConf.select(_SCHEMA, key, default=None)
    is_list = key.startswith("clients.profiles.") or isinstance(default, ListConfig)
    if key.startswith(f"{STRATEGY_ARGS_KEY}."):
        return str(raw)  # converted later, by the strategy class's own signature
    if not isinstance(raw, str):
        return raw
    if isinstance(default, str):
        return raw
    if is_list:
        if raw.strip().startswith("["):
            return yaml.safe_load(raw)
        return [item.strip() for item in raw.split(",") if item.strip()]
    return yaml.safe_load(raw) if raw.strip() else raw


PROFILES_KEY = "clients.profiles"
MIN_BEHAVIOUR_SAMPLE = 5  # defense.behaviour_max_clients: fewer read clients give no honest-majority median
STRATEGY_ARGS_KEY = "strategy.args"


def format_strategy_args(args: Mapping[str, str]) -> str:
    """`{"eta": "0.01", "beta_1": "0.9"}` -> `"eta=0.01; beta_1=0.9"`, the flat (run config) form."""
    return "; ".join(f"{name}={value}" for name, value in args.items())


def parse_strategy_args(text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ConfigError(f"config key {STRATEGY_ARGS_KEY!r}: {item!r} is not name=value "
                              "(arguments are separated by ';')")
        args[name.strip()] = value.strip()
    return args


def format_profiles(profiles: Mapping[str, Sequence[str]]) -> str:
    """`{"image": ["img_shape"], "mm": ["vqa", "img_shape"]}` -> `"image=img_shape; mm=vqa,img_shape"`.

    Flat configs (Flower's run config) carry the profiles as this one string: Flower does not keep the
    order of a table's keys, and client i gets the i-th profile in the order they are listed.
    """
    return "; ".join(f"{name}={','.join(tasks)}" for name, tasks in profiles.items())


def parse_profiles(text: str) -> dict[str, list[str]]:
    profiles: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, tasks = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"config key {PROFILES_KEY!r}: {item!r} is not name=task,task,... "
                              f"(profiles are separated by ';')")
        if name.strip() in profiles:
            raise ConfigError(f"config key {PROFILES_KEY!r}: profile {name.strip()!r} is given twice")
        profiles[name.strip()] = [t.strip() for t in tasks.split(",") if t.strip()]
    return profiles


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key == PROFILES_KEY:
            if not isinstance(value, str):
                raise ConfigError(f"config key {PROFILES_KEY!r} must be a string like 'image=img_shape; text=txt_color'")
            nested.setdefault("clients", {})["profiles"] = parse_profiles(value)
            continue
        if key == STRATEGY_ARGS_KEY:
            if not isinstance(value, str):
                raise ConfigError(f"config key {STRATEGY_ARGS_KEY!r} must be a string like 'eta=0.01; beta_1=0.9'")
            nested.setdefault("strategy", {}).setdefault("args", {}).update(parse_strategy_args(value))
            continue
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad config key {key!r}")
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key {key!r} conflicts with {part!r} set as a value")
            node = child
        node[parts[-1]] = _parse_value(key, value)
    return nested


def _merge(base: DictConfig, update: Mapping[str, Any]) -> DictConfig:
    update = dict(update)
    profiles = update.get("clients", {}).get("profiles") if isinstance(update.get("clients"), dict) else None
    if profiles is not None:
        # A user's profile set replaces the current one instead of adding to it.
        base.clients.profiles = {}
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(err).split("\n")[0]
        if "not in" in reason or "Key '" in reason and "not" in reason:
            raise ConfigError(f"unknown config key {key!r}") from None
        raise ConfigError(f"bad value for config key {key!r}: {reason}") from None


def _resolve(cfg: DictConfig) -> RunConfig:
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if not run.clients.profiles:
        defaults = {"arithmetic": ["arithmetic"]} if run.data.source == "arithmetic" else DEFAULT_PROFILES
        run.clients.profiles = {name: list(tasks) for name, tasks in defaults.items()}
    validate(run)
    return run


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping of keys (empty file: none); a missing file or a non-mapping is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    return loaded


def split_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """`key=value` overrides -> {key: raw value text}; anything else is an error."""
    flat: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        flat[key.strip()] = value
    return flat


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then a YAML file, then `key=value` overrides; validated."""
    cfg = _schema()
    if path is not None:
        cfg = _merge(cfg, _nest(_flatten(read_config_file(path))))
    flat = split_overrides(overrides)
    if flat:
        cfg = _merge(cfg, _nest(flat))
    return _resolve(cfg)


def config_from_flat(flat: Mapping[str, Any]) -> RunConfig:
    """Build a config from flat dotted keys, as Flower's `context.run_config` holds them."""
    return _resolve(_merge(_schema(), _nest(flat)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flat(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """Flat, scalar-valued form (lists joined by commas, the profiles as one ordered string) for
    Flower run-configs and records."""
    tree = to_dict(cfg)
    profiles = tree["clients"].pop("profiles")
    args = tree["strategy"].pop("args")
    flat = _flatten(tree)
    flat[PROFILES_KEY] = format_profiles(profiles)
    flat[STRATEGY_ARGS_KEY] = format_strategy_args(args)
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in flat.items()}


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _fraction(key: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"config key {key!r} must be in (0, 1], got {value}")


def validate(run: RunConfig) -> None:
    """Semantic checks the schema's types cannot express."""
    flat = _flatten(to_dict(run))
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}, got {flat[key]!r}")
    device = run.train.device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {device!r}")
    _positive("rounds", run.rounds)
    _positive("clients.num", run.clients.num)
    _positive("clients.num_cpus", run.clients.num_cpus)
    _positive("clients.num_gpus", run.clients.num_gpus, allow_zero=True)
    for rank in run.clients.lora_ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= run.model.lora_r:
            raise ConfigError(f"config key 'clients.lora_ranks': each rank must be an integer in 1..model.lora_r "
                              f"({run.model.lora_r}), got {rank!r}")
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size",
                "patch_size", "max_text_length", "fusion_dim", "fusion_layers", "fusion_heads",
                "lora_r", "lora_alpha"):
        _positive(f"model.{key}", getattr(run.model, key))
    if not 0 <= run.model.lora_dropout < 1:
        raise ConfigError(f"config key 'model.lora_dropout' must be in [0, 1), got {run.model.lora_dropout}")
    if run.model.fusion_dim % run.model.fusion_heads:
        raise ConfigError("config key 'model.fusion_dim' must be divisible by 'model.fusion_heads'")
    if run.model.hidden_size % run.model.num_heads:
        raise ConfigError("config key 'model.hidden_size' must be divisible by 'model.num_heads'")
    if run.model.image_size % run.model.patch_size:
        raise ConfigError("config key 'model.image_size' must be divisible by 'model.patch_size'")
    if not run.model.lora_target_modules:
        raise ConfigError("config key 'model.lora_target_modules' must name at least one module")
    _positive("data.examples_per_task", run.data.examples_per_task)
    _positive("data.examples_per_client", run.data.examples_per_client, allow_zero=True)
    _positive("data.dirichlet_alpha", run.data.dirichlet_alpha)
    for key in ("val_fraction", "test_fraction"):
        value = getattr(run.data, key)
        if not 0 < value < 1:
            raise ConfigError(f"config key 'data.{key}' must be in (0, 1), got {value}")
    if run.data.val_fraction + run.data.test_fraction >= 0.9:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction' leave too little training data")
    if run.data.source == "hf":
        if not run.data.hf_name:
            raise ConfigError("config key 'data.hf_name' is required when data.source=hf")
        if run.data.hf_num_classes < 2:
            raise ConfigError("config key 'data.hf_num_classes' must be >= 2 when data.source=hf")
        if not (run.data.hf_image_column or run.data.hf_text_column):
            raise ConfigError("set 'data.hf_image_column' or 'data.hf_text_column' when data.source=hf")
        if not run.data.hf_label_column:
            raise ConfigError("config key 'data.hf_label_column' must name the label column")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", run.data.hf_task):
        raise ConfigError(f"config key 'data.hf_task'={run.data.hf_task!r} must be an identifier (letters, digits, _)")
    for profile in run.clients.profiles:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", profile):
            raise ConfigError(f"config key 'clients.profiles.{profile}': profile names are letters, digits, _ and -")
    if run.train.local_steps < 0 or run.train.local_epochs < 0:
        raise ConfigError("config keys 'train.local_steps' and 'train.local_epochs' must be >= 0")
    if (run.train.local_steps > 0) == (run.train.local_epochs > 0):
        raise ConfigError("set exactly one of 'train.local_steps' and 'train.local_epochs' above 0")
    _positive("train.batch_size", run.train.batch_size)
    _positive("train.lr", run.train.lr)
    _positive("train.weight_decay", run.train.weight_decay, allow_zero=True)
    _positive("train.grad_clip", run.train.grad_clip, allow_zero=True)
    if not 0 <= run.train.min_lr_fraction <= 1:
        raise ConfigError("config key 'train.min_lr_fraction' must be in [0, 1]")
    _fraction("strategy.fraction_train", run.strategy.fraction_train)
    _fraction("strategy.fraction_evaluate", run.strategy.fraction_evaluate)
    _fraction("strategy.fraction_final", run.strategy.fraction_final)
    _positive("strategy.min_train_nodes", run.strategy.min_train_nodes)
    _positive("strategy.reply_timeout", run.strategy.reply_timeout, allow_zero=True)
    _validate_async(run)
    p = run.personal
    _positive("personal.margin", p.margin, allow_zero=True)
    for key in ("steps", "teacher_steps", "distill_steps", "distill_batch"):
        _positive(f"personal.{key}", getattr(p, key), allow_zero=True)
    _positive("personal.distill_temperature", p.distill_temperature)
    _positive("personal.distill_weight", p.distill_weight, allow_zero=True)
    if not run.strategy.name:
        raise ConfigError("config key 'strategy.name' must not be empty")
    _validate_attack_and_defense(run)
    _validate_moe(run)
    _validate_dp(run)
    _validate_feedback(run)
    most_tasks = max(len(tasks) for tasks in run.clients.profiles.values()) if run.clients.profiles else 0
    if 0 < run.train.local_steps < most_tasks:
        raise ConfigError(f"config key 'train.local_steps' must be >= {most_tasks} (the most tasks a profile "
                          "holds) so every task trains each round")
    # Task names are checked against the data source in fedmm.core.tasks (it knows which exist).
    from fedmm.core.tasks import task_specs

    known = task_specs(run)
    if run.data.examples_per_client:
        if run.data.source != "synthetic":
            raise ConfigError("config key 'data.examples_per_client' generates each client's data; it needs "
                              f"data.source=synthetic, not {run.data.source!r}")
        if run.data.examples_per_client < 20:
            raise ConfigError(f"config key 'data.examples_per_client'={run.data.examples_per_client} is too small: "
                              "give each client at least 20 examples (0 shares out data.examples_per_task)")
    elif run.data.source == "synthetic":
        names = list(run.clients.profiles)
        for task in known:
            holders = sum(task in run.clients.profiles[names[p % len(names)]] for p in range(run.clients.num))
            if holders and run.data.examples_per_task < 20 * holders:
                raise ConfigError(f"config key 'data.examples_per_task'={run.data.examples_per_task} is too small: "
                                  f"{holders} clients hold {task!r}; give each at least 20 examples")
    from fedmm.personalization.tap import parse_margins

    try:
        parse_margins(p.task_margins, sorted(known), p.margin)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for profile, tasks in run.clients.profiles.items():
        if not tasks:
            raise ConfigError(f"config key 'clients.profiles.{profile}' lists no task")
        for task in tasks:
            if task not in known:
                raise ConfigError(
                    f"config key 'clients.profiles.{profile}' names unknown task {task!r}; "
                    f"known: {sorted(known)}"
                )


def _validate_feedback(run: RunConfig) -> None:
    """A language model learns from feedback on arithmetic prompts; the multi-modal model from labels."""
    lm, objective, source = run.model.language_model, run.train.objective, run.data.source
    if bool(lm) != (objective in FEEDBACK_OBJECTIVES) or bool(lm) != (source == "arithmetic"):
        raise ConfigError(f"config keys 'model.language_model'={lm!r}, 'train.objective'={objective!r} and "
                          f"'data.source'={source!r} do not go together: a language model trains with an objective "
                          f"of {FEEDBACK_OBJECTIVES} on data.source=arithmetic; the multi-modal model "
                          "(language_model empty) trains with objective supervised on synthetic or hf data")
    if not lm:
        return
    unsupported = {"personal.method": (run.personal.method, "fedavg"), "attack.name": (run.attack.name, "none"),
                   "moe.fusion_ffn": (run.moe.fusion_ffn, "full"), "strategy.mode": (run.strategy.mode, "sync"),
                   "data.examples_per_client": (run.data.examples_per_client, 0),
                   "clients.lora_ranks": (run.clients.lora_ranks, [])}
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ConfigError(f"config key {key!r}={value!r} is not supported with model.language_model yet "
                              f"(use {supported!r})")
    if run.defense.name in ("trust", "fltrust", "oracle") or run.strategy.lora_aggregation == "flora":
        raise ConfigError(f"config keys 'defense.name'={run.defense.name!r} / 'strategy.lora_aggregation'="
                          f"{run.strategy.lora_aggregation!r}: a language model's updates are aggregated by a "
                          "per-component strategy or a robust rule (krum, median, ...); root-data and base-merging "
                          "stages read the multi-modal model")
    f = run.feedback
    for key in ("prompts_per_round", "max_new_tokens", "grpo_group"):
        _positive(f"feedback.{key}", getattr(f, key))
    for key in ("max_revisions", "ul_tokens", "lose_ratio", "win_weight", "lose_weight", "grpo_kl",
                "temperature"):
        _positive(f"feedback.{key}", getattr(f, key), allow_zero=True)
    _fraction("feedback.top_p", f.top_p)
    if not 0 <= f.ul_threshold < 1 or not 0 < f.grpo_clip < 1:
        raise ConfigError(f"config keys 'feedback.ul_threshold'={f.ul_threshold} and 'feedback.grpo_clip'="
                          f"{f.grpo_clip} must lie in [0, 1) and (0, 1)")
    if objective == "grpo" and (f.grpo_group < 2 or f.temperature == 0):
        raise ConfigError(f"config keys 'feedback.grpo_group'={f.grpo_group}, 'feedback.temperature'={f.temperature}: "
                          "grpo compares at least 2 different samples (temperature > 0)")
    if run.train.local_steps < 1:
        raise ConfigError("config key 'train.local_steps' must be >= 1 with a language model (it trains in steps, "
                          "not epochs)")


def _validate_attack_and_defense(run: RunConfig) -> None:
    a, d = run.attack, run.defense
    if not 0 <= a.fraction < 1:
        raise ConfigError(f"config key 'attack.fraction' must be in [0, 1), got {a.fraction}")
    if a.name != "none" and a.fraction == 0:
        raise ConfigError(f"config key 'attack.name'={a.name!r} needs 'attack.fraction' > 0")
    if d.name == "oracle" and a.name == "none":
        raise ConfigError("config key 'defense.name'='oracle' leaves out the malicious clients: it needs an 'attack.name'")
    for key in ("poison_fraction", "neurotoxin_keep"):
        _fraction(f"attack.{key}", getattr(a, key))
    for key in ("scale", "norm_bound", "radius", "boost"):
        _positive(f"attack.{key}", getattr(a, key))
    _positive("attack.noise_std", a.noise_std, allow_zero=True)
    _positive("attack.alie_z", a.alie_z, allow_zero=True)
    _positive("attack.trigger_size", a.trigger_size)
    if a.trigger_size > run.model.image_size:
        raise ConfigError(f"config key 'attack.trigger_size'={a.trigger_size} exceeds model.image_size")
    if not -1 < a.min_cosine < 1:
        raise ConfigError(f"config key 'attack.min_cosine' must be in (-1, 1), got {a.min_cosine}")
    if not re.fullmatch(r"[a-z0-9]+", a.trigger_token):
        raise ConfigError(f"config key 'attack.trigger_token'={a.trigger_token!r} must be one lower-case word")
    if a.target < 0:
        raise ConfigError(f"config key 'attack.target' must be >= 0, got {a.target}")
    for key in ("trusted_fraction", "rejected_fraction", "consensus_weight"):
        if not 0 <= getattr(d, key) < 1:
            raise ConfigError(f"config key 'defense.{key}' must be in [0, 1), got {getattr(d, key)}")
    if d.trusted_fraction + d.rejected_fraction > 1 or d.trusted_fraction == 0:
        raise ConfigError("config keys 'defense.trusted_fraction' (> 0) + 'defense.rejected_fraction' must be <= 1")
    for key in ("pass_early", "pass_late"):
        _fraction(f"defense.{key}", getattr(d, key))
    for key in ("late_round", "warmup_rounds", "num_malicious"):
        _positive(f"defense.{key}", getattr(d, key), allow_zero=True)
    _positive("defense.max_relative_norm", d.max_relative_norm)
    _positive("defense.root_examples", d.root_examples)
    _positive("defense.behaviour_examples", d.behaviour_examples)
    _positive("defense.behaviour_strikes", d.behaviour_strikes)
    _positive("defense.root_finetune_steps", d.root_finetune_steps, allow_zero=True)
    if d.root_finetune_steps and d.root_finetune_steps < 3:
        raise ConfigError(f"config key 'defense.root_finetune_steps' must be 0 (off) or >= 3 (a local step "
                          f"budget, as train.local_steps), got {d.root_finetune_steps}")
    if d.behaviour_max_clients and d.behaviour_max_clients < MIN_BEHAVIOUR_SAMPLE:
        raise ConfigError(f"config key 'defense.behaviour_max_clients' must be 0 (read every client) or >= "
                          f"{MIN_BEHAVIOUR_SAMPLE} (the cohort median needs an honest majority), got {d.behaviour_max_clients}")
    _fraction("defense.behaviour_margin", d.behaviour_margin)
    from fedmm.robustness.attacks import resolve_attack
    from fedmm.core.tasks import task_specs

    attack = resolve_attack(a)
    if attack is not None and attack.data == "backdoor":
        specs = task_specs(run)
        for task in sorted({t for tasks in run.clients.profiles.values() for t in tasks} & specs.keys()):
            if a.target >= specs[task].num_classes:
                raise ConfigError(f"config key 'attack.target'={a.target} is not a label of task {task!r} "
                                  f"({specs[task].num_classes} classes)")
    if not 0 <= d.trim_fraction < 0.5:
        raise ConfigError(f"config key 'defense.trim_fraction' must be in [0, 0.5), got {d.trim_fraction}")


def _validate_dp(run: RunConfig) -> None:
    dp = run.dp
    _positive("dp.noise_multiplier", dp.noise_multiplier, allow_zero=True)
    _positive("dp.clipping_norm", dp.clipping_norm)
    _fraction("dp.target_quantile", dp.target_quantile)
    _positive("dp.clip_norm_lr", dp.clip_norm_lr)
    _positive("dp.clipped_count_stddev", dp.clipped_count_stddev, allow_zero=True)
    if not 0 < dp.delta < 1:
        raise ConfigError(f"config key 'dp.delta' must be in (0, 1), got {dp.delta}")
    if dp.name != "none" and run.defense.name == "oracle":
        raise ConfigError("config key 'dp.name' cannot wrap defense.name=oracle (a bound, not a strategy)")


def _validate_moe(run: RunConfig) -> None:
    m = run.moe
    for key in ("num_experts", "top_k", "expert_r", "expert_alpha", "grpo_group"):
        _positive(f"moe.{key}", getattr(m, key))
    for key in ("balance_weight", "guidance_weight", "grpo_weight", "grpo_kl"):
        _positive(f"moe.{key}", getattr(m, key), allow_zero=True)
    if m.top_k > m.num_experts:
        raise ConfigError(f"config key 'moe.top_k'={m.top_k} exceeds 'moe.num_experts'={m.num_experts}")
    if m.routing == "grpo" and m.fusion_ffn != "experts":
        raise ConfigError("config key 'moe.routing'=grpo needs 'moe.fusion_ffn'=experts (a router to train)")
    if m.routing == "grpo" and m.grpo_group < 2:
        raise ConfigError("config key 'moe.grpo_group' must be >= 2: advantages are relative to the group")


def _validate_async(run: RunConfig) -> None:
    s = run.strategy
    if run.clients.speed_spread < 1:
        raise ConfigError(f"config key 'clients.speed_spread' must be >= 1 (1: equal speeds), got {run.clients.speed_spread}")
    for key in ("concurrency", "buffer_size", "max_staleness"):
        _positive(f"strategy.{key}", getattr(s, key), allow_zero=True)
    _positive("strategy.staleness_exponent", s.staleness_exponent, allow_zero=True)
    if s.mode != "async":
        return
    if s.fraction_train != 1.0:
        raise ConfigError("config key 'strategy.fraction_train' must be 1.0 with strategy.mode=async "
                          "(strategy.concurrency decides how many clients train at once)")
    in_flight = s.concurrency or run.clients.num
    if in_flight > run.clients.num:
        raise ConfigError(f"config key 'strategy.concurrency'={s.concurrency} exceeds clients.num={run.clients.num}")
    if s.buffer_size and not s.min_train_nodes <= s.buffer_size <= in_flight:
        raise ConfigError(f"config key 'strategy.buffer_size'={s.buffer_size} must be between "
                          f"strategy.min_train_nodes ({s.min_train_nodes}) and the clients in flight ({in_flight})")
    if in_flight < s.min_train_nodes:
        raise ConfigError(f"strategy.mode=async keeps {in_flight} clients in flight, fewer than "
                          f"strategy.min_train_nodes={s.min_train_nodes}")
