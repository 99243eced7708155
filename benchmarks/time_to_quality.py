"""Time to quality: test NLL (IWAE-5000) of `elbox train` with default settings against seconds of training.

    .venv/bin/python benchmarks/time_to_quality.py [--curve-examples 1000] [TRAIN OPTIONS ...]

Runs `elbox train --out DIR` in this process (the CLI's own code path; extra options are passed through), keeping a
copy of the weights after every epoch and the seconds spent so far. Then:

* the final weights: IWAE-5000 on the full Fashion-MNIST test set (10,000 images, binarized once with seed 0),
  exactly `elbox evaluate DIR --iw-samples 5000`;
* the curve: every --curve-every'th snapshot (and the last) scored by IWAE-5000 on the first --curve-examples test
images (same binarization),
  against the training seconds at that epoch.

Seconds are reported two ways: `train_s`, the sum of the epochs' training loops (what the trainer logs as
epoch_time_s), and `wall_s`, the whole `elbox train` command up to that epoch's checkpoint (start-up, data loading,
validation and checkpoint writes included). The target (<= 234 nats within 200 s) is checked on wall_s.

Writes results/time_to_quality.json and results/time_to_quality.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import elbox
from elbox.cli.main import main as elbox_main
from elbox.core.system import keep_freed_memory_in_heap, set_threads
from elbox.evaluation.runs import data_in_space
from elbox.models.estimates import iwae_per_example
from elbox.training import trainer as trainer_module

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_NATS, TARGET_SECONDS = 234.0, 200.0


def train_with_snapshots(options: list[str], out: Path) -> tuple[list[dict], float]:
    """`elbox train` in-process; returns per-epoch snapshots {epoch, train_s, wall_s, state} and the total wall time."""
    snapshots: list[dict] = []
    original_save = trainer_module.Trainer.save
    start = time.perf_counter()

    def save_and_snapshot(trainer, epoch, is_best):
        original_save(trainer, epoch, is_best)
        train_s = sum(r["epoch_time_s"] for r in trainer.records if r.get("kind") == "epoch")
        state = {k: v.detach().clone() for k, v in trainer.eval_model.state_dict().items()}
        snapshots.append(
            {
                "epoch": epoch,
                "train_s": train_s,
                "wall_s": time.perf_counter() - start,
                "val_elbo": trainer.records[-1]["val_elbo"],
                "state": state,
            }
        )

    trainer_module.Trainer.save = save_and_snapshot
    try:
        code = elbox_main(["train", "--out", str(out), "--no-progress", *options])
    finally:
        trainer_module.Trainer.save = original_save
    if code != 0:
        raise SystemExit(f"elbox train failed with exit code {code}")
    return snapshots, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve-examples", type=int, default=1000, help="test images per curve point (IWAE-5000)")
    parser.add_argument("--curve-every", type=int, default=4, help="curve points every N epochs (and the last)")
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--out", default=str(RESULTS / "time_to_quality.json"))
    args, train_options = parser.parse_known_args()
    keep_freed_memory_in_heap()
    threads = set_threads(None)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        snapshots, wall = train_with_snapshots(train_options, run_dir)
        config = json.loads((run_dir / "config.json").read_text())
        # exactly `elbox evaluate RUN_DIR --iw-samples 1 K --device cpu`
        final = elbox.evaluate(run_dir, iw_samples=[1, args.iw_samples], device="cpu", progress=True)
        model = elbox.load(run_dir)  # on the CPU, in eval mode
        data = config["data"]
        x, offset, _ = data_in_space(model, data["name"], "test", data.get("data_dir"), 0, None)
        curve = []
        last = snapshots[-1]["epoch"]
        for snap in [s for s in snapshots if s["epoch"] % args.curve_every == 0 or s["epoch"] == last]:
            model.load_state_dict(snap.pop("state"))
            model.eval()
            with torch.random.fork_rng():
                torch.manual_seed(0)
                nll = -(iwae_per_example(model, x[: args.curve_examples], args.iw_samples, 500) + offset)
            snap.update(nll_iw=nll.mean().item(), nll_iw_stderr=(nll.std() / nll.numel() ** 0.5).item())
            curve.append(snap)
            print(
                f"epoch {snap['epoch']:3d}: {snap['wall_s']:6.1f} s wall, {snap['train_s']:6.1f} s training loop, "
                f"IWAE-{args.iw_samples} NLL on {args.curve_examples} test images {snap['nll_iw']:.2f} ± "
                f"{snap['nll_iw_stderr']:.2f}",
                flush=True,
            )
    result = {
        "command": "elbox train " + " ".join(train_options) if train_options else "elbox train (defaults)",
        "train_config": config["train"],
        "model_config": config["model_config"],
        "threads": threads,
        "protocol": "dynamically binarized Fashion-MNIST; test set = official 10,000 images binarized once with "
        "seed 0; "
        f"NLL = -IWAE-{args.iw_samples} in nats per image; curve points on the first {args.curve_examples} test images",
        "wall_s": wall,
        "train_s": curve[-1]["train_s"],
        "final": {
            k: final[k]
            for k in ("nll_iw", "nll_iw_stderr", "nll_iw_by_k", "elbo", "elbo_stderr", "time_s", "n_examples")
        },
        "target": {
            "nats": TARGET_NATS,
            "seconds": TARGET_SECONDS,
            "met": final["nll_iw"] <= TARGET_NATS and wall <= TARGET_SECONDS,
        },
        "curve": curve,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(
        f"final: IWAE-{args.iw_samples} NLL {final['nll_iw']:.2f} ± {final['nll_iw_stderr']:.2f} nats on the full test "
        "set "
        f"after {wall:.0f} s of `elbox train` ({result['train_s']:.0f} s in training loops); target met: "
        f"{result['target']['met']}"
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(
        [c["wall_s"] for c in curve],
        [c["nll_iw"] for c in curve],
        yerr=[c["nll_iw_stderr"] for c in curve],
        marker="o",
        ms=3,
        label=f"snapshots ({result['protocol'].rsplit('on the first ', 1)[-1]})",
    )
    ax.errorbar(
        [result["wall_s"]],
        [result["final"]["nll_iw"]],
        yerr=[result["final"]["nll_iw_stderr"]],
        marker="s",
        color="k",
        label="final, full test set",
    )
    ax.axhline(TARGET_NATS, color="r", ls="--", lw=1, label=f"target {TARGET_NATS:g} nats")
    ax.axvline(TARGET_SECONDS, color="r", ls=":", lw=1)
    ax.set_xlabel("seconds of `elbox train` (wall)")
    ax.set_ylabel("test NLL, IWAE-5000 (nats)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 260))
    ax.legend()
    ax.set_title(result["command"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
