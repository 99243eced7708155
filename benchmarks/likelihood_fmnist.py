"""Likelihood benchmark: train a configuration on dynamically binarized Fashion-MNIST, then IWAE-5000.

Protocol (IWAE-5000 NLL, Burda et al. 2016): train on the first 55,000 official training images with dynamic binarization,
validate on the last 5,000; evaluate the official 10,000 test images, binarized once with seed 0, with
IWAE-K (K = 1, 100, 1000, 5000 from one stream of 5000 samples per image). Figures are nats per image.

The script runs the CLI, so the commands it records are exactly what a user would type:

    .venv/bin/python benchmarks/likelihood_fmnist.py vae [--threads 1] [--epochs N] [--eval-limit N] [--iw-samples K ...]

It writes benchmarks/results/likelihood_<config>.json (commands, thread count, training wall time,
the per-epoch validation curve, the final evaluation) and likelihood_<config>.png (validation ELBO against
training time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"

# name -> (training arguments, default epochs)
CONFIGS = {
    "vae": (
        ["--model", "vae", "--hidden-dims", "512", "512", "--latent-dim", "32",
         "--lr", "1e-3", "--lr-schedule", "cosine", "--ema-decay", "0.999"],
        120,
    ),
    "hvae-markov": (
        ["--model", "hvae", "--hvae-type", "markov", "--levels", "2", "--latent-dims", "32", "16",
         "--hidden-dims", "512", "512", "--lr", "1e-3", "--lr-schedule", "cosine", "--ema-decay", "0.999",
         "--beta-schedule", "linear", "--warmup-epochs", "5"],
        120,
    ),
    "hvae-ladder": (
        ["--model", "hvae", "--hvae-type", "ladder", "--levels", "3",
         "--lr", "1e-3", "--lr-schedule", "cosine", "--ema-decay", "0.999",
         "--grad-clip", "200", "--grad-skip-threshold", "1000", "--beta-schedule", "linear", "--warmup-epochs", "1"],
        40,
    ),
}
IW_SAMPLES = [1, 100, 1000, 5000]


def run(command: list[str], env: dict) -> float:
    """Run a command, streaming its output; return its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
    return time.perf_counter() - start


def plot_curve(epochs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [sum(e["epoch_time_s"] for e in epochs[: i + 1]) / 60 for i in range(len(epochs))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(seconds, [-e["val_elbo"] for e in epochs], label="validation -ELBO")
    ax.plot(seconds, [-e["train_elbo"] for e in epochs], label="training -ELBO (running)", alpha=0.6)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("nats per image")
    ax.set_title(title)
    low = min(-e["val_elbo"] for e in epochs)
    ax.set_ylim(low - 5, low + 40)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=sorted(CONFIGS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the configuration's")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate the first N test images only (default: all 10000)")
    parser.add_argument("--iw-samples", type=int, nargs="+", default=IW_SAMPLES, metavar="K",
                        help="IWAE K values, one stream of max K samples (default 1 100 1000 5000)")
    parser.add_argument("--run-dir", default=None, help="default runs/likelihood-<config>")
    parser.add_argument("--skip-training", action="store_true", help="evaluate an existing run directory")
    args = parser.parse_args()

    train_args, default_epochs = CONFIGS[args.config]
    epochs = args.epochs or default_epochs
    run_dir = Path(args.run_dir or REPO_ROOT / "runs" / f"likelihood-{args.config}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    elbox = [str(Path(sys.executable).parent / "elbox")]
    train_cmd = elbox + ["train", *train_args, "--epochs", str(epochs), "--out", str(run_dir), "--no-progress"]
    k_max = max(args.iw_samples)
    eval_json = run_dir / f"eval-test-iwae{k_max}.json"
    eval_cmd = elbox + ["evaluate", str(run_dir), "--split", "test", "--iw-samples", *map(str, args.iw_samples), "--json", str(eval_json)]
    if args.eval_limit:
        eval_cmd += ["--limit", str(args.eval_limit)]

    train_s = None if args.skip_training else run(train_cmd, env)
    eval_s = run(eval_cmd, env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_records = [r for r in records if r["kind"] == "epoch"]
    evaluation = json.loads(eval_json.read_text())
    result = {
        "config": args.config,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "threads": args.threads,
        "protocol": "dynamically binarized Fashion-MNIST; train = first 55000, validation = last 5000 official training "
                    f"images; test = official test images (first {args.eval_limit or 10000}) binarized once with seed 0; "
                    f"IWAE-K for K in {args.iw_samples} from one stream of {k_max} samples",
        "units": "nats per image",
        "commands": {"train": shlex.join(train_cmd), "evaluate": shlex.join(eval_cmd)},
        "epochs": epochs,
        "train_wall_s": train_s,
        "train_epoch_time_s": sum(r["epoch_time_s"] for r in epoch_records),
        "eval_wall_s": eval_s,
        "test_examples": evaluation["n_examples"],
        "iw_samples": k_max,
        "test_nll_iw": evaluation.get("nll_iw"),
        "test_nll_iw_stderr": evaluation.get("nll_iw_stderr"),
        "test_elbo": evaluation.get("elbo"),
        "evaluation": evaluation,
        "curve": [
            {key: r.get(key) for key in ("epoch", "step", "epoch_time_s", "train_elbo", "val_elbo", "val_kl", "skipped_steps", "skipped_large_grad")}
            | {k: v for k, v in r.items() if k.startswith("val_kl/")}
            for r in epoch_records
        ],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"likelihood_{args.config}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(epoch_records, RESULTS / f"likelihood_{args.config}.png", f"{args.config}: Fashion-MNIST (binarized)")
    print(f"{args.config}: test NLL (IWAE-{k_max}, {result['test_examples']} test images) "
          f"{result['test_nll_iw']:.2f} ± {result['test_nll_iw_stderr']:.2f} nats, "
          f"ELBO {result['test_elbo']:.2f}; training {result['train_epoch_time_s'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
