"""The results folder of a run: config, per-round metrics, checkpoints, plots, summary, terminal view."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.numpy import save_file

from fedmm.core.components import component_order
from fedmm.core.config import load_config, to_dict, to_flat, to_yaml
from fedmm.core.schema import ConfigError, RunConfig
from fedmm.core.state_store import DEFAULT_FOLDER

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy.png"
TRUST_PLOT_FILE = "trust.png"
FEEDBACK_PLOT_FILE = "feedback.png"
EXPERTS_PLOT_FILE = "experts.png"
CHECKPOINTS = "checkpoints"


def checkpoint_path(out: Path, server_round: int) -> Path:
    return out / CHECKPOINTS / f"round-{server_round:04d}.safetensors"


def trust_state_path(out: Path, server_round: int) -> Path:
    return out / CHECKPOINTS / f"round-{server_round:04d}.trust.json"


def async_state_path(out: Path, server_round: int) -> Path:
    """Asynchronous rounds: the simulated clock and the jobs in flight after a round."""
    return out / CHECKPOINTS / f"round-{server_round:04d}.async.json"


def strategy_state_path(out: Path, server_round: int) -> Path:
    """A per-component Flower strategy's state (optimiser moments and the like) after a round."""
    return out / CHECKPOINTS / f"round-{server_round:04d}.strategy.safetensors"


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(path)  # a crash mid-write never leaves a truncated checkpoint behind


class RunResults:
    """The results folder. A fresh run starts it empty; with `run.resume` it keeps the rounds that
    completed (`last_round`) and drops anything after them."""

    def __init__(self, out: str | Path, run: RunConfig,
                 state_paths: tuple[Callable[[Path, int], Path], ...] = ()) -> None:
        """`state_paths`: files besides the checkpoint that a round after round 0 must have written to
        count as complete (the defence's and the strategy's state)."""
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = []
        self.last_round = 0
        # A rerun into the same folder must not leave an earlier run's results looking like its own.
        for stale in (SUMMARY_FILE, PLOT_FILE, TRUST_PLOT_FILE, EXPERTS_PLOT_FILE):
            (self.out / stale).unlink(missing_ok=True)
        if run.resume:
            self._resume(run, state_paths)
            return
        for old in (self.out / CHECKPOINTS).glob("round-*"):
            old.unlink()
        if not run.personal.state_dir:  # the default store lives here; a fresh run starts without it
            shutil.rmtree(self.out / DEFAULT_FOLDER, ignore_errors=True)
        (self.out / CONFIG_FILE).write_text(to_yaml(run))
        (self.out / METRICS_FILE).write_text("")

    def _resume(self, run: RunConfig, state_paths: tuple[Callable[[Path, int], Path], ...]) -> None:
        config = self.out / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"cannot resume: {str(config)!r} does not exist (no run was started in {str(self.out)!r})")
        stored, wanted = to_flat(load_config(config)), to_flat(run)
        differ = sorted(k for k in stored.keys() | wanted.keys()
                        if k not in ("resume", "out") and stored.get(k) != wanted.get(k))
        if differ:
            raise ConfigError(f"cannot resume the run in {str(self.out)!r}: config keys differ from its "
                              f"config.yaml: {differ[:8]}")
        rows = []
        for line in (self.out / METRICS_FILE).read_text().splitlines() if (self.out / METRICS_FILE).is_file() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when the server was killed
                break
        rounds = {r["round"] for r in rows if "stage" not in r}
        complete = [r for r in sorted(rounds) if checkpoint_path(self.out, r).is_file()
                    and (r == 0 or all(path(self.out, r).is_file() for path in state_paths))]
        if not complete:
            raise ConfigError(f"cannot resume the run in {str(self.out)!r}: no round completed")
        self.last_round = complete[-1]
        self.history = [r for r in rows if "stage" not in r and r["round"] <= self.last_round]
        with open(self.out / METRICS_FILE, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in self.history)
        for path in (self.out / CHECKPOINTS).glob("round-*"):
            if int(path.name.split("-")[1].split(".")[0]) > self.last_round:
                path.unlink()

    def log_round(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")

    def checkpoint(self, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        save_checkpoint(checkpoint_path(self.out, server_round), arrays)

    def plot(self) -> Path:
        plt = _pyplot()
        tasks = sorted({k.split(".")[1] for r in self.history for k in r if k.startswith("global.")})
        fig, ax = plt.subplots(figsize=(6, 4))
        for task in tasks:
            key = f"global.{task}.accuracy"
            points = [(r["round"], r[key]) for r in self.history if key in r and "stage" not in r]
            ax.plot(*zip(*points), marker="o", label=task)
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        return _save(fig, self.out / PLOT_FILE)

    def plot_trust(self, clients: int, malicious: set[int]) -> Path | None:
        """Clients x rounds heatmap of trust scores (blank where a client was not scored); malicious
        clients' rows are marked on the axis (the simulator knows them, the defence does not)."""
        matrix = trust_matrix(self.history, clients)
        if matrix.shape[1] == 0:
            return None
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(min(2.5 + 0.35 * matrix.shape[1], 16), min(1.5 + 0.22 * clients, 16)))
        image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=(0.5, matrix.shape[1] + 0.5, clients - 0.5, -0.5))
        if clients <= 60:  # beyond that the labels would overlap
            ax.set_yticks(range(clients), [f"{c}{' *' if c in malicious else ''}" for c in range(clients)])
        ax.set_xlabel("round")
        ax.set_ylabel("client (* malicious)")
        fig.colorbar(image, ax=ax, label="trust score")
        return _save(fig, self.out / TRUST_PLOT_FILE)

    def plot_experts(self) -> Path | None:
        """Modality x expert heatmap: each expert's share of a modality's routed tokens over the run."""
        modalities, experts, matrix = expert_utilisation(self.history)
        if not experts:
            return None
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(min(3 + 0.6 * len(experts), 16), 1.5 + 0.5 * len(modalities)))
        image = ax.imshow(matrix, aspect="auto", cmap="magma", vmin=0, vmax=max(float(matrix.max()), 1e-9))
        ax.set_xticks(range(len(experts)), [e.replace(".expert.", " ") for e in experts], rotation=90)
        ax.set_yticks(range(len(modalities)), modalities)
        ax.set_xlabel("expert (where, layer.expert)")
        fig.colorbar(image, ax=ax, label="share of the modality's routed tokens")
        return _save(fig, self.out / EXPERTS_PLOT_FILE)

    def plot_feedback(self) -> Path | None:
        """A language-model run's rounds: held-out first-try accuracy (evaluation), first-try accuracy
        on the arrivals and revision success (training), wins and loses per round."""
        rows = [r for r in self.history if "train.feedback.prompts" in r and "stage" not in r]
        if not rows:
            return None
        plt = _pyplot()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        held_out = [(r["round"], r["global.arithmetic.accuracy"]) for r in self.history
                    if "global.arithmetic.accuracy" in r and "stage" not in r]
        if held_out:
            left.plot(*zip(*held_out), marker="o", label="held-out first try (greedy)")
        for key, label in (("first-try-accuracy", "arrivals, first try (sampled)"),
                           ("revision-success", "revision success")):
            left.plot([r["round"] for r in rows], [r[f"train.feedback.{key}"] for r in rows], marker=".", label=label)
        left.set_ylim(0, 1)
        left.set_xlabel("round")
        left.legend(fontsize=8)
        for key in ("wins", "loses"):
            right.plot([r["round"] for r in rows], [r[f"train.feedback.{key}"] for r in rows], marker=".", label=key)
        right.set_xlabel("round")
        right.set_ylabel("pairs over the round's clients")
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.grid(alpha=0.3)
        return _save(fig, self.out / FEEDBACK_PLOT_FILE)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.out / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=_jsonable))
        return path


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def trust_matrix(history: list[dict[str, Any]], clients: int) -> np.ndarray:
    """clients x rounds trust scores from the rounds' `trust` reports (NaN where a client was not scored)."""
    rounds = [r for r in history if "trust" in r and "stage" not in r]
    out = np.full((clients, len(rounds)), math.nan)
    for j, record in enumerate(rounds):
        for client, entry in record["trust"].items():
            if entry.get("trust") is not None and 0 <= int(client) < clients:
                out[int(client), j] = entry["trust"]
    return out


def expert_utilisation(history: list[dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """(modalities, experts, matrix): tokens routed over the whole run, as each expert's share of its
    modality's tokens in the expert's layer, from the rounds' `train.moe.routed.*` counts."""
    prefix = "train.moe.routed."
    totals: dict[tuple[str, str], float] = {}
    for record in history:
        for key, value in record.items():
            if key.startswith(prefix):
                modality, expert = key[len(prefix):].split(".", 1)
                totals[modality, expert] = totals.get((modality, expert), 0.0) + value
    modalities = sorted({m for m, _ in totals})
    experts = sorted({e for _, e in totals}, key=component_order)
    matrix = np.zeros((len(modalities), len(experts)))
    for (m, e), n in totals.items():
        matrix[modalities.index(m), experts.index(e)] = n
    for i, _ in enumerate(modalities):
        for layer in {e.rsplit(".", 1)[0] for e in experts}:
            cols = [j for j, e in enumerate(experts) if e.rsplit(".", 1)[0] == layer]
            matrix[i, cols] /= max(matrix[i, cols].sum(), 1.0)
    return modalities, experts, matrix


def detection_scores(history: list[dict[str, Any]], malicious: set[int]) -> dict[str, float | None]:
    """Precision and recall of the defence's exclusions over client-rounds: a client-round is flagged
    when the client's update was not aggregated; positives are the malicious clients' rounds. None
    where undefined (nothing flagged, no attacker)."""
    flagged = hits = positives = 0
    for record in history:
        for client, entry in record.get("trust", {}).items():
            bad = int(client) in malicious
            dropped = entry["decision"] != "aggregated"
            positives += bad
            flagged += dropped
            hits += bad and dropped
    return {"detection.precision": hits / flagged if flagged else None,
            "detection.recall": hits / positives if positives else None,
            "detection.client_rounds_flagged": float(flagged), "detection.client_rounds_malicious": float(positives)}


class RunFailed(RuntimeError):
    """The run finished and wrote its results folder, but did not do what it was asked to
    (`run_problems`); `summary.json` has the reasons under `problems`."""


def run_problems(history: list[dict[str, Any]], min_train_nodes: int, never_changed: list[str]) -> list[str]:
    """Why a finished run failed, or []: a round with fewer than `min_train_nodes` usable replies (the
    rest rejected, missing or never sampled), and components the run never changed."""
    problems = []
    for record in history:
        if record.get("stage") or record["round"] == 0:
            continue
        usable = record.get("train.clients-usable", record.get("train.clients-accepted", 0))
        if usable < min_train_nodes:
            kinds = ", ".join(f"{k.split('.', 2)[2]} {v}" for k, v in sorted(record.items())
                              if k.startswith("train.rejected."))
            problems.append(f"round {record['round']}: {usable} usable replies, fewer than "
                            f"strategy.min_train_nodes={min_train_nodes} ({record.get('train.clients-sampled', 0)} "
                            f"sampled, {record.get('train.clients-rejected', 0)} rejected{': ' + kinds if kinds else ''}, "
                            f"{record.get('train.clients-missing', 0)} missing)")
    if never_changed:
        declined = sum(r.get("train.components-declined", 0) for r in history)
        why = f"; the robust rule declined {declined} component-rounds" if declined else ""
        problems.append(f"components the run never changed: {', '.join(never_changed)}{why}")
    return problems


def summary_dict(run: RunConfig, history: list[dict[str, Any]], full_model_bytes: int,
                 trainable_bytes: int) -> dict[str, Any]:
    first, last = history[0], history[-1]
    uplink_replies = sum(r.get("uplink.replies", 0) for r in history)
    uplink_mean = sum(r.get("uplink.bytes", 0) for r in history) / uplink_replies if uplink_replies else 0.0
    summary: dict[str, Any] = {
        "rounds": run.rounds,
        "clients": run.clients.num,
        "config": to_dict(run),
        "bytes.full_model": full_model_bytes,
        "bytes.trainable_global": trainable_bytes,
        "bytes.uplink_per_client_round_mean": float(uplink_mean),
        "bytes.uplink_client_rounds": int(uplink_replies),
    }
    summary["bytes.uplink_fraction_of_full_model"] = summary["bytes.uplink_per_client_round_mean"] / full_model_bytes
    for stage, record in (("initial", first), ("final", last)):
        for key, value in record.items():
            if (key.startswith(("global.", "personal.", "backdoor.", "attack."))
                    and isinstance(value, float) and not math.isnan(value)):
                summary[f"{stage}.{key}"] = value
    rounds = [r for r in history if "train.moe.experts-sent-fraction" in r]
    if rounds:  # experts sent / held, averaged over client-rounds
        weights = [r["train.clients-accepted"] for r in rounds]
        summary["moe.experts_sent_fraction"] = float(np.average(
            [r["train.moe.experts-sent-fraction"] for r in rounds], weights=weights))
        summary["moe.routing_entropy_final"] = rounds[-1].get("train.moe.routing-entropy")
    summary["personal.method"] = run.personal.method
    summary["clients_rejected_total"] = int(sum(r.get("train.clients-rejected", 0) for r in history))
    return summary


def print_table(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="global test accuracy")
    table.add_column("task")
    table.add_column("initial", justify="right")
    table.add_column("final", justify="right")
    table.add_column("gain", justify="right")
    tasks = sorted({k.split(".")[2] for k in summary if k.startswith("final.global.") and k.endswith(".accuracy")})
    for task in tasks:
        a = summary.get(f"initial.global.{task}.accuracy", float("nan"))
        b = summary[f"final.global.{task}.accuracy"]
        table.add_row(task, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}")
    console.print(table)
    console.print(
        f"uplink per client-round: {summary['bytes.uplink_per_client_round_mean'] / 1e3:.1f} kB "
        f"({100 * summary['bytes.uplink_fraction_of_full_model']:.2f}% of the full model, "
        f"{summary['bytes.full_model'] / 1e6:.2f} MB)"
    )
