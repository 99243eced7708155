"""Time per epoch of elbox against the reference implementation (the Exemplar VAE code of Norouzi et al. 2020, built on
Tomczak & Welling's VampPrior code) on the identical model, side by side in one run, on this CPU.

    python benchmarks/reproduce/speed_vs_reference.py --reference DIR --python VENV/bin/python [--epochs 3] [--threads
    1]

DIR is a checkout of sajadn/Exemplar-VAE; VENV a virtual environment outside the project with torch, numpy, scipy,
matplotlib and wget (its requirements). The script copies DIR, patches only what today's machine needs (its data
loader downloads Fashion-MNIST through torchvision, which neither reaches the network here nor loads beside the CPU
build of torch: it reads the standard IDX files instead), and runs, for each model, the reference's
`density_estimation.py` and `elbox train --config benchmarks/reproduce/MODEL.json` for --epochs epochs each with the
same thread count, one after the other. An epoch is training on 50,000 images and validating on 10,000, as in both
codes; the first epoch is left out of the mean (warm-up). Writes benchmarks/results/reproduce-speed-DATE.json and prints
the table. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"vae": "vae", "hvae": "hvae_2level"}  # elbox config -> the reference's --model_name
LOADER = "utils/load_data/data_loader_instances.py"
IDX_READER = """import gzip, types, torch
FMNIST_DIR = os.environ.get('FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
def _idx(path, offset):
    with gzip.open(path, 'rb') as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)
def _fashion(train):
    pre = 'train' if train else 't10k'
    x = torch.from_numpy(_idx(os.path.join(FMNIST_DIR, pre + '-images-idx3-ubyte.gz'), 16).reshape(-1, 28, 28).copy())
    y = torch.from_numpy(_idx(os.path.join(FMNIST_DIR, pre + '-labels-idx1-ubyte.gz'), 8).astype(np.int64))
    return types.SimpleNamespace(data=x, train_labels=y, test_labels=y, targets=y)
"""


def patched_reference(source: Path, into: Path) -> Path:
    """A copy of the reference whose Fashion-MNIST loader reads the IDX files (the only change)."""
    shutil.copytree(source, into, ignore=shutil.ignore_patterns(".git"))
    loader = into / LOADER
    text = loader.read_text()
    text = text.replace("from torchvision import datasets\n", IDX_READER, 1)
    text = re.sub(r"datasets\.FashionMNIST\(.*train=True.*\)$", "_fashion(True)", text, flags=re.MULTILINE)
    text = re.sub(r"datasets\.FashionMNIST\(.*train=False.*\)$", "_fashion(False)", text, flags=re.MULTILINE)
    if "_fashion(True)" not in text or "import gzip" not in text:
        raise SystemExit(f"the reference's {LOADER} is not the one this patch knows; patch it by hand")
    loader.write_text(text)
    return into


def reference_epochs(python: str, reference: Path, model: str, epochs: int, env: dict) -> list[float]:
    """Seconds per epoch (training and validation) as the reference prints them ("Epoch: i/N, Time elapsed: Xs")."""
    with tempfile.TemporaryDirectory() as snapshots:
        out = subprocess.run(
            [
                python,
                "density_estimation.py",
                "--dataset_name",
                "fashion_mnist",
                "--model_name",
                model,
                "--prior",
                "standard",
                "--epochs",
                str(epochs),
                "--S",
                "1",
                "--base_dir",
                snapshots + "/",
            ],
            cwd=reference,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    times = [float(t) for t in re.findall(r"Epoch: \d+/\d+, Time elapsed: ([0-9.]+)s", out.stdout)]
    if len(times) != epochs:
        raise SystemExit(
            f"the reference {model} run printed {len(times)} epoch times:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        )
    return times


def elbox_epochs(config: Path, epochs: int, threads: int, compile_: bool) -> list[float]:
    """Seconds per epoch (training and validation) of `elbox train --config CONFIG`, from one epoch record to the
    next."""
    code = f"""
import json, sys, time, torch, elbox
from elbox.training.workflows import run_settings
torch.set_num_threads({threads})
settings = run_settings({str(config)!r})
name, data, validation = settings.pop("model"), settings.pop("data"), settings.pop("validation")
settings.update(epochs={epochs}, samples=False, compile={compile_})
stamps = [time.perf_counter()]
elbox.fit(name, data, validation=validation, progress=False, verbose=False,
          callback=lambda r: stamps.append(time.perf_counter()) if r.get("kind") == "epoch" else None, **settings)
print(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_rate(threads: int) -> float:
    """GFLOP/s of a 1024 x 1024 float32 matrix product with `threads` threads: the yardstick of what one core can do."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    return [f for f in flags if f.startswith(("avx", "fma", "amx"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of sajadn/Exemplar-VAE")
    parser.add_argument("--python", required=True, help="the Python of the reference's own virtual environment")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is left out of the mean)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both (default 1, as the runs train)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--compile", action="store_true", help="elbox with --compile (its first epoch compiles)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        reference = patched_reference(args.reference, Path(scratch) / "reference")
        for model in args.models:
            ours = elbox_epochs(
                ROOT / "benchmarks" / "reproduce" / f"{model}.json", args.epochs, args.threads, args.compile
            )
            theirs = reference_epochs(args.python, reference, MODELS[model], args.epochs, env)
            mean_ours, mean_theirs = statistics.mean(ours[1:] or ours), statistics.mean(theirs[1:] or theirs)
            rows[model] = {
                "elbox_s_per_epoch": ours,
                "reference_s_per_epoch": theirs,
                "elbox_mean_s": mean_ours,
                "reference_mean_s": mean_theirs,
                "speedup": mean_theirs / mean_ours,
            }
            print(
                f"{model:5s}  elbox {mean_ours:6.2f} s/epoch   reference {mean_theirs:6.2f} s/epoch   "
                f"elbox is {mean_theirs / mean_ours:.2f}x as fast",
                flush=True,
            )
    import torch

    result = {
        "what": "seconds per epoch (50,000 training + 10,000 validation images), mean over epochs 2..N",
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "epochs": args.epochs,
        "elbox_compile": args.compile,
        "matmul_gflops_1_thread": matmul_rate(args.threads),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": rows,
    }
    name = f"reproduce-speed-{time.strftime('%Y-%m-%d')}{'-compile' if args.compile else ''}"
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    runs = 1
    while out.exists():  # a later run of the same day goes beside the earlier ones
        runs += 1
        out = out.with_name(f"{name}-run{runs}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
