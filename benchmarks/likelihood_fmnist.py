"""Likelihood benchmark: models trained on dynamically binarized Fashion-MNIST with the same wall-clock budget, then
their test NLL by IWAE.

Protocol (IWAE NLL, Burda et al. 2016): train on the first 55,000 official training images with dynamic binarization,
validate on the last 5,000; evaluate the official 10,000 test images, binarized once with seed 0, with IWAE-K for
several K from one stream of max K samples per image. Figures are nats per image.

The script runs the CLI, so the commands it records are exactly what a user would type. Training and evaluation are
separate phases, so that several configurations can train side by side with the same budget and be evaluated one
at a time afterwards:

    .venv/bin/python benchmarks/likelihood_fmnist.py CONFIG --phase train [--threads 1] [--epochs N]
    .venv/bin/python benchmarks/likelihood_fmnist.py CONFIG --phase evaluate [--threads 2] [--iw-samples K ...]
    .venv/bin/python benchmarks/likelihood_fmnist.py --table        # the Markdown table of every result

`--phase all` (the default) does both. Training writes benchmarks/results/likelihood_<config>.json (commands, thread
count, training wall time, images/s, the per-epoch validation curve with per-level KL) and likelihood_<config>.png
(validation and training -ELBO against training time); evaluation adds the test evaluation (IWAE-K, ELBO, per-level
KL and active units, evaluation time) and sample grids at several temperatures (likelihood_<config>_samples_t<T>.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"


def vae_args(*extra: str, activation: str = "relu") -> list[str]:
    """`elbox train` options of the MLP VAE 784-512-512-32 recipe, with extra options before the recipe's."""
    return [
        "--model",
        "vae",
        "--hidden-dims",
        "512",
        "512",
        "--latent-dim",
        "32",
        "--activation",
        activation,
        *extra,
        "--lr",
        "1e-3",
        "--lr-schedule",
        "cosine",
        "--ema-decay",
        "0.999",
    ]


def markov_args(
    *extra: str,
    latent_dims: tuple[str, str] = ("32", "16"),
    activation: str = "relu",
    lr: str = "1e-3",
    warmup: bool = True,
) -> list[str]:
    """`elbox train` options of the 2-level Markov HVAE recipe (MLPs 512-512, batch 128, cosine lr, EMA, 5-epoch KL
    warm-up unless warmup is False), with extra options before the recipe's. ReLU is the activation these
    configurations first ran with; `elbox train --model hvae` now defaults to GELU, which is hvae-markov-gelu."""
    kl_schedule = ["--beta-schedule", "linear", "--warmup-epochs", "5"] if warmup else ["--beta-schedule", "constant"]
    return [
        "--model",
        "hvae",
        "--hvae-type",
        "markov",
        "--levels",
        "2",
        "--latent-dims",
        *latent_dims,
        "--hidden-dims",
        "512",
        "512",
        "--activation",
        activation,
        *extra,
        "--batch-size",
        "128",
        "--lr",
        lr,
        "--lr-schedule",
        "cosine",
        "--ema-decay",
        "0.999",
        *kl_schedule,
    ]


# name -> (description, training arguments, default epochs). The epochs of vae, hvae-markov and the two MLP ladders
# fill about an hour each when they train side by side with one thread each on the 2-core CPU. The VampPrior and
# IWAE-4 variants of hvae-markov cost about 1.5x its time per image when timed alone (benchmarks/README.md), hence 95
# epochs; IWAE-4 measured 2.2x side by side in the fifth run.
CONFIGS = {
    "vae": ("MLP VAE 784-512-512-32", vae_args(), 210),
    "hvae-markov": ("2-level Markov HVAE, latents 32 and 16, MLPs 512-512, 5-epoch KL warm-up", markov_args(), 140),
    "vae-ar": (
        "vae with the bernoulli-ar likelihood (local autoregressive pixels: 7x7 masked window, 32 hidden channels)",
        vae_args("--likelihood", "bernoulli-ar"),
        100,
    ),
    "hvae-markov-ar": (
        "hvae-markov with the bernoulli-ar likelihood (as vae-ar)",
        markov_args("--likelihood", "bernoulli-ar"),
        80,
    ),
    "hvae-markov-ar-vamp": (
        "hvae-markov-ar with a VampPrior on the top level (100 pseudo-inputs)",
        markov_args("--likelihood", "bernoulli-ar", "--top-prior", "vamp", "--pseudo-inputs", "100"),
        62,
    ),
    "hvae-markov-wd": (
        "hvae-markov with decoupled weight decay 0.05 (AdamW)",
        markov_args("--weight-decay", "0.05"),
        140,
    ),
    "hvae-markov-wd2": (
        "hvae-markov with decoupled weight decay 0.2 (AdamW)",
        markov_args("--weight-decay", "0.2"),
        140,
    ),
    "hvae-markov-z64": (
        "hvae-markov with latents 64 and 32 (twice the latent units per level)",
        markov_args(latent_dims=("64", "32")),
        140,
    ),
    "hvae-markov-gelu": ("hvae-markov with GELU activations in every MLP", markov_args(activation="gelu"), 140),
    "hvae-markov-lr2e-3": ("hvae-markov with learning rate 2e-3", markov_args(lr="2e-3"), 140),
    "vae-gelu": ("vae with GELU activations", vae_args(activation="gelu"), 210),
    "hvae-markov-vamp": (
        "hvae-markov with a VampPrior on the top level (100 pseudo-inputs)",
        markov_args("--top-prior", "vamp", "--pseudo-inputs", "100"),
        95,
    ),
    "hvae-markov-iwae": (
        "hvae-markov trained on IWAE-4 (reparam estimator; no KL term, so no warm-up)",
        markov_args("--objective", "iwae", "--iw-samples", "4", warmup=False),
        95,
    ),
    "hvae-mlp-ladder": (
        "3-level MLP ladder, latents 32/16/8 (z1 next to x first), width 512, residual posterior, 5-epoch KL warm-up",
        [
            "--model",
            "hvae",
            "--hvae-type",
            "mlp-ladder",
            "--levels",
            "3",
            "--latent-dims",
            "32",
            "16",
            "8",
            "--hidden-dims",
            "512",
            "--posterior",
            "residual",
            "--batch-size",
            "256",
            "--lr",
            "2e-3",
            "--lr-schedule",
            "cosine",
            "--ema-decay",
            "0.999",
            "--beta-schedule",
            "linear",
            "--warmup-epochs",
            "5",
        ],
        75,
    ),
    "hvae-mlp-ladder-4": (
        "4-level MLP ladder, latents 32/16/8/4 (z1 next to x first), otherwise as hvae-mlp-ladder",
        [
            "--model",
            "hvae",
            "--hvae-type",
            "mlp-ladder",
            "--levels",
            "4",
            "--latent-dims",
            "32",
            "16",
            "8",
            "4",
            "--hidden-dims",
            "512",
            "--posterior",
            "residual",
            "--batch-size",
            "256",
            "--lr",
            "2e-3",
            "--lr-schedule",
            "cosine",
            "--ema-decay",
            "0.999",
            "--beta-schedule",
            "linear",
            "--warmup-epochs",
            "5",
        ],
        62,
    ),
    "hvae-ladder": (
        "3-level convolutional ladder, 64 channels",
        [
            "--model",
            "hvae",
            "--hvae-type",
            "ladder",
            "--levels",
            "3",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "cosine",
            "--ema-decay",
            "0.999",
            "--grad-clip",
            "200",
            "--grad-skip-threshold",
            "1000",
            "--beta-schedule",
            "linear",
            "--warmup-epochs",
            "1",
        ],
        40,
    ),
}
IW_SAMPLES = [1, 100, 1000]
TEMPERATURES = [1.0, 0.8, 0.6]


def run(command: list[str], env: dict) -> float:
    """Run a command, streaming its output; return its wall time in seconds."""
    print("$ " + shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, cwd=REPO_ROOT)
    return time.perf_counter() - start


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE) or ["", ""])[1].split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "flags": [f for f in wanted if f in flags],
        "python": platform.python_version(),
    }


def plot_curve(epochs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [sum(e["epoch_time_s"] for e in epochs[: i + 1]) / 60 for i in range(len(epochs))]
    validated = [(m, e) for m, e in zip(minutes, epochs) if e.get("val_elbo") is not None]
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    ax.plot([m for m, _ in validated], [-e["val_elbo"] for _, e in validated], label="validation -ELBO")
    ax.plot(minutes, [-e["train_elbo"] for e in epochs], label="training -ELBO (running)", alpha=0.6)
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("nats per image")
    ax.set_title(title)
    low = min(-e["val_elbo"] for _, e in validated)
    ax.set_ylim(low - 5, low + 40)
    ax.grid(alpha=0.3)
    ax.legend()
    levels = sorted({k for _, e in validated for k in e if k.startswith("val_kl/")})
    for key in levels or ["val_kl"]:
        kl_ax.plot(
            [m for m, _ in validated],
            [e.get(key) for _, e in validated],
            label=key.replace("val_kl/", "KL ").replace("val_kl", "KL"),
        )
    kl_ax.set_xlabel("training time (minutes)")
    kl_ax.set_ylabel("validation KL (nats per image)")
    kl_ax.set_title("KL per level")
    kl_ax.grid(alpha=0.3)
    kl_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_phase(name: str, args, run_dir: Path, env: dict, elbox: list[str]) -> dict:
    _, train_args, default_epochs = CONFIGS[args.config]
    epochs = args.epochs or default_epochs
    command = elbox + [
        "train",
        *train_args,
        "--epochs",
        str(epochs),
        "--threads",
        str(args.threads),
        "--out",
        str(run_dir),
        "--no-progress",
        "--no-samples",
    ]
    wall = run(command, env)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_records = [r for r in records if r["kind"] == "epoch"]
    plot_curve(epoch_records, RESULTS / f"likelihood_{name}.png", f"{name}: Fashion-MNIST (binarized)")
    train_s = sum(r["epoch_time_s"] for r in epoch_records)
    return {
        "train_command": shlex.join(command),
        "train_threads": args.threads,
        "side_by_side": args.side_by_side,
        "epochs": epochs,
        "train_wall_s": wall,
        "train_epoch_time_s": train_s,
        "train_images_per_s": sum(r["images_per_s"] * r["epoch_time_s"] for r in epoch_records) / train_s,
        "curve": [
            {
                key: r.get(key)
                for key in (
                    "epoch",
                    "step",
                    "epoch_time_s",
                    "images_per_s",
                    "train_elbo",
                    "val_elbo",
                    "val_kl",
                    "skipped_steps",
                    "skipped_large_grad",
                )
            }
            | {k: v for k, v in r.items() if k.startswith(("val_kl/", "train_kl/"))}
            for r in epoch_records
        ],
    }


def evaluate_phase(name: str, args, run_dir: Path, env: dict, elbox: list[str]) -> dict:
    k_max = max(args.iw_samples)
    eval_json = run_dir / f"eval-test-iwae{k_max}.json"
    command = elbox + [
        "evaluate",
        str(run_dir),
        "--split",
        "test",
        "--iw-samples",
        *map(str, args.iw_samples),
        "--threads",
        str(args.threads),
        "--json",
        str(eval_json),
        "--no-progress",
    ]
    if args.eval_limit:
        command += ["--limit", str(args.eval_limit)]
    wall = run(command, env)
    evaluation = json.loads(eval_json.read_text())
    grids = {}
    for t in TEMPERATURES:
        grid = RESULTS / f"likelihood_{name}_samples_t{t:g}.png"
        run(elbox + ["sample", str(run_dir), "--n", "64", "--temperature", str(t), "--out", str(grid)], env)
        grids[str(t)] = grid.name
    return {
        "eval_command": shlex.join(command),
        "eval_threads": args.threads,
        "eval_wall_s": wall,
        "test_examples": evaluation["n_examples"],
        "iw_samples": k_max,
        "test_nll_iw": evaluation.get("nll_iw"),
        "test_nll_iw_stderr": evaluation.get("nll_iw_stderr"),
        "test_elbo": evaluation.get("elbo"),
        "evaluation": evaluation,
        "sample_grids": grids,
    }


def table(results: list[dict]) -> str:
    """The README table: one row per configuration, nats per image."""
    lines = [
        "| config | model | training (side by side, threads) | epochs | test −ELBO | test NLL, IWAE-K (K) | "
        "KL per level (nats) | active units per level | IWAE evaluation |",
        "|---" * 9 + "|",
    ]
    for r in results:
        e = r.get("evaluation", {})
        kl = ", ".join(f"{k} {v:.1f}" for k, v in (e.get("kl_by_group") or {"z": e.get("kl", float("nan"))}).items())
        dims = e.get("latent_dim_by_level") or {"z": e.get("latent_dim")}
        active = ", ".join(
            f"{k} {v}/{dims.get(k, '?')}"
            for k, v in (e.get("active_units_by_level") or {"z": e.get("active_units")}).items()
        )
        nll = (
            f"**{r['test_nll_iw']:.2f} ± {r['test_nll_iw_stderr']:.2f}** ({r['iw_samples']})"
            if "test_nll_iw" in r
            else "—"
        )
        elbo = f"{-r['test_elbo']:.2f}" if "test_elbo" in r else "—"
        evaluation = (
            f"{r['eval_wall_s'] / 60:.1f} min, {r.get('eval_threads', '?')} threads" if "eval_wall_s" in r else "—"
        )
        lines.append(
            f"| `{r['config']}`{' (' + r['tag'] + ')' if r.get('tag') else ''} | {r.get('description', '')} | "
            f"{r['train_epoch_time_s'] / 60:.1f} min "
            f"({r.get('side_by_side', '?')}, {r.get('train_threads', r.get('threads', '?'))}) | {r['epochs']} | "
            f"{elbo} | {nll} | {kl} | {active} | {evaluation} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", choices=sorted(CONFIGS))
    parser.add_argument("--phase", choices=("train", "evaluate", "all"), default="all")
    parser.add_argument("--epochs", type=int, default=None, help="default: the configuration's")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of this phase")
    parser.add_argument("--side-by-side", type=int, default=1, help="how many trainings share the machine (recorded)")
    parser.add_argument(
        "--eval-limit", type=int, default=None, help="evaluate the first N test images only (default: all 10000)"
    )
    parser.add_argument(
        "--iw-samples",
        type=int,
        nargs="+",
        default=IW_SAMPLES,
        metavar="K",
        help="IWAE K values, one stream of max K samples (default 1 100 1000)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="a budget's name (e.g. 2h): results likelihood_<config>_<tag>.*, so "
        "runs of one configuration with different budgets sit side by side",
    )
    parser.add_argument("--run-dir", default=None, help="default runs/likelihood-<config>[-<tag>]")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every saved result and exit")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(p.read_text()) for p in sorted(RESULTS.glob("likelihood_*.json"))]))
        return 0
    if args.config is None:
        parser.error("name a configuration, or pass --table")

    name = f"{args.config}_{args.tag}" if args.tag else args.config
    run_dir = Path(args.run_dir or REPO_ROOT / "runs" / f"likelihood-{name.replace('_', '-')}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    elbox = [str(Path(sys.executable).parent / "elbox")]
    out = RESULTS / f"likelihood_{name}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if args.phase == "evaluate" and out.exists() else {}
    result.update(
        {
            "config": args.config,
            "tag": args.tag,
            "description": CONFIGS[args.config][0],
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "protocol": "dynamically binarized Fashion-MNIST; train = first 55000, validation = last 5000 official "
            "training "
            f"images; test = official test images (first {args.eval_limit or 10000}) binarized once with seed 0; "
            f"IWAE-K for K in {args.iw_samples} from one stream of {max(args.iw_samples)} samples",
            "units": "nats per image",
        }
    )
    if args.phase in ("train", "all"):
        result.update(train_phase(name, args, run_dir, env, elbox))
        out.write_text(json.dumps(result, indent=2) + "\n")
    if args.phase in ("evaluate", "all"):
        result.update(evaluate_phase(name, args, run_dir, env, elbox))
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"{name}: test NLL (IWAE-{result['iw_samples']}, {result['test_examples']} test images) "
            f"{result['test_nll_iw']:.2f} ± {result['test_nll_iw_stderr']:.2f} nats, ELBO {result['test_elbo']:.2f}; "
            f"evaluation {result['eval_wall_s'] / 60:.1f} min; wrote {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
