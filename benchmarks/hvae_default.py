"""Which HVAE type should `elbox train --model hvae` default to? The 2-level Markov chain (the default so far) and the
2-level HVAE with skip paths (Tomczak & Welling 2018), trained side by side for the same wall-clock on binarized
Fashion-MNIST, one thread each at the same time, and evaluated alike (IWAE-1000 on the 10,000 test images).

    python benchmarks/hvae_default.py train [--runs DIR] [--only NAME ...]      # the runs at once, one thread each
    python benchmarks/hvae_default.py evaluate [--runs DIR] [--only NAME ...]   # IWAE-1000 on the test set
    python benchmarks/hvae_default.py paired [--runs DIR] [--only OTHER BASE]   # the difference per test image
    python benchmarks/hvae_default.py table [--runs DIR]      # benchmarks/results/hvae-default-table.md

The Markov chain trains with its recipe (140 epochs: lr 1e-3 cosine, EMA 0.999, 5-epoch linear KL warm-up); the skip
HVAE with the same recipe over the epochs that fit the same time (115: its first epochs took 1.22 times as long), and
the 3-level skip HVAE (skip3, a candidate for LLR^{>k}) over 75 (its steps took 1.53 times the 2-level's).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ELBOX = [sys.executable, "-m", "elbox"]
RECIPE = ["--lr", "1e-3", "--lr-schedule", "cosine", "--ema-decay", "0.999", "--beta-schedule", "linear"]
RUNS = {
    "markov": ["--model", "hvae"],
    "skip": ["--model", "hvae", "--hvae-type", "skip", "--epochs", "115", *RECIPE, "--warmup-epochs", "5"],
    # a third level for LLR^{>k} (issue 29): its steps take 1.53 times the 2-level's, so 75 epochs in the same time
    "skip3": [
        "--model",
        "hvae",
        "--hvae-type",
        "skip",
        "--levels",
        "3",
        "--epochs",
        "75",
        *RECIPE,
        "--warmup-epochs",
        "5",
    ],
}


def shown(command: list) -> str:
    return "$ elbox " + " ".join(shlex.quote(str(a)) for a in command[3:])


def train(runs: Path, names: list[str]) -> None:
    commands = [[*ELBOX, "train", *RUNS[n], "--threads", "1", "--no-progress", "--out", runs / n] for n in names]
    for command in commands:
        print(shown(command), flush=True)
    for process in [subprocess.Popen(command) for command in commands]:
        if process.wait():
            raise SystemExit(process.returncode)


def evaluate(runs: Path, names: list[str]) -> None:
    for name in names:
        json_path = RESULTS / f"hvae-default-{name}.json"
        command = [*ELBOX, "evaluate", runs / name, "--iw-samples", "1", "1000", "--no-progress", "--json", json_path]
        print(shown(command), flush=True)
        subprocess.run(command, check=True)


def paired(runs: Path, names: list[str], k: int = 100) -> dict:
    """Two models' difference in IWAE-K per test image (names: the other model, then the one it is measured against),
    on the same binarization of the 10,000 test images (one draw, seed 0): its mean and standard error, which the two
    NLLs' own standard errors (mostly the spread of the images) overstate."""
    import torch

    from elbox.data.splits import load_split
    from elbox.io.checkpoint import load_run
    from elbox.models.estimates import iwae_by_k_per_example

    images = load_split("fashion-mnist", "test")[0].float() / 255
    x = torch.bernoulli(images, generator=torch.Generator().manual_seed(0))
    other, base = names
    bounds = {}
    for name in names:
        model = load_run(runs / name)[0]
        torch.manual_seed(0)
        with torch.no_grad():
            bounds[name] = iwae_by_k_per_example(model, x, [k], batch_size=500)[k]
    difference = bounds[other] - bounds[base]  # < 0 where the base model bounds log p(x) higher
    record = {
        "k": k,
        "n": len(difference),
        f"{other}_minus_{base}_nll": difference.mean().item() * -1,
        "stderr": (difference.std() / len(difference) ** 0.5).item(),
        f"{base}_better_fraction": (difference < 0).double().mean().item(),
    }
    suffix = "" if names == ["markov", "skip"] else f"-{other}"  # the first comparison's file keeps its name
    (RESULTS / f"hvae-default-paired{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(record)
    return record


def table(runs: Path) -> str:
    lines = [
        "| HVAE type | epochs | training wall-clock, one thread beside the other run | test NLL, IWAE-1000 (nats) | "
        "test ELBO (nats) |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in RUNS if (RESULTS / f"hvae-default-{n}.json").is_file()]:  # those evaluated
        records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        result = json.loads((RESULTS / f"hvae-default-{name}.json").read_text())
        minutes = sum(r["epoch_time_s"] for r in epochs) / 60
        lines.append(
            f"| {name} | {len(epochs)} | {minutes:.1f} min | {result['nll_iw']:.2f} ± {result['nll_iw_stderr']:.2f} "
            f"| {result['elbo']:.2f} ± {result['elbo_stderr']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("train", "evaluate", "paired", "table"))
    parser.add_argument("--runs", type=Path, default=Path("/root/runs/default-choice"))
    parser.add_argument(
        "--only", nargs="+", choices=list(RUNS), help="train or evaluate these runs (paired: OTHER BASE)"
    )
    args = parser.parse_args()
    if args.step == "paired" and args.only and len(args.only) != 2:
        parser.error("paired compares two runs: --only OTHER BASE")
    if args.step == "train":
        train(args.runs, args.only or list(RUNS))
    elif args.step == "evaluate":
        evaluate(args.runs, args.only or list(RUNS))
    elif args.step == "paired":
        paired(args.runs, args.only or ["markov", "skip"])
    else:
        text = table(args.runs)
        (RESULTS / "hvae-default-table.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
