"""Robustness: clean accuracy and attack success for every attack x every defence, fixed seeds.

Runs `fedmm simulate` (Ray) once per (attack, defence, seed) on one setting: 20 clients of the
default three profiles, 30% malicious, Dirichlet 0.5, 20 rounds. Writes `robustness.md` and
`robustness.json` to --out and prints the JSON summary as its last line. Clean accuracy is the
final global accuracy averaged over tasks; attack success is the backdoor success rate (triggered
test inputs whose true label is not the target, classified as the target) where the attack plants
a backdoor. The `none` row poisons nothing but still measures the trigger: its success there is the
base rate a defence cannot go below (a model's errors that happen to fall on the target class). A
run whose folder holds a finished run of the same config and code version is read back: by default
the folders of benchmarks/records/robustness, whose summaries and code stamps are kept in git, so a
part of the grid run on one machine counts on another (`--recorded` writes the table of what is
recorded for the code as it is now, running nothing).

The full grid is 10 x 9 runs per seed at the default model (hours on 2 CPUs); `--attacks` and
`--defenses` pick a part of it, and `--small` shrinks the model and the data for a quick pass.

    python benchmarks/robustness.py --attacks backdoor scaling --defenses none trust median
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.runs import CODE_VERSION_FILE, ROOT, recorded, simulate_cached  # noqa: E402
from fedmm.robustness.attacks import ATTACKS  # noqa: E402
from fedmm.core.config import DEFENSES  # noqa: E402

# A user's attack by module:function: the data backdoor, with updates that imitate benign statistics.
USER_ATTACKS = {"mimicry": ["attack.name=benchmarks.user_attack:backdoor_mimicry", "attack.data=backdoor"]}
ATTACK_NAMES = ("none", *ATTACKS, *USER_ATTACKS)
SETTING = ["clients.num=20", "data.dirichlet_alpha=0.5", "rounds=20", "data.examples_per_task=3000"]
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "train.local_steps=15", "rounds=12"]
TASKS = ("img_shape", "txt_color", "vqa")


def run_one(attack: str, defense: str, seed: int, out: Path, extra: list[str], run: bool = True) -> dict | None:
    # allow_degraded: a run whose defence froze a component is recorded and flagged in the table, not fatal.
    overrides = [*SETTING, f"defense.name={defense}", f"seed={seed}", "strategy.allow_degraded=true", *extra]
    if attack == "none":  # nobody poisons; the trigger is still measured: its base rate
        overrides += ["attack.name=backdoor", "attack.data=none", "attack.fraction=0.3"]
    else:
        overrides += [*USER_ATTACKS.get(attack, [f"attack.name={attack}"]), "attack.fraction=0.3"]
    # Another setting (--small, extra overrides) gets folders of its own: it must not overwrite the grid's.
    setting = "" if not extra else "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8]
    folder = out / f"{attack}-{defense}-seed{seed}{setting}"
    summary = simulate_cached(folder, overrides) if run else recorded(folder, overrides)
    if summary is None:
        return None
    result = {
        "attack": attack, "defense": defense, "seed": seed,
        "clean_accuracy": float(np.mean([summary[f"final.global.{t}.accuracy"] for t in TASKS])),
        "attack_success": summary.get("final.attack.success_rate"),
        "detection_precision": summary.get("detection.precision"),
        "detection_recall": summary.get("detection.recall"),
        "problems": summary.get("problems", []),
        "code_version": (folder / CODE_VERSION_FILE).read_text().strip(),
    }
    print(json.dumps(result), flush=True)
    return result


def _cell(values: list[float | None]) -> str:
    """Mean, and ± the standard deviation over seeds where there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")


def table(results: list[dict], attacks: list[str], defenses: list[str]) -> str:
    """Rows: attacks; columns: defences; each cell clean accuracy / attack success (mean over seeds).
    A trust cell that loses to the best baseline (the oracle is none) on attack success is marked, and
    so is one above 0.05, noting when that is within 0.02 of trust's base rate (the `none` row)."""
    lines = ["| attack | " + " | ".join(defenses) + " |", "|---" * (len(defenses) + 1) + "|"]
    base = [r["attack_success"] for r in results if r["attack"] == "none" and r["defense"] == "trust"
            and r["attack_success"] is not None]
    for attack in attacks:
        cells, success = [], {}
        for defense in defenses:
            mine = [r for r in results if r["attack"] == attack and r["defense"] == defense]
            acc = _cell([r["clean_accuracy"] for r in mine])
            asr = [r["attack_success"] for r in mine if r["attack_success"] is not None]
            success[defense] = float(np.mean(asr)) if asr else None
            cells.append(f"{acc} / {_cell(asr)}")
            if any(r.get("problems") for r in mine):
                # A model that stopped learning also stops learning the backdoor: not a defence's success.
                cells[-1] += " (frozen)"
        if attack != "none" and "trust" in defenses and success.get("trust") is not None:
            others = [v for d, v in success.items() if d not in ("trust", "none", "oracle") and v is not None]
            i = defenses.index("trust")
            if others and success["trust"] > min(others) + 0.01:
                cells[i] += " (loses)"
            if success["trust"] > 0.05:
                at_base = base and success["trust"] <= float(np.mean(base)) + 0.02
                cells[i] += " (fails, at the base rate)" if at_base else " (fails)"
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), choices=ATTACK_NAMES)
    parser.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="a smaller model and fewer rounds (a quick pass)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "records" / "robustness"))
    parser.add_argument("--recorded", action="store_true",
                        help="run nothing: the table of the cells recorded in --out for the code as it is now")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1 (seeds 0 to K-1 run), not {args.seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [*(SMALL if args.small else []), *args.overrides]
    results = [r for s in range(args.seeds) for a in args.attacks for d in args.defenses
               if (r := run_one(a, d, s, out, extra, run=not args.recorded)) is not None]
    asked = args.seeds * len(args.attacks) * len(args.defenses)
    setting = " ".join([*SETTING, *extra, "attack.fraction=0.3"])
    md = (f"Clean accuracy (mean over tasks) / attack success rate, mean ± std over seeds 0-{args.seeds - 1} "
          f"({len(results)} of the {asked} runs recorded; – where none is); `{setting}`. (fails): trust "
          f"scoring lets the attack succeed above 0.05; (loses): a baseline holds the attack lower; (frozen): in some seed the defence left a component unchanged for "
          f"the whole run or a round without enough usable replies, so its low attack success is no "
          f"evidence. The `none` row poisons nothing: its success is the "
          f"trigger's base rate. `oracle` leaves out exactly the attackers: the best any defence "
          f"that drops clients can do.\n\n{table(results, args.attacks, args.defenses)}\n")
    (out / "robustness.md").write_text(md)
    (out / "robustness.json").write_text(json.dumps(results, indent=2))
    print(md)
    print(json.dumps({"benchmark": "robustness", "setting": setting, "results": results}))


if __name__ == "__main__":
    main()
