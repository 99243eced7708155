"""The benchmark suite: training and evaluation speed of every model family, as fractions of this machine's
matrix-product rate measured in the same run.

    .venv/bin/python benchmarks/run.py [--devices cpu cuda] [--families vae hvae diffusion] [--seconds 20]

For each device (cpu, and cuda when present) it measures:

* the reference: float32 and bfloat16 square matrix products (median of repeats at the largest size that takes
  0.05 s or more, up to 2048 on a CPU and 8192 on a GPU), before and after the families; the faster of the two
  medians is the rate every fraction divides by;
* for each model family at its default size (exactly `elbox train --model FAMILY`'s defaults) and in a process of
  its own (so peak memory is the family's):
  - training images/s of the real Trainer.training_step (batch gather, binarization or dequantization, forward,
    backward, fused Adam, the per-step .item() of the logging), eager float32 first, then --compile, then
    --precision bf16, and --channels-last for convolutional models;
  - FLOPs per training image counted by torch.utils.flop_counter on one step (matrix products and convolutions,
    forward and backward), hence achieved GFLOP/s and the fraction of the matrix-product rate;
  - time to the first step (model build to the end of step 1; for --compile, a cold compilation: each process
    gets an empty TORCHINDUCTOR_CACHE_DIR);
  - evaluation images/s: IWAE-5000 (VAE, HVAE) or the ELBO with 4 time samples (diffusion), at the library's
    automatic memory bound, and its fraction of the rate (FLOPs counted on a small K, scaled by K);
  - peak resident memory after eager float32 training (and for the VAE, of a real `elbox train` epoch on the
    full Fashion-MNIST), and at the end of the process;
  - a torch.profiler table of the eager float32 training step (top operators by self time).

It writes benchmarks/results/<machine>-<date>.json and .md (the Markdown table). Every phase records the CPU
time other processes used meanwhile (cpu_contention); a WARNING marks phases above 5 %.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from elbox.core.system import bf16_is_native, keep_freed_memory_in_heap, set_threads
from elbox.data import get_data_space, load_split
from elbox.io.run_config import train_config
from elbox.models import LatentVariableModel, build_model
from elbox.models.estimates import elbo_per_example, elements_per_sample, iwae_per_example, memory_bound
from elbox.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vae import CpuMonitor, sync  # noqa: E402  (the sibling benchmark's phase monitor)

RESULTS = Path(__file__).resolve().parent / "results"
# name: (model, model config values other than its defaults); "vae-784-512-20" is the size the CPU targets name
FAMILIES = {
    "vae": ("vae", {}),
    "vae-784-512-20": ("vae", {"latent_dim": 20}),
    "hvae": ("hvae", {}),
    "hvae-mlp-ladder": ("hvae", {"hvae_type": "mlp-ladder"}),
    "hvae-conv-ladder": ("hvae", {"hvae_type": "ladder"}),
    "diffusion": ("diffusion", {}),
}
EVAL_EXAMPLES = {"vae": 500, "hvae": 4, "diffusion": 200}  # test images evaluated on a CPU; x20 on a GPU
IW_SAMPLES = 5000
DIFFUSION_TIME_SAMPLES = 4


# ----------------------------------------------------------------------------------------------
# Timing


def contention(monitor: CpuMonitor) -> float:
    """Share of the CPUs that other processes and the hypervisor took while the monitored phase ran."""
    return monitor.result.get("other_fraction", 0.0) + monitor.result.get("steal_fraction", 0.0)


def matmul_rate(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """GFLOP/s of n x n products (2 n^3 FLOPs): the median of `repeats` at the largest n whose product takes
    >= 0.05 s (n from 256, doubling, up to 2048 on a CPU and 8192 on a GPU)."""
    n_max = 8192 if device.type == "cuda" else 2048
    n = 256
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if time.perf_counter() - start >= 0.05 or n >= n_max:
            break
        n *= 2
    times = []
    with CpuMonitor() as monitor:
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    return {
        "n": n,
        "gflops": 2 * n**3 / times[len(times) // 2] / 1e9,
        "best_gflops": 2 * n**3 / times[0] / 1e9,
        "cpu_contention": contention(monitor),
    }


# ----------------------------------------------------------------------------------------------
# One family, in its own process


def flags(options: dict) -> list[str]:
    """Options {field: value} as `elbox train` flags: {"precision": "bf16"} -> ["--precision", "bf16"],
    {"compile": True} -> ["--compile"]."""
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return out


def build_trainer(
    family: str,
    images: torch.Tensor,
    val_images: torch.Tensor,
    device: torch.device,
    run_dir: str,
    options: dict | None = None,
) -> Trainer:
    """What `elbox train --model MODEL` builds: the family's model (its config defaults and the family's values)
    and a Trainer with the model's training defaults and `options` (TrainConfig fields). The data-dependent
    initialization runs only for models that have one (none of the families: their time to first step does not
    include dequantizing or binarizing the whole training set for a no-op)."""
    model_name, model_values = FAMILIES[family]
    config = train_config(model_name, options)
    torch.manual_seed(config.seed)
    model = build_model(model_name, {**model_values, "data_shape": tuple(images.shape[1:])}).to(device)
    space = get_data_space(model.data_space)
    if type(model).initialize_from_data is not LatentVariableModel.initialize_from_data:  # a data-dependent init
        with torch.no_grad():
            model.initialize_from_data(space.eval_data(images.to(device), seed=config.seed))
    return Trainer(model, images, val_images, space, config, run_dir, progress=False)


def batches(trainer: Trainer):
    """Training batches as Trainer.train_epoch makes them (gather, then the data space's binarize/dequantize)."""
    n, b = trainer.train_data.shape[0], trainer.config.batch_size
    while True:
        for idx in torch.randperm(n, generator=trainer.shuffle_generator).split(b):
            if idx.numel() == b:
                yield trainer.space.train_batch(trainer.train_data[idx.to(trainer.device)], trainer.generator)


def step(trainer: Trainer, x: torch.Tensor) -> None:
    values = trainer.training_step(x, 1.0)
    if isinstance(values, dict):
        [v.item() for v in values.values()]  # train_epoch's per-step logging sync


def measure_training(
    family, images, val_images, device, seconds, options: dict | None = None, warmup: int = 3, min_steps: int = 3
) -> dict:
    """Time to first step, then steady-state images/s over `seconds` (at least min_steps, after `warmup` steps),
    training with `options` (TrainConfig fields) on top of the model's training defaults."""
    options = options or {}
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        trainer = build_trainer(family, images, val_images, device, run_dir, options)
        data = batches(trainer)
        step(trainer, next(data))
        sync(device)
        first_step_s = time.perf_counter() - start
        for _ in range(warmup):
            step(trainer, next(data))
        sync(device)
        steps = 0
        with CpuMonitor() as monitor:
            start = time.perf_counter()
            while steps < min_steps or time.perf_counter() - start < seconds:
                step(trainer, next(data))
                steps += 1
            sync(device)
            elapsed = time.perf_counter() - start
        batch = trainer.config.batch_size
        return {
            "options": " ".join(flags(options)) or "defaults",
            "batch_size": batch,
            "steps": steps,
            "images_per_s": steps * batch / elapsed,
            "ms_per_step": 1e3 * elapsed / steps,
            "time_to_first_step_s": first_step_s,
            "cpu_contention": contention(monitor),
        }


def training_flops_per_image(family, images, val_images, device) -> tuple[float, object]:
    """Matrix-product and convolution FLOPs of one eager training step (forward + backward) per image."""
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(family, images, val_images, device, run_dir)
        x = next(batches(trainer))
        step(trainer, x)
        counter = FlopCounterMode(display=False)
        with counter:
            step(trainer, x)
        return counter.get_total_flops() / x.shape[0], trainer


def profile_table(trainer: Trainer, device: torch.device, steps: int = 10, rows: int = 12) -> list[dict]:
    """torch.profiler over eager training steps: the operators with the most self time, per step."""
    data = batches(trainer)
    for _ in range(3):
        step(trainer, next(data))
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(trainer, next(data))
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "op": e.key,
            "ms_per_step": getattr(e, attr) / 1e3 / steps,
            "share": getattr(e, attr) / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:rows]
    ]


def measure_evaluation(family, trainer: Trainer, device: torch.device) -> dict:
    """IWAE-5000 (models with log_weights) or the 4-sample ELBO (diffusion) on test images, images/s and FLOPs."""
    model = trainer.model.eval()
    n = EVAL_EXAMPLES[FAMILIES[family][0]] * (20 if device.type == "cuda" else 1)
    test, _ = load_split("fashion-mnist", "test")
    x = trainer.space.eval_data(test[:n].to(device), seed=0)
    if hasattr(model, "log_weights"):
        what = f"IWAE-{IW_SAMPLES}"
        small_k = 50
        run = lambda xs, k: iwae_per_example(model, xs, k, batch_size=500)  # noqa: E731
        small_run = lambda: run(x[:4], small_k)  # FLOPs on a small K, scaled linearly to IW_SAMPLES  # noqa: E731
        scale = IW_SAMPLES / small_k / 4
        full = lambda: run(x, IW_SAMPLES)  # noqa: E731
    else:
        what = f"ELBO, {DIFFUSION_TIME_SAMPLES} time samples"
        run = lambda xs: elbo_per_example(model, xs, 500, n_samples=DIFFUSION_TIME_SAMPLES)  # noqa: E731
        small_run = lambda: run(x[:4])  # noqa: E731
        scale = 1 / 4
        full = lambda: run(x)  # noqa: E731
    counter = FlopCounterMode(display=False)
    # the counter's module hooks need parameters that do not require grad in a no-grad pass
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    with counter:
        small_run()
    for p, r in zip(model.parameters(), requires):
        p.requires_grad_(r)
    flops_per_image = counter.get_total_flops() * scale
    small_run()  # warm-up
    with CpuMonitor() as monitor:
        start = time.perf_counter()
        full()
        sync(device)
        elapsed = time.perf_counter() - start
    return {
        "what": what,
        "examples": n,
        "seconds": elapsed,
        "images_per_s": n / elapsed,
        "gflop_per_image": flops_per_image / 1e9,
        "memory_bound_elements": memory_bound(device, elements_per_sample(model)),
        "cpu_contention": contention(monitor),
    }


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_family(family: str, device: torch.device, seconds: float) -> dict:
    images, _ = load_split("fashion-mnist", "train")
    val_images, _ = load_split("fashion-mnist", "validation")
    model_name, model_values = FAMILIES[family]
    result: dict = {
        "family": family,
        "device": device.type,
        "command": " ".join(["elbox train --model", model_name, *flags(model_values)]),
    }
    flops, trainer = training_flops_per_image(family, images, val_images, device)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in trainer.model.modules())
    result["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    result["train_gflop_per_image"] = flops / 1e9
    runs = [measure_training(family, images, val_images, device, seconds)]
    result["peak_rss_gb_after_fp32_training"] = peak_rss_gb()
    if device.type == "cuda":
        result["cuda_peak_allocated_gb_fp32_training"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["profile"] = profile_table(trainer, device)
    result["evaluation"] = measure_evaluation(family, trainer, device)
    del trainer
    variants = [{"compile": True}, {"precision": "bf16"}] + ([{"channels_last": True}] if conv else [])
    for options in variants:
        if options.get("precision") == "bf16" and not bf16_is_native(device):  # emulated, ~100x slower: 1 timed step
            runs.append(measure_training(family, images, val_images, device, 0, options, warmup=1, min_steps=1))
        else:
            runs.append(measure_training(family, images, val_images, device, seconds, options))
    result["training"] = runs
    result["peak_rss_gb_end"] = peak_rss_gb()
    return result


def cli_training_peak_rss(device: torch.device) -> dict:
    """Peak resident memory of a real `elbox train` epoch of the default VAE on the full Fashion-MNIST."""
    from elbox.cli.main import main

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        code = main(["train", "--epochs", "1", "--out", f"{out}/run", "--no-progress", "--device", device.type])
        return {
            "command": "elbox train --epochs 1 (defaults: vae, Fashion-MNIST)",
            "exit_code": code,
            "seconds": time.perf_counter() - start,
            "peak_rss_gb": peak_rss_gb(),
        }


# ----------------------------------------------------------------------------------------------
# The parent: references, children, files


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1]
                break
    except OSError:
        pass
    name = f"{cpu}-{os.cpu_count()}c"
    if torch.cuda.is_available():
        name += "-" + torch.cuda.get_device_name(0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def child(mode: str, device: torch.device, seconds: float) -> dict | None:
    """Run one measurement in a fresh process (its own peak memory) with an empty compilation cache (so --compile's
    first step is a cold compilation); returns its JSON, None if it failed."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f, tempfile.TemporaryDirectory() as cache:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--devices",
            device.type,
            "--seconds",
            str(seconds),
            "--json",
            f.name,
        ]
        if subprocess.run(cmd, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}).returncode != 0:
            print(f"WARNING: {mode} on {device} failed; it is left out of the results", file=sys.stderr)
            return None
        return json.loads(Path(f.name).read_text())


def fraction(gflops: float, rate: float) -> float:
    return gflops / rate if rate > 0 else math.nan


def summarize(device_result: dict) -> None:
    """Add achieved GFLOP/s and fractions of the reference rates to every training and evaluation entry."""
    fp32 = max(r["gflops"] for r in device_result["reference"]["float32"])
    bf16 = max(r["gflops"] for r in device_result["reference"]["bfloat16"])
    device_result["reference_gflops"] = {"float32": fp32, "bfloat16": bf16}
    for fam in device_result["families"]:
        eager = fam["training"][0]["images_per_s"]
        for run in fam["training"]:
            run["gflops"] = run["images_per_s"] * fam["train_gflop_per_image"]
            run["fraction_of_fp32_rate"] = fraction(run["gflops"], fp32)
            if "bf16" in run["options"]:
                run["fraction_of_bf16_rate"] = fraction(run["gflops"], bf16)
            run["speedup_vs_eager_fp32"] = run["images_per_s"] / eager
        ev = fam["evaluation"]
        ev["gflops"] = ev["images_per_s"] * ev["gflop_per_image"]
        ev["fraction_of_fp32_rate"] = fraction(ev["gflops"], fp32)


def markdown(result: dict) -> str:
    lines = [
        f"# elbox benchmarks: {result['machine']}, {result['date']}",
        "",
        f"torch {result['torch']}, {result['threads']} threads, CPU capability {result['cpu_capability']}, "
        f"git {result['git']}. Command: `{result['command']}`.",
        "",
    ]
    for dev in result["devices"]:
        ref = dev["reference_gflops"]
        lines += [
            f"## {dev['device']}",
            "",
            f"Matrix-product rate measured in this run: float32 {ref['float32']:.1f} GFLOP/s, "
            f"bfloat16 {ref['bfloat16']:.1f} GFLOP/s (bf16 native: {dev['bf16_native']}).",
            "",
            "| family | options | images/s | ms/step | GFLOP/s | % of fp32 rate | × eager fp32 | first step (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fam in dev["families"]:
            for run in fam["training"]:
                warn = " ⚠" if run["cpu_contention"] > 0.05 else ""
                lines.append(
                    f"| {fam['family']} ({fam['parameters'] / 1e6:.2f} M params, "
                    f"{fam['train_gflop_per_image'] * 1e3:.1f} "
                    f"MFLOP/img) | {run['options']} | {run['images_per_s']:.0f}{warn} | {run['ms_per_step']:.1f} | "
                    f"{run['gflops']:.1f} | {100 * run['fraction_of_fp32_rate']:.0f} % | "
                    f"{run['speedup_vs_eager_fp32']:.2f} | "
                    f"{run['time_to_first_step_s']:.1f} |"
                )
        lines += [
            "",
            "| family | evaluation | examples | images/s | GFLOP/s | % of fp32 rate | peak RSS after fp32 training "
            "(GB) | peak RSS, whole child (GB) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fam in dev["families"]:
            ev = fam["evaluation"]
            warn = " ⚠" if ev["cpu_contention"] > 0.05 else ""
            lines.append(
                f"| {fam['family']} | {ev['what']} | {ev['examples']} | {ev['images_per_s']:.2f}{warn} | "
                f"{ev['gflops']:.1f} | "
                f"{100 * ev['fraction_of_fp32_rate']:.0f} % | {fam['peak_rss_gb_after_fp32_training']:.2f} | "
                f"{fam['peak_rss_gb_end']:.2f} |"
            )
        if "cli_training" in dev:
            c = dev["cli_training"]
            lines += ["", f"Peak RSS of `{c['command']}`: **{c['peak_rss_gb']:.2f} GB** ({c['seconds']:.0f} s)."]
        for fam in dev["families"]:
            lines += [
                "",
                f"### Profile: {fam['family']}, eager fp32 training step (torch.profiler, self time)",
                "",
                "| operator | ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{p['op']}` | {p['ms_per_step']:.2f} | {100 * p['share']:.1f} % | {p['calls_per_step']:.0f} |"
                for p in fam["profile"]
            ]
        lines.append("")
    lines.append("⚠: other processes used more than 5 % of the CPUs during the measurement.")
    for dev in result["devices"]:
        if dev.get("failed"):
            lines.append(f"\nFailed on {dev['device']} (see the run's output): {', '.join(dev['failed'])}.")
    return "\n".join(lines) + "\n"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--seconds", type=float, default=20.0, help="steady-state seconds per training measurement")
    parser.add_argument("--out", default=None, help="JSON path (default results/<machine>-<date>.json; .md beside it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory_in_heap()
    threads = set_threads(None)
    if args.child:
        device = torch.device(args.devices[0])
        out = (
            cli_training_peak_rss(device) if args.child == "cli-train" else run_family(args.child, device, args.seconds)
        )
        Path(args.json).write_text(json.dumps(out))
        return 0
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    date = datetime.date.today().isoformat()
    result = {
        "machine": machine_name(),
        "date": date,
        "torch": torch.__version__,
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "git": git_revision(),
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "devices": [],
    }
    for name in devices:
        device = torch.device(name)
        dev = {
            "device": name if name == "cpu" else torch.cuda.get_device_name(device),
            "bf16_native": bf16_is_native(device),
            "reference": {
                "float32": [matmul_rate(device, torch.float32)],
                "bfloat16": [matmul_rate(device, torch.bfloat16)],
            },
            "families": [],
        }
        print(
            f"{name}: float32 {dev['reference']['float32'][0]['gflops']:.1f} GFLOP/s, "
            f"bfloat16 {dev['reference']['bfloat16'][0]['gflops']:.1f} GFLOP/s",
            flush=True,
        )
        for family in args.families:
            print(f"{name}: {family} ...", flush=True)
            measured = child(family, device, args.seconds)
            if measured is None:
                dev.setdefault("failed", []).append(family)
            else:
                dev["families"].append(measured)
        if "vae" in args.families and (measured := child("cli-train", device, args.seconds)) is not None:
            dev["cli_training"] = measured
        for dtype, key in [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")]:
            dev["reference"][key].append(matmul_rate(device, dtype))
        summarize(dev)
        result["devices"].append(dev)
    out = Path(args.out) if args.out else RESULTS / f"{result['machine']}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
