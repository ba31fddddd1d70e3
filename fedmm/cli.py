"""The `fedmm` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from fedmm.core.config import load_config
from fedmm.core.schema import ConfigError, RunConfig


def hidden_gpu_note(run: RunConfig) -> str | None:
    """What to tell a user whose GPU the simulated clients cannot see: Ray hides GPUs from actors that
    ask for none, so `train.device=auto` trains on the CPU there."""
    import torch

    if run.clients.num_gpus > 0 or run.train.device == "cpu" or not torch.cuda.is_available():
        return None
    return ("a GPU is present, but clients.num_gpus=0 hides it from the simulated clients (Ray): they "
            "train on the CPU; set clients.num_gpus (e.g. 0.25: four clients share it) to use it")


def simulate(run: RunConfig, ray_address: str = "") -> None:
    """Run the ServerApp and ClientApps on Flower's Simulation Engine (Ray backend)."""
    from flwr.simulation import run_simulation

    from fedmm.engine.ray_cluster import ray_init_args
    from fedmm.engine.simulation_engine import use_single_pass_poller

    note = hidden_gpu_note(run)
    if note:
        print(f"fedmm: {note}", file=sys.stderr)

    use_single_pass_poller()  # Flower's own poller costs nodes x messages per sweep
    # The apps are looked up by module name so the core package does not depend on them.
    importlib.import_module("server_app.runner").check_strategy(run)
    server_app = importlib.import_module("server_app.app").make_server_app(run)
    client_app = importlib.import_module("client_apps.app").make_client_app(run)
    backend_config = {
        "client_resources": {"num_cpus": run.clients.num_cpus, "num_gpus": run.clients.num_gpus},
        "init_args": ray_init_args(ray_address),
    }
    run_simulation(server_app, client_app, num_supernodes=run.clients.num, backend_config=backend_config)


def _pretrain_lm(args: argparse.Namespace) -> int:
    from fedmm.models.pretrain import load_pretrain_config
    from fedmm.models.pretrain_lm import LMPretrainConfig, pretrain_lm, validate_lm_pretrain

    try:
        card = pretrain_lm(load_pretrain_config(args.config, args.overrides, LMPretrainConfig, validate_lm_pretrain),
                           args.out)
    except ConfigError as err:
        print(f"fedmm: config error: {err}", file=sys.stderr)
        return 2
    print(f"fedmm pretrain-lm: {args.out}: {card['steps']} steps, held-out first-try accuracy "
          f"{card['first_try_accuracy']:.3f}, revision success on its failures {card['revision_success']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from fedmm.models.pretrain import load_pretrain_config, pretrain

    try:
        card = pretrain(load_pretrain_config(args.config, args.overrides), args.out)
    except ConfigError as err:
        print(f"fedmm: config error: {err}", file=sys.stderr)
        return 2
    retrieval = card["retrieval_top1"]
    print(f"fedmm pretrain: {args.out}: {card['steps']} steps, loss {card['first_loss']:.3f} -> "
          f"{card['final_loss']:.3f}, held-out retrieval top-1 image->text {retrieval['image_to_text']:.3f}, "
          f"text->image {retrieval['text_to_image']:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmm", description="Federated multi-modal fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation on Flower's Simulation Engine (Ray)")
    sim.add_argument("--config", help="YAML config file (keys as in the README's config reference)")
    where = sim.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="results folder")
    where.add_argument("--resume", metavar="DIR", help="carry on the run in DIR (a killed or stopped "
                       "`fedmm simulate --out DIR`) from its last complete round, with its config.yaml")
    sim.add_argument("--ray-address", default="", help="join a running Ray cluster (auto, or host:port); without "
                     "it the simulation starts its own local Ray instance")
    sim.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    worker = sub.add_parser("worker", help="serve this node's ClientApp messages from one long-lived process "
                            "(the SuperNode's node config model-worker=SOCKET points its ClientApp here)")
    worker.add_argument("--socket", required=True, help="Unix socket path to listen on (created owner-only)")
    worker.add_argument("--exit-with-parent", action="store_true", help="stop when the launching process ends")
    pre = sub.add_parser("pretrain", help="build a foundation base: contrastive image-caption pretraining of the "
                         "ViT and BERT encoders on a generated corpus (resumes from DIR's checkpoint)")
    pre.add_argument("--out", required=True, help="output folder: image/ and text/ (Hugging Face), card.json")
    pre.add_argument("--config", help="YAML file of pretraining keys (see fedmm.models.pretrain.PretrainConfig)")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    lm = sub.add_parser("pretrain-lm", help="build a language-model base for online fine-tuning from feedback: a "
                        "tiny GPT-2 trained on generated worked arithmetic until its held-out first-try accuracy "
                        "reaches target_accuracy")
    lm.add_argument("--out", required=True, help="output folder (save_pretrained model and tokenizer, card.json)")
    lm.add_argument("--config", help="YAML file of keys (see fedmm.models.pretrain_lm.LMPretrainConfig)")
    lm.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    show = sub.add_parser("config", help="print the resolved config")
    show.add_argument("--config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.command == "worker":
        logging.getLogger("flwr").setLevel(logging.INFO)
        importlib.import_module("client_apps.worker").serve(args.socket, args.exit_with_parent)
        return 0
    if args.command == "pretrain":
        return _pretrain(args)
    if args.command == "pretrain-lm":
        return _pretrain_lm(args)
    try:
        overrides = list(args.overrides)
        if args.command == "simulate" and args.resume:
            if args.config or overrides:
                raise ConfigError("--resume takes the run's own config.yaml; give no --config or overrides")
            config = Path(args.resume) / "config.yaml"
            if not config.is_file():
                raise ConfigError(f"--resume {args.resume!r}: no config.yaml there, so no run to resume")
            run = load_config(config, [f"out={args.resume}", "resume=true"])
        else:
            if args.command == "simulate":
                overrides.append(f"out={args.out}")
            run = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"fedmm: config error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        from fedmm.core.config import to_yaml

        print(to_yaml(run), end="")
        return 0
    out = Path(run.out)
    if out.exists() and not out.is_dir():
        print(f"fedmm: --out {str(out)!r} exists and is not a folder", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.INFO)
    from fedmm.core.results import SUMMARY_FILE, RunFailed
    from fedmm.engine.ray_cluster import RayClusterUnreachable

    try:
        simulate(run, args.ray_address)
    except ConfigError as err:
        print(f"fedmm: config error: {err}", file=sys.stderr)
        return 2
    except RayClusterUnreachable as err:
        print(f"fedmm: {err}", file=sys.stderr)
        return 2
    except RunFailed:
        pass  # the summary says why, below
    if not (out / SUMMARY_FILE).is_file():
        print("fedmm: the run did not finish (no summary.json); see the log above", file=sys.stderr)
        return 1
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if summary.get("status") == "failed":
        print(f"fedmm: the run failed; {out / SUMMARY_FILE} says why:", file=sys.stderr)
        for problem in summary["problems"]:
            print(f"  - {problem}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
