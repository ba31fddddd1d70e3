"""Mixture-of-experts fine-tuning: dense LoRA against MoE-LoRA and MoE-LoRA with GRPO routing.

Runs `fedmm simulate` (Flower's Simulation Engine, Ray) on the default federation (12 clients: image,
text and multimodal profiles, 12 rounds) once per variant and seed. Every variant freezes the same
fusion feed-forward weights and adapts them: one LoRA adapter (`moe.fusion_ffn=lora`), LoRA experts
behind the modality-aware top-k router (`experts`), and the same with the router also trained as a
policy (`moe.routing=grpo`). `full` (the fusion feed-forward trained outright, fedmm's default) is run
for context. Accuracy is the final global test accuracy averaged over the three tasks, then over seeds.

Writes `moe.md` and `moe.json`; prints one JSON line per run and, as its last line, a JSON object
with `dense_lora_accuracy`, `moe_lora_accuracy`, `moe_grpo_accuracy`, `moe_uplink_experts_fraction`
(experts sent / experts held, averaged over client-rounds) and the trainable parameters of each.

    python benchmarks/moe.py --seeds 2 --out results/moe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runs import simulate_cached  # noqa: E402
from fedmm.core.config import load_config  # noqa: E402
from fedmm.models.model import server_model  # noqa: E402

VARIANTS = {
    "dense_lora": ["moe.fusion_ffn=lora"],
    "moe_lora": ["moe.fusion_ffn=experts"],
    "moe_grpo": ["moe.fusion_ffn=experts", "moe.routing=grpo"],
    "full_ffn": ["moe.fusion_ffn=full"],
}
TASKS = ("img_shape", "txt_color", "vqa")


def trainable_parameters(overrides: list[str]) -> dict[str, int]:
    """Trainable parameters of the server's model: all of them and the fusion block's."""
    model = server_model(load_config(overrides=overrides))
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return {"all": sum(n for _, n in trainable), "fusion": sum(n for name, n in trainable if name.startswith("fusion."))}


def run_one(variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    start = time.monotonic()
    summary = simulate_cached(out / f"{variant}-seed{seed}", [*VARIANTS[variant], f"seed={seed}", *extra])
    result = {"variant": variant, "seed": seed, "seconds": round(time.monotonic() - start, 1),
              **{task: summary[f"final.global.{task}.accuracy"] for task in TASKS}}
    result["accuracy"] = float(np.mean([result[t] for t in TASKS]))
    result["uplink_bytes"] = summary["bytes.uplink_per_client_round_mean"]
    if "moe.experts_sent_fraction" in summary:
        result["experts_sent_fraction"] = summary["moe.experts_sent_fraction"]
        result["routing_entropy_final"] = summary["moe.routing_entropy_final"]
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict], params: dict[str, dict[str, int]]) -> str:
    lines = ["| variant | " + " | ".join(TASKS) + " | mean accuracy | trainable (fusion) | uplink kB |",
             "|---" * (len(TASKS) + 4) + "|"]
    for variant in VARIANTS:
        mine = [r for r in results if r["variant"] == variant]
        cells = [f"{np.mean([r[k] for r in mine]):.3f} ± {np.std([r[k] for r in mine]):.3f}"
                 for k in (*TASKS, "accuracy")]
        p = params[variant]
        uplink = np.mean([r["uplink_bytes"] for r in mine]) / 1e3
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {p['all']:,} ({p['fusion']:,}) | {uplink:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="results/moe")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(v, seed, out, args.overrides) for seed in range(args.seeds) for v in VARIANTS]
    params = {v: trainable_parameters([*VARIANTS[v], *args.overrides]) for v in VARIANTS}
    (out / "moe.md").write_text(table(results, params) + "\n")

    def mean(variant: str, key: str) -> float:
        return float(np.mean([r[key] for r in results if r["variant"] == variant]))

    final = {f"{v}_accuracy": mean(v, "accuracy") for v in VARIANTS}
    final["moe_uplink_experts_fraction"] = mean("moe_lora", "experts_sent_fraction")
    final["moe_grpo_uplink_experts_fraction"] = mean("moe_grpo", "experts_sent_fraction")
    final.update({f"{v}_trainable_parameters": params[v]["all"] for v in VARIANTS})
    final.update({"seeds": args.seeds, "overrides": args.overrides})
    (out / "moe.json").write_text(json.dumps({"runs": results, "summary": final}, indent=2))
    print(table(results, params))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
