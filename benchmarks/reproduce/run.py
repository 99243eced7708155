"""Reproduce the Fashion-MNIST density-estimation table of Norouzi et al. (2020) with elbox: train each row's config to
its early stop, evaluate its best epoch by IWAE with K = 5000 on the 10,000 test images, and write the table.

    python benchmarks/reproduce/run.py train ROW [--runs DIR] [--threads 1]   # trains, or resumes, RUNS/ROW
    python benchmarks/reproduce/run.py evaluate ROW [--runs DIR]              # IWAE-5000 -> benchmarks/results
    python benchmarks/reproduce/run.py table [--runs DIR]                     # the table, from what has finished
    python benchmarks/reproduce/run.py curve ROW [--against hvae]            # a row's validation curve, beside another

ROW is a config in this folder (vae, vae-vamp, hvae, hvae-vamp, convhvae: compiled, about 20 minutes an epoch on
one core, so its row is a short run's curve unless many sessions continue it; hvae-iwae: past the table, the hvae
row's best epoch trained further on the IWAE-5 bound, `--init-from RUNS/hvae`, to its own early stop by the
validation IWAE-5 bound; hvae-vamp-iwae: the same from the hvae-vamp row). Every step is an ordinary elbox
command (printed as it runs): `elbox train --config benchmarks/reproduce/ROW.json --out RUN`, `elbox evaluate RUN
--iw-samples 5000`. A run stopped by the machine's time limit continues with `train` again (`elbox train --resume`,
bit for bit).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1] / "benchmarks" / "results"
ELBOX = [sys.executable, "-m", "elbox"]
# Norouzi et al. (2020), Table 1, Fashion-MNIST column: test NLL in nats (importance sampling, K = 5000)
REFERENCE = {
    "vae": ("VAE, Gaussian prior", 228.70, 0.15),
    "vae-vamp": ("VAE, VampPrior", 227.35, 0.05),
    "hvae": ("2-level HVAE, Gaussian prior", 227.37, 0.1),
    "hvae-vamp": ("2-level HVAE, VampPrior", 226.72, 0.08),
    "convhvae": ("ConvHVAE (`--hvae-type conv-skip`), Gaussian prior", 225.38, 0.08),
    # past the table: against the best published MLP figure (the Exemplar HVAE's), as the issue asks
    "hvae-iwae": ("2-level HVAE, Gaussian prior, then IWAE-5 training from its best epoch", 226.53, None),
    "hvae-vamp-iwae": ("2-level HVAE, VampPrior, then IWAE-5 training from its best epoch", 226.53, None),
}
INIT_FROM = {
    "hvae-iwae": "hvae",
    "hvae-vamp-iwae": "hvae-vamp",
}  # rows that start from another row's result (elbox train --init-from)


def run(command: list[str]) -> None:
    print("$ elbox " + " ".join(shlex.quote(str(a)) for a in command[3:]), flush=True)
    subprocess.run(command, check=True)


def train(row: str, runs: Path, threads: int) -> None:
    out = runs / row
    if (out / "config.json").is_file():
        run([*ELBOX, "train", "--resume", out, "--threads", str(threads), "--no-progress"])
    else:
        run(
            [
                *ELBOX,
                "train",
                "--config",
                HERE / f"{row}.json",
                "--out",
                out,
                "--threads",
                str(threads),
                "--no-progress",
                *(["--init-from", runs / INIT_FROM[row]] if row in INIT_FROM else []),
            ]
        )


def evaluate(row: str, runs: Path) -> None:
    run(
        [
            *ELBOX,
            "evaluate",
            runs / row,
            "--iw-samples",
            "1",
            "5000",
            "--no-progress",
            "--json",
            RESULTS / f"reproduce-{row}.json",
        ]
    )


def row_facts(row: str, runs: Path) -> dict:
    """Epochs, the best epoch, the median seconds of an epoch, the wall-clock hours of all epochs summed (with the
    time the run was paused for other work on the machine), and the evaluation if there is one."""
    metrics = runs / row / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    epochs = [r for r in records if r.get("kind") == "epoch"]
    key = "val_iwae" if epochs and "val_iwae" in epochs[0] else "val_elbo"  # the bound that picked the best epoch
    best = max(epochs, key=lambda r: r[key]) if epochs else None
    evaluated = RESULTS / f"reproduce-{row}.json"
    return {
        "epochs": len(epochs),
        "best_epoch": best and best["epoch"],
        "hours": sum(r.get("epoch_time_s", 0) for r in epochs) / 3600,
        "median_epoch_s": statistics.median(r["epoch_time_s"] for r in epochs) if epochs else None,
        "result": json.loads(evaluated.read_text()) if evaluated.is_file() else None,
    }


def table(runs: Path) -> str:
    lines = [
        "| model | data | metric | obtained | reference | epochs (best) | training time, 2-core CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, (name, value, stderr) in REFERENCE.items():
        facts = row_facts(row, runs)
        result = facts["result"]
        obtained = (
            f"{result['nll_iw']:.2f} ± {result['nll_iw_stderr']:.2f}"
            if result
            else "not evaluated yet"
            if facts["epochs"]
            else "not run yet"
        )
        epochs = f"{facts['epochs']} ({facts['best_epoch']})" if facts["epochs"] else "-"
        lines.append(
            f"| {name} | Fashion-MNIST, dynamically binarized | NLL, IWAE K = 5000 | {obtained} | "
            f"{value:.2f}{f' ± {stderr}' if stderr else ' (Exemplar HVAE, the best published MLP)'} | {epochs} | "
            + (
                f"{facts['median_epoch_s']:.1f} s an epoch (median), one thread; {facts['hours']:.1f} h summed |"
                if epochs != "-"
                else "- |"
            )
        )
    return "\n".join(lines)


def epoch_records(row: str, runs: Path) -> list[dict]:
    metrics = runs / row / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [r for r in records if r.get("kind") == "epoch"]


def curve(row: str, against: str, runs: Path) -> dict:
    """The validation ELBO of each epoch of `row` beside `against`'s at the same epochs, and the time the protocol
    would take at the row's median epoch: reproduce-curve-ROW.json and .png in benchmarks/results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine, theirs = epoch_records(row, runs), {r["epoch"]: r for r in epoch_records(against, runs)}
    if not mine:
        raise SystemExit(f"{runs / row} has no validated epoch yet")
    median = statistics.median(r["epoch_time_s"] for r in mine)
    record = {
        "row": row,
        "against": against,
        "epochs": [
            {
                "epoch": r["epoch"],
                "val_elbo": r["val_elbo"],
                f"{against}_val_elbo": theirs.get(r["epoch"], {}).get("val_elbo"),
                "epoch_time_s": r["epoch_time_s"],
            }
            for r in mine
        ],
        "median_epoch_s": median,
        "hours_for_epochs": {n: n * median / 3600 for n in (500, 1000, 2000)},
    }
    (RESULTS / f"reproduce-curve-{row}.json").write_text(json.dumps(record, indent=1) + "\n")
    figure, axes = plt.subplots(figsize=(6, 4))
    shown = [e for e in sorted(theirs) if e <= max(2 * len(mine), 20)]
    axes.plot(shown, [theirs[e]["val_elbo"] for e in shown], label=against, color="0.6")
    axes.plot([r["epoch"] for r in mine], [r["val_elbo"] for r in mine], "o-", label=row)
    axes.set(xlabel="epoch", ylabel="validation ELBO (nats)", title=f"{row}: {median / 60:.0f} min an epoch, one core")
    axes.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"reproduce-curve-{row}.png", dpi=100)
    for r in record["epochs"]:
        print(r)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("train", "evaluate", "table", "curve"))
    parser.add_argument("row", nargs="?", choices=list(REFERENCE))
    parser.add_argument("--runs", type=Path, default=Path("/root/runs/reproduce"), help="where the run directories are")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", choices=list(REFERENCE), default="hvae", help="curve: the row shown beside")
    args = parser.parse_args()
    if args.step != "table" and args.row is None:
        parser.error(f"{args.step} needs a ROW")
    if args.step == "train":
        train(args.row, args.runs, args.threads)
    elif args.step == "evaluate":
        evaluate(args.row, args.runs)
    elif args.step == "curve":
        curve(args.row, args.against, args.runs)
    else:
        text = table(args.runs)
        (RESULTS / "reproduce-table.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
