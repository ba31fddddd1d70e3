"""The run configuration's schema: every section, key and default, as dataclasses.

`fedmm.core.config` loads and checks a run config against it; modules that only need the types
import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config key is unknown or holds a bad value."""


DEFAULT_PROFILES: dict[str, list[str]] = {
    "image": ["img_shape"],
    "text": ["txt_color"],
    "multimodal": ["vqa", "img_shape", "txt_color"],
}


@dataclass
class ModelConfig:
    # fedmm:<name> (a base shipped with fedmm), a `fedmm pretrain` output folder, a Hugging Face model id or
    # local path; empty builds a small random encoder from the sizes below (frozen: it learns nothing).
    image_encoder: str = "fedmm:scenes"
    text_encoder: str = "fedmm:scenes"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    image_size: int = 32
    patch_size: int = 8
    max_text_length: int = 16
    fusion_dim: int = 32
    fusion_layers: int = 1
    fusion_heads: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Names of attention projections to adapt; ViT in transformers 5 calls them q_proj/v_proj, BERT query/value.
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value", "q_proj", "v_proj"])
    # A causal LM fine-tuned from feedback instead of the multi-modal model (needs data.source=arithmetic):
    # fedmm:arith-lm (shipped), a save_pretrained folder or a hub id; LoRA of model.lora_r / lora_alpha /
    # lora_dropout on its attention and MLP projections. Empty: the multi-modal model.
    language_model: str = ""


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | hf | arithmetic (generated prompts for model.language_model)
    # Synthetic data: examples generated per task, shared out among the clients holding it.
    examples_per_task: int = 1800
    # > 0: each client's examples are generated from its own id when it first needs them, this many per
    # task (label mix iid, or its own Dirichlet(alpha) draw): no task-wide dataset, so any number of clients.
    examples_per_client: int = 0
    partitioner: str = "dirichlet"  # iid | dirichlet
    dirichlet_alpha: float = 1.0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # Hugging Face dataset (source=hf): name or local path, split, and the column mapping.
    hf_name: str = ""
    hf_split: str = "train"
    hf_task: str = "hf_task"
    hf_image_column: str = ""
    hf_text_column: str = ""
    hf_label_column: str = "label"
    hf_num_classes: int = 0


@dataclass
class ClientsConfig:
    num: int = 12
    # Profile name -> tasks. Empty means DEFAULT_PROFILES. Client i gets profile i mod #profiles.
    profiles: dict[str, list[str]] = field(default_factory=dict)
    # LoRA rank per client: client i gets lora_ranks[i mod len], each at most model.lora_r (the global
    # adapter's rank); empty means model.lora_r for every client. Under deployment, node config `lora-r`.
    lora_ranks: list[int] = field(default_factory=list)
    # Simulated speeds: client i's jobs take a log-uniform factor in [1, speed_spread] of simulated
    # seconds (seeded; 1 = all equal). Sync rounds wait for the slowest; async rounds do not.
    speed_spread: float = 1.0
    # Ray resources per simulated client.
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class TrainConfig:
    local_steps: int = 45  # optimizer steps per round; 0 means use local_epochs
    local_epochs: float = 0.0
    batch_size: int = 16
    lr: float = 6e-3
    lr_schedule: str = "cosine"  # constant | cosine
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on a GPU that supports it) | fp32 | bf16
    # What a language-model client learns from (model.language_model): spear | feedback_sft (spear without
    # unlikelihood) | rejection_sft (first-try wins only) | grpo. The multi-modal model: supervised.
    objective: str = "supervised"


@dataclass
class StrategyConfig:
    # "fedmm" (per-component aggregation) or an import path of a Flower strategy class,
    # e.g. flwr.serverapp.strategy.FedAdam, run once per component over that component's holders.
    name: str = "fedmm"
    # Keyword arguments of that class, as text converted by its signature (`strategy.args.eta=0.01`;
    # flat run configs carry them as one string, "eta=0.01; beta_1=0.9").
    args: dict[str, str] = field(default_factory=dict)
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    # How fedmm's per-component FedAvg combines LoRA factors: factors (the mean of A and of B, zero-padded
    # across ranks: HetLoRA's), qr (the exact weighted sum of B·A, best rank model.lora_r by QR + a small
    # SVD; each client takes its leading terms), dense_svd (the same sum by a dense SVD: FlexLoRA's, slow).
    lora_aggregation: str = "factors"
    # sync: rounds of sampled clients; async: keep `concurrency` clients busy (0: all) and aggregate each
    # `buffer_size` replies (0: a third of those in flight, at least min_train_nodes), each discounted
    # by (1 + staleness)^-staleness_exponent, replies staler than max_staleness versions dropped.
    mode: str = "sync"
    # async: arrivals on the simulated clock (reproducible, resumable exactly) or as they really come
    # (real: a deployment's own speeds).
    async_clock: str = "simulated"
    concurrency: int = 0
    buffer_size: int = 0
    max_staleness: int = 5
    staleness_exponent: float = 0.5
    fraction_evaluate: float = 1.0
    fraction_final: float = 1.0  # share of clients in the final measurement (after personalization)
    reply_timeout: float = 0.0  # seconds to wait for replies, per batch of 256 messages; 0 waits for all
    # A round with fewer than min_train_nodes usable replies, or a component the run never changed,
    # fails the run (after everything is written) unless this is true.
    allow_degraded: bool = False


@dataclass
class PersonalConfig:
    # How each client gets its personal model: fedavg (the global model), fedavg_ft (the final global
    # model fine-tuned locally), local (trained only on local data), tap_no_distill (TAP's replacement
    # stage), tap (replacement, then the post-FL distillation stage).
    method: str = "fedavg"
    criterion: str = "validation"  # loss compared by the replacement rule: validation | train
    margin: float = 0.01  # replace when teacher_loss + margin < personal_loss
    task_margins: str = ""  # per-task margins, e.g. "vqa=0.02,txt_color=0.005"
    steps: int = 0  # personal-model optimizer steps per participation; 0 means train.local_steps
    state_dir: str = ""  # client state store; empty means <out>/client_state
    teacher_steps: int = 10  # fine-tuning of the final global model (the teacher, and fedavg_ft)
    distill_steps: int = 50
    distill_temperature: float = 1.0
    distill_weight: float = 1.0
    distill_batch: int = 0  # clients per distillation message batch; 0 means all at once
    distill_gate: bool = True  # validation guards distillation: teacher must beat the personal model, student must improve on it


@dataclass
class AttackConfig:
    # none, a built-in attack (see fedmm.robustness.attacks.ATTACKS), or `module:function` for your own model attack.
    name: str = "none"
    fraction: float = 0.0  # share of clients that are malicious (chosen by seed; the defence never sees it)
    data: str = "auto"  # data poisoning of malicious clients: auto (what the attack uses) | none | backdoor | label_flip
    target: int = 0  # backdoor target label
    poison_fraction: float = 0.5  # share of a malicious client's training examples that get the trigger
    trigger_size: int = 3  # side of the white square patch in the image's bottom-right corner
    trigger_token: str = "cf"  # word put in front of the text
    scale: float = 10.0  # scaling: update x scale ...
    norm_bound: float = 2.0  # ... clipped to norm_bound x its own norm
    noise_std: float = 1.0  # gaussian: noise std relative to the update's RMS
    radius: float = 1.0  # euclidean: distance from the benign estimate, relative to its norm
    min_cosine: float = 0.9  # cosine: least cosine similarity to the benign estimate
    neurotoxin_keep: float = 0.7  # neurotoxin: share of coordinates (least changed by benign updates) kept
    boost: float = 1.5  # neurotoxin: factor on the kept coordinates
    alie_z: float = 0.0  # alie: deviation in stds; 0 derives it from the numbers of clients


@dataclass
class DefenseConfig:
    name: str = "none"  # none | trust | krum | multikrum | bulyan | median | trimmed_mean | fltrust | flame | oracle
    trusted_fraction: float = 0.5  # trust: top share by score, aggregated outright
    rejected_fraction: float = 0.0  # trust: bottom share, dropped outright; the rest below the trusted share is inspected layer-wise
    pass_early: float = 0.4  # trust: share of layers a suspicious client must pass ...
    pass_late: float = 0.6  # ... before and after round `late_round`
    late_round: int = 5
    warmup_rounds: int = 3  # trust: reputation drops clients only after this many rounds
    consensus_weight: float = 0.3  # trust: share of a client's score given to its mean direction over its non-head components
    max_relative_norm: float = 100.0  # trust: updates larger than this x the median update norm, or x the component's own norm, are rejected outright
    num_malicious: int = 0  # krum / multikrum / bulyan: assumed attackers per component; 0 = 30% of holders
    trim_fraction: float = 0.2  # trimmed_mean: share cut from each end
    root_examples: int = 100  # fltrust: clean examples per task the server trains on
    behaviour: bool = True  # trust: search each client's model for a universal trigger on the root set
    behaviour_examples: int = 32  # trust: root examples per task the trigger search reads
    behaviour_margin: float = 0.3  # trust: how far above the cohort median trigger lift a client is caught
    behaviour_strikes: int = 2  # trust: times caught in its last 10 rounds that hold a client out
    behaviour_max_clients: int = 0  # trust: clients the behaviour check reads per round (a seeded uniform draw, >= 5); 0 = all
    clip_to_median: bool = False  # trust: scale each kept update down to the median norm of the kept ones, per component
    root_finetune_steps: int = 15  # trust: steps the server trains the aggregated model on its root set each round; 0 = off


@dataclass
class DpConfig:
    # Central differential privacy: Flower's clipping wrapper around each component's strategy.
    # none | server-fixed | server-adaptive | client-fixed | client-adaptive (client-side: the node clips)
    name: str = "none"
    noise_multiplier: float = 1.0  # sigma: noise std over the clipping norm (adaptive: update and count noise together)
    clipping_norm: float = 1.0  # fixed: the bound on each component's update norm; adaptive: its starting value
    target_quantile: float = 0.5  # adaptive: share of updates the norm should leave unclipped
    clip_norm_lr: float = 0.2  # adaptive: step of the norm's geometric update
    clipped_count_stddev: float = 0.0  # adaptive: noise on the count of clipped updates; 0 = Flower's default (clients / 20)
    delta: float = 1e-5  # the delta at which the run's epsilon is reported


@dataclass
class MoEConfig:
    # The fusion block's feed-forward part: full (trained outright), lora (frozen, one LoRA adapter),
    # experts (frozen, `num_experts` LoRA experts behind a modality-aware top-k router).
    fusion_ffn: str = "full"
    num_experts: int = 4
    top_k: int = 2
    expert_r: int = 8  # rank of each expert's (and the dense adapter's) LoRA factors
    expert_alpha: int = 16
    balance_weight: float = 0.01  # load-balancing auxiliary loss (Switch: E * sum_e f_e * P_e)
    guidance_weight: float = 0.01  # modality guidance: penalises router mass on experts a modality rarely uses
    routing: str = "topk"  # topk | grpo (routing also trained as a policy by group-relative policy optimisation)
    grpo_group: int = 4  # sampled routings per batch
    grpo_weight: float = 0.1  # weight of the policy loss
    grpo_kl: float = 0.05  # weight of the KL to the round's starting (received) router


@dataclass
class FeedbackConfig:
    # Online fine-tuning from feedback (train.objective spear and its baselines), per client and round.
    prompts_per_round: int = 64  # prompts arriving at a client each round, drawn from its partition
    temperature: float = 0.8  # sampling of every attempt
    top_p: float = 0.95
    max_new_tokens: int = 48  # a longer completion is cut there and counts as over-long
    max_revisions: int = 2  # revisions after a wrong attempt, each prompted with it and the feedback
    lose_ratio: float = 2.0  # loses kept per win, at most
    win_weight: float = 1.0  # lambda_win on the MLE of wins
    # lambda_lose on the confidence-weighted unlikelihood of loses (SPEAR's reference: 0.1), on `ul_tokens`
    # tokens (0: all) of a lose's working: from where it departs from the revision that fixed it
    # (divergence: the slip itself; a lose nothing fixed gets none; feedback: else from where it departs
    # from the working the hint showed, measured 0.04 worse), or its last ones (last: the reference's
    # 24-32 tokens of long answers). On fedmm:arith-lm the last tokens of a wrong working are often right
    # arithmetic after an earlier slip, and pushing them down cost 0.05 of held-out accuracy.
    lose_weight: float = 0.1
    ul_window: str = "divergence"
    ul_tokens: int = 2
    ul_threshold: float = 0.3  # ... only where the model gives the token probability above this
    grpo_group: int = 4  # grpo: samples per prompt
    grpo_clip: float = 0.2
    grpo_kl: float = 0.02  # grpo: weight of the KL to the round's received model


@dataclass
class RunConfig:
    seed: int = 0
    rounds: int = 12
    out: str = ""  # results folder; required by `fedmm simulate --out`
    resume: bool = False  # continue the run in `out` from its last complete round (its config must match)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)


# `oracle` is no defence: it leaves out exactly the simulated attackers, the bound for any defence that drops clients.
