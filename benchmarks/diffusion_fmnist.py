"""Diffusion benchmark: a variational diffusion model on 8-bit Fashion-MNIST, test bits/dim with its parts.

Protocol: 8-bit Fashion-MNIST (no binarization, no dequantization: the model's reconstruction term is a 256-way
categorical, so the bound is on the probability of the 8-bit image); train = first 55,000 official training
images, validation = last 5,000 (model selection only), test = the official 10,000. The reported figure is the
test -ELBO in bits per dimension (784 dims), split into bpd_recon + bpd_prior + bpd_diffusion, each with its
standard error over test images. Continuous-time models estimate the diffusion term with --time-samples
stratified time samples per image (one noise draw each); discrete-time models sum all T steps exactly.

The script runs the CLI, so the recorded commands are exactly what a user would type:

    .venv/bin/python benchmarks/diffusion_fmnist.py [--threads 2] [--epochs N] [--time-samples S] [--eval-limit N]

It writes benchmarks/results/diffusion_fmnist.json (commands, threads, wall times, the per-epoch validation curve,
the final evaluation), diffusion_fmnist_curve.png (validation bits/dim against training time) and
diffusion_fmnist_samples.png (ancestral samples with --steps 256).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
BITS = 784 * math.log(2)  # nats per image -> bits per dimension

TRAIN_ARGS = [
    "--model",
    "diffusion",
    "--schedule",
    "learned-linear",
    "--channels",
    "16",
    "32",
    "64",
    "--batch-size",
    "64",
    "--lr",
    "2e-3",
    "--lr-schedule",
    "cosine",
]


def run(command: list[str], env: dict) -> float:
    """Run a command, streaming its output; return its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
    return time.perf_counter() - start


def plot_curve(epochs: list[dict], steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [sum(e["epoch_time_s"] for e in epochs[: i + 1]) / 60 for i in range(len(epochs))]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(minutes, [-e["val_elbo"] / BITS for e in epochs], "o-", label="validation -ELBO (1 time sample per image)")

    def step_minutes(step: int) -> float:  # within each epoch, time grows linearly with the step
        start_step, start_min = 0, 0.0
        for e, end_min in zip(epochs, minutes):
            if step <= e["step"]:
                return start_min + (end_min - start_min) * (step - start_step) / max(e["step"] - start_step, 1)
            start_step, start_min = e["step"], end_min
        return minutes[-1]

    ax.plot(
        [step_minutes(s["step"]) for s in steps],
        [-s["elbo"] / BITS for s in steps],
        alpha=0.5,
        label="training batches -ELBO",
    )
    ax.set_xlabel("training time (minutes; batches placed within their epoch)")
    ax.set_ylabel("bits per dimension")
    ax.set_title("VDM on 8-bit Fashion-MNIST")
    low = min(-e["val_elbo"] / BITS for e in epochs)
    ax.set_ylim(low - 0.5, low + 4)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--time-samples", type=int, default=4, help="time samples per test image (continuous time)")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="evaluate the first N test images only (default: all 10000)"
    )
    parser.add_argument("--run-dir", default=None, help="default runs/diffusion-fmnist")
    parser.add_argument("--skip-training", action="store_true", help="evaluate an existing run directory")
    args = parser.parse_args()

    run_dir = Path(args.run_dir or REPO_ROOT / "runs" / "diffusion-fmnist")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    elbox = [str(Path(sys.executable).parent / "elbox")]
    train_cmd = elbox + ["train", *TRAIN_ARGS, "--epochs", str(args.epochs), "--out", str(run_dir), "--no-progress"]
    eval_json = run_dir / "eval-test.json"
    eval_cmd = elbox + [
        "evaluate",
        str(run_dir),
        "--split",
        "test",
        "--elbo-samples",
        str(args.time_samples),
        "--batch-size",
        "250",
        "--json",
        str(eval_json),
        "--no-progress",
    ]
    if args.eval_limit:
        eval_cmd += ["--limit", str(args.eval_limit)]
    samples_png = RESULTS / "diffusion_fmnist_samples.png"
    sample_cmd = elbox + ["sample", str(run_dir), "--steps", "256", "--n", "64", "--out", str(samples_png)]

    RESULTS.mkdir(parents=True, exist_ok=True)
    train_s = None if args.skip_training else run(train_cmd, env)
    eval_s = run(eval_cmd, env)
    sample_s = run(sample_cmd, env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "train"]
    ev = json.loads(eval_json.read_text())
    parts = {name: (ev[f"bpd_{name}"], ev[f"bpd_{name}_stderr"]) for name in ev["bpd_parts"]}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "threads": args.threads,
        "protocol": "8-bit Fashion-MNIST; train = first 55000, validation = last 5000 official training images; "
        f"test = official test images (first {ev['n_examples']}); -ELBO in bits/dim (784 dims); "
        + ev.get("elbo_protocol", ""),
        "units": "bits per dimension",
        "commands": {
            "train": shlex.join(train_cmd),
            "evaluate": shlex.join(eval_cmd),
            "sample": shlex.join(sample_cmd),
        },
        "epochs_planned": args.epochs,  # the cosine learning-rate schedule spans these
        "epochs_completed": len(epochs),  # fewer when training was stopped early (then evaluated with --skip-training)
        "train_wall_s": train_s,
        "train_epoch_time_s": sum(r["epoch_time_s"] for r in epochs),
        "eval_wall_s": eval_s,
        "sample_wall_s": sample_s,
        "test_examples": ev["n_examples"],
        "test_bpd": ev["bpd"],
        "test_bpd_stderr": ev["bpd_stderr"],
        "test_bpd_parts": {name: {"bpd": v, "stderr": se} for name, (v, se) in parts.items()},
        "evaluation": ev,
        "curve": [
            {key: r.get(key) for key in ("epoch", "step", "epoch_time_s", "images_per_s")}
            | {"train_bpd": -r["train_elbo"] / BITS, "val_bpd": -r["val_elbo"] / BITS}
            | {f"val_bpd_{k[7:]}": v / BITS for k, v in r.items() if k.startswith("val_kl/")}
            for r in epochs
        ],
    }
    out = RESULTS / "diffusion_fmnist.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_curve(epochs, steps, RESULTS / "diffusion_fmnist_curve.png")
    shutil.copy(run_dir / "samples.png", RESULTS / "diffusion_fmnist_samples_train_end.png")
    print(
        f"diffusion: test {ev['bpd']:.4f} ± {ev['bpd_stderr']:.4f} bits/dim ("
        + ", ".join(f"{name} {v:.4f} ± {se:.4f}" for name, (v, se) in parts.items())
        + f"); training {result['train_epoch_time_s'] / 60:.1f} min; wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
