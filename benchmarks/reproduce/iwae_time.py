"""Wall-clock of IWAE-5000 on the Fashion-MNIST test set for the table's MLP rows: `elbox evaluate RUN --iw-samples
5000` as a user runs it (2 threads), with the float32 matrix-product rate measured in the same run and the CPU.

    python benchmarks/reproduce/iwae_time.py RUN [RUN ...] [--limit N] [--threads 2] [--compile]

Each RUN is a run directory of a row's config (trained or not: the time does not depend on the weights). --limit
evaluates the first N test images only and scales the time to 10,000. Writes
benchmarks/results/reproduce-iwae-time-DATE.json and prints the table. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TEST_IMAGES = 10_000


def main() -> None:
    import torch
    from bench_vae import CpuMonitor, contention_note, environment
    from run import matmul_rate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="the first N test images (default: all 10,000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="elbox evaluate --compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {
        "environment": environment(torch.device("cpu")),
        "rate_before": matmul_rate(torch.device("cpu"), torch.float32),
    }
    rows = []
    for run in args.runs:
        images = args.limit or TEST_IMAGES
        out = Path(f"/tmp/iwae-time-{run.name}.json")
        command = [sys.executable, "-m", "elbox", "evaluate", str(run), "--iw-samples", "5000", "--threads"]
        command += [str(args.threads), "--no-progress", "--overwrite", "--json", str(out)]
        command += ["--limit", str(args.limit)] if args.limit else []
        command += ["--compile"] if args.compile else []
        print("$ elbox " + " ".join(command[3:]), flush=True)
        with CpuMonitor() as monitor:
            subprocess.run(command, check=True)
        seconds = monitor.result["wall_s"]
        config = json.loads((run / "config.json").read_text())
        result = json.loads(out.read_text())
        rows.append(
            {
                "run": run.name,
                "model": config["model"],
                "prior": config["model_config"].get("prior", config["model_config"].get("top_prior")),
                "images": images,
                "compile": args.compile,
                "seconds": seconds,
                "minutes_per_10000": seconds * TEST_IMAGES / images / 60,
                "nll_iwae_5000_nats": result["nll_iw"],
                "evaluator_seconds": result["time_s"],
                "cpu": monitor.result,  # steal_fraction: the CPUs' time the hypervisor gave to other machines
            }
        )
        print(
            f"{run.name}: {seconds:.0f} s for {images} images -> {rows[-1]['minutes_per_10000']:.1f} min per 10,000; "
            f"CPU stolen by the hypervisor {monitor.result.get('steal_fraction', 0):.0%}{contention_note(monitor)}"
        )
    record["rows"] = rows
    record["rate_after"] = matmul_rate(torch.device("cpu"), torch.float32)
    date = datetime.now(timezone.utc).date().isoformat()
    path = HERE.parents[1] / "benchmarks" / "results" / f"reproduce-iwae-time-{date}.json"
    runs = 1
    while path.exists():  # a later run of the same day goes beside the earlier ones
        runs += 1
        path = path.with_name(f"reproduce-iwae-time-{date}-run{runs}.json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"float32 matrix products: {record['rate_before']['gflops']:.0f} GFLOP/s before, "
        f"{record['rate_after']['gflops']:.0f} after ({args.threads} threads); wrote {path}"
    )


if __name__ == "__main__":
    main()
