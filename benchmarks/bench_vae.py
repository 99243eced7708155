"""Throughput benchmark of the default MLP VAE: one training epoch and an IWAE-K evaluation.

Measures, in one run:
  1. the float32 matrix-product rate of this machine (square torch.mm, best of several repeats,
     measured before, between and after the phases; the best is the peak), plus the rate of the
     exact matmul shapes the VAE uses ("shape-matched" references);
  2. one epoch of Fashion-MNIST training (55000 images, batch 128) with elbox.training.trainer.Trainer;
  3. IWAE-K (default K = 5000) on the first test images with elbox.models.estimates.iwae_per_example;
and reports images/s, achieved GFLOP/s and the fraction of the square-matmul peak, writing the
figures as JSON (default benchmarks/results/vae_<device>.json).

Model FLOPs are counted analytically from the nn.Linear layers only (2 * in * out per example for a
forward pass; training = 3x forward: forward, backward for inputs, backward for weights). Bias adds,
activations, the likelihood, the KL and the optimizer are not counted: they are overhead.

On a shared machine other processes stall the OpenMP-parallel kernels; every timed phase records
the CPU time other processes used meanwhile (from /proc/stat) and the summary flags phases where it
exceeded 5 % of the CPUs. --repeats N times each phase N times and keeps the best.

Usage: .venv/bin/python benchmarks/bench_vae.py [--device cpu|cuda] [--epochs 1] [--iw-samples 5000]
                                                [--iw-examples 500] [--repeats 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from elbox.core.system import keep_freed_memory_in_heap
from elbox.data import get_data_space, load_split
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.models.estimates import CPU_MAX_DECODER_ELEMENTS, iwae_per_example, samples_per_pass
from elbox.training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_FRACTION = 0.60


# ----------------------------------------------------------------------------------------------
# Timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Best wall time of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class CpuMonitor:
    """CPU time used by other processes (and stolen by the hypervisor) while a phase runs.

    Reads /proc/stat (all CPUs) and os.times() (this process, all threads, and its children that ended in the phase):
    other = busy - own.
    On a shared 2-core machine another process on one core stalls every OpenMP-parallel kernel, so a
    phase with a sizeable `other_fraction` is not a clean measurement.
    """

    def __init__(self):
        self.available = Path("/proc/stat").exists()

    @staticmethod
    def _stat() -> tuple[float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(f) for f in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
        hz = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / hz, steal / hz

    def __enter__(self):
        if self.available:
            self.busy0, self.steal0 = self._stat()
        t = os.times()  # with the children waited for (a phase run as a subprocess)
        self.own0, self.wall0 = t.user + t.system + t.children_user + t.children_system, time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system - self.own0
        cpus = os.cpu_count() or 1
        self.result = {"wall_s": wall, "own_cpu_s": own, "cpus": cpus}
        if self.available:
            busy, steal = self._stat()
            other = max(0.0, busy - self.busy0 - own)
            self.result.update(
                other_cpu_s=other,
                steal_cpu_s=steal - self.steal0,
                other_fraction=other / (wall * cpus),
                steal_fraction=(steal - self.steal0) / (wall * cpus),
            )
        return False


def contention_note(monitor: CpuMonitor, threshold: float = 0.05) -> str:
    r = monitor.result
    share = r.get("other_fraction", 0.0) + r.get("steal_fraction", 0.0)
    if share <= threshold:
        return ""
    return f"  [WARNING: other processes or the hypervisor took {share:.0%} of the CPUs meanwhile; figure not clean]"


def repeats_for(flops: float, rate_guess: float, budget_s: float, lo: int = 5, hi: int = 500) -> int:
    """How many repeats fit a time budget, given a guess of the achievable rate (FLOP/s)."""
    return int(min(hi, max(lo, budget_s / max(flops / rate_guess, 1e-9))))


# ----------------------------------------------------------------------------------------------
# 1. Reference: the machine's float32 matmul rate


def square_matmul_rates(device: torch.device, sizes: list[int], budget_s: float = 1.0) -> dict[str, float]:
    """GFLOP/s of torch.mm on n x n float32 matrices (FLOPs = 2 n^3), best of repeats, per size."""
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        flops = 2.0 * n**3
        # first guess the rate from one call, then time enough repeats to fill the budget
        t0 = best_time(lambda a=a, b=b: torch.mm(a, b), device, repeats=1, warmup=1)
        reps = repeats_for(flops, flops / t0, budget_s, lo=5, hi=200)
        rates[str(n)] = flops / best_time(lambda a=a, b=b: torch.mm(a, b), device, reps, warmup=2) / 1e9
    return rates


def linear_layers(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def linear_matmuls(layers: list[nn.Linear], rows: int, training: bool, input_grad_first: bool = True):
    """The matmuls nn.Linear performs for `rows` inputs, with the memory layouts autograd uses.

    Forward: out[B,o] = x[B,i] @ W[o,i]^T. Backward: grad_x[B,i] = g[B,o] @ W[o,i];
    grad_W[o,i] = g[B,o]^T @ x[B,i]. Returns [(name, m, k, n, make_operands)], operands built lazily.
    """
    ops = []
    for j, layer in enumerate(layers):
        i, o = layer.in_features, layer.out_features
        ops.append((f"fwd {rows}x{i} @ {i}x{o}", rows, i, o, "fwd"))
        if training:
            if j > 0 or input_grad_first:
                ops.append((f"bwd-input {rows}x{o} @ {o}x{i}", rows, o, i, "bwd_in"))
            ops.append((f"bwd-weight {o}x{rows} @ {rows}x{i}", o, rows, i, "bwd_w"))
    return ops


def _operands(kind: str, m: int, k: int, n: int, device: torch.device):
    if kind == "fwd":  # x[m,k] @ W[n,k]^T  (W^T is a transposed view, as in F.linear)
        return torch.randn(m, k, device=device), torch.randn(n, k, device=device).t()
    if kind == "bwd_in":  # g[m,k] @ W[k,n]
        return torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    # bwd_w: g[k,m]^T @ x[k,n]  (g^T is a transposed view)
    return torch.randn(k, m, device=device).t(), torch.randn(k, n, device=device)


def shape_matched_rate(ops, device: torch.device, budget_s: float = 0.3) -> dict:
    """Time each matmul shape (best of repeats); the rate of the whole set = total FLOPs / total time."""
    total_flops = total_time = 0.0
    per_shape = []
    for name, m, k, n, kind in ops:
        a, b = _operands(kind, m, k, n, device)
        flops = 2.0 * m * k * n
        t0 = best_time(lambda a=a, b=b: torch.mm(a, b), device, repeats=1, warmup=1)
        reps = repeats_for(flops, flops / t0, budget_s, lo=5, hi=500)
        t = best_time(lambda a=a, b=b: torch.mm(a, b), device, reps, warmup=3)
        per_shape.append({"shape": name, "gflop": flops / 1e9, "time_ms": t * 1e3, "gflops": flops / t / 1e9})
        total_flops += flops
        total_time += t
    return {"gflops": total_flops / total_time / 1e9, "per_shape": per_shape}


# ----------------------------------------------------------------------------------------------
# Model and FLOP counts


def build_default_vae(latent_dim: int, hidden_dims: list[int], device: torch.device, seed: int):
    """The CLI's default VAE: MLP 784-512-(2x20) encoder, 20-512-784 decoder, Bernoulli likelihood."""
    torch.manual_seed(seed)
    config = {
        "data_shape": (1, 28, 28),
        "latent_dim": latent_dim,
        "hidden_dims": hidden_dims,
        "architecture": "mlp",
        "activation": "relu",
        "likelihood": "bernoulli",
    }
    return build_model("vae", config).to(device)


def forward_flops_per_example(module: nn.Module) -> int:
    """2 * in * out summed over the module's Linear layers: forward FLOPs for one input row."""
    return sum(2 * m.in_features * m.out_features for m in linear_layers(module))


# ----------------------------------------------------------------------------------------------
# 2. Training


def time_training(args, device: torch.device, train_images, val_images) -> tuple[dict, nn.Module]:
    space = get_data_space("binary")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    run_dir = tempfile.mkdtemp(prefix="elbox-bench-")  # the Trainer writes nothing unless save() is called

    # Untimed warm-up on a throwaway model: a few batches, so allocator, BLAS and kernel caches are hot.
    if args.warmup_batches > 0:
        warm_model = build_default_vae(args.latent_dim, args.hidden_dims, device, args.seed + 1)
        n_warm = min(train_images.shape[0], args.warmup_batches * args.batch_size)
        warm = Trainer(
            warm_model,
            train_images[:n_warm],
            val_images[:100],
            space,
            TrainConfig(epochs=1, batch_size=args.batch_size, seed=args.seed),
            run_dir,
            progress=False,
        )
        warm.train_epoch(1)
        del warm, warm_model

    attempts = []
    for _attempt in range(args.repeats):
        model = build_default_vae(args.latent_dim, args.hidden_dims, device, args.seed)
        trainer = Trainer(model, train_images, val_images, space, config, run_dir, progress=False)
        epochs = []
        with CpuMonitor() as monitor:
            for epoch in range(1, args.epochs + 1):
                sync(device)
                start = time.perf_counter()
                summary = trainer.train_epoch(epoch)
                sync(device)
                epochs.append(
                    {
                        "epoch": epoch,
                        "time_s": time.perf_counter() - start,
                        "trainer_images_per_s": summary["images_per_s"],
                        "train_elbo": summary.get("train_elbo"),
                    }
                )
        attempts.append(
            {
                "time_s": sum(e["time_s"] for e in epochs),
                "per_epoch": epochs,
                "cpu": monitor.result,
                "note": contention_note(monitor),
            }
        )
    best = min(attempts, key=lambda a: a["time_s"])
    epochs = best["per_epoch"]

    n_images = train_images.shape[0]
    enc, dec = forward_flops_per_example(model.encoder), forward_flops_per_example(model.decoder)
    fwd = enc + dec
    first = linear_layers(model.encoder)[0]
    flops_per_image = 3 * fwd  # the convention of the target: forward + 2x forward for the backward
    # what autograd really needs: no input gradient for the encoder's first layer (x needs no grad)
    flops_needed_per_image = 3 * fwd - 2 * first.in_features * first.out_features
    total_time = sum(e["time_s"] for e in epochs)
    total_images = n_images * args.epochs
    gflops = flops_per_image * total_images / total_time / 1e9
    result = {
        "n_images_per_epoch": n_images,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
        "skipped_steps": trainer.skipped_steps,
        "warmup_batches": args.warmup_batches,
        "timing": "trainer.train_epoch(epoch) timed wholesale (progress=False), after an untimed warm-up; "
        "best of --repeats attempts, each on a freshly built model",
        "per_epoch": epochs,
        "attempts": attempts,
        "cpu_contention": best["cpu"],
        "contention_note": best["note"],
        "time_s": total_time,
        "images_per_s": total_images / total_time,
        "ms_per_step": 1e3 * total_time / (trainer.steps_per_epoch * args.epochs),
        "forward_flops_per_image": fwd,
        "encoder_forward_flops_per_image": enc,
        "decoder_forward_flops_per_image": dec,
        "train_flops_per_image": flops_per_image,
        "train_flops_per_image_without_first_layer_input_grad": flops_needed_per_image,
        "gflops": gflops,
        "gflops_needed_only": flops_needed_per_image * total_images / total_time / 1e9,
        "final_train_elbo": epochs[-1]["train_elbo"],
    }
    return result, model


# ----------------------------------------------------------------------------------------------
# 3. IWAE evaluation


def time_iwae(args, device: torch.device, model: nn.Module, test_images) -> dict:
    space = get_data_space("binary")
    x = space.eval_data(test_images[: args.iw_examples].to(device), seed=0)
    n = x.shape[0]
    batch = min(args.iw_batch_size, n)
    chunk = samples_per_pass(model, batch, CPU_MAX_DECODER_ELEMENTS)
    model.eval()
    # untimed warm-up: one pass's worth of samples on the same batch
    torch.manual_seed(args.seed)
    iwae_per_example(model, x[:batch], min(args.iw_samples, chunk), batch_size=batch)
    attempts = []
    for _attempt in range(args.repeats):
        torch.manual_seed(args.seed)
        with CpuMonitor() as monitor:
            sync(device)
            start = time.perf_counter()
            bound = iwae_per_example(model, x, args.iw_samples, batch_size=batch)
            sync(device)
            elapsed = time.perf_counter() - start
        attempts.append({"time_s": elapsed, "cpu": monitor.result, "note": contention_note(monitor)})
    best = min(attempts, key=lambda a: a["time_s"])
    elapsed = best["time_s"]
    enc, dec = forward_flops_per_example(model.encoder), forward_flops_per_example(model.decoder)
    pairs = n * args.iw_samples
    flops = n * enc + pairs * dec
    gflops = flops / elapsed / 1e9
    return {
        "n_examples": n,
        "k": args.iw_samples,
        "batch_size": batch,
        "samples_per_pass": chunk,
        "max_decoder_elements": CPU_MAX_DECODER_ELEMENTS,
        "timing": "elbox.models.estimates.iwae_per_example timed wholesale, after an untimed one-pass warm-up; "
        "best of --repeats attempts",
        "attempts": attempts,
        "cpu_contention": best["cpu"],
        "contention_note": best["note"],
        "time_s": elapsed,
        "pairs_per_s": pairs / elapsed,
        "images_per_s": n / elapsed,
        "flops": flops,
        "gflops": gflops,
        "mean_iwae_bound_nats": bound.mean().item(),
        "stderr_iwae_bound_nats": (bound.std() / math.sqrt(n)).item() if n > 1 else math.nan,
    }


# ----------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return None
        return rev.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "git_revision": git_revision(),
    }
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iw-samples", type=int, default=5000)
    p.add_argument("--iw-examples", type=int, default=500)
    p.add_argument("--iw-batch-size", type=int, default=500, help="examples per iwae_per_example batch")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[512])
    p.add_argument("--warmup-batches", type=int, default=20, help="untimed training batches on a throwaway model")
    p.add_argument("--limit-train", type=int, default=0, help="train on the first N images only (quick runs)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="time each phase this many times and keep the best")
    p.add_argument("--skip-iwae", action="store_true")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/vae_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_vae: --device cuda asked for, but PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory_in_heap()  # as the elbox CLI does
    device = torch.device(args.device)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / f"vae_{device.type}.json"
    wall_start = time.perf_counter()

    # 1. references: the square-matmul rate is measured before, between and after the phases (the
    # machine's speed drifts on a shared host); the peak is the best of all, so fractions are conservative.
    sizes = [1024, 2048] if device.type == "cpu" else [4096, 8192]
    ref_monitor = CpuMonitor().__enter__()
    square_runs = {"start": square_matmul_rates(device, sizes)}
    ref_model = build_default_vae(args.latent_dim, args.hidden_dims, device, args.seed)
    enc_layers, dec_layers = linear_layers(ref_model.encoder), linear_layers(ref_model.decoder)
    train_ref = shape_matched_rate(linear_matmuls(enc_layers + dec_layers, args.batch_size, training=True), device)
    iw_batch = min(args.iw_batch_size, args.iw_examples)
    iw_rows = iw_batch * min(args.iw_samples, samples_per_pass(ref_model, iw_batch, CPU_MAX_DECODER_ELEMENTS))
    iwae_ref = shape_matched_rate(linear_matmuls(dec_layers, iw_rows, training=False), device)
    del ref_model
    ref_monitor.__exit__(None, None, None)

    # 2. training
    train_images, _ = load_split("fashion-mnist", "train")
    val_images, _ = load_split("fashion-mnist", "validation")
    if args.limit_train:
        train_images = train_images[: args.limit_train]
    training, model = time_training(args, device, train_images, val_images)
    square_runs["after_training"] = square_matmul_rates(device, sizes)

    # 3. IWAE
    iwae = None
    if not args.skip_iwae:
        test_images, _ = load_split("fashion-mnist", "test")
        iwae = time_iwae(args, device, model, test_images)
        square_runs["after_iwae"] = square_matmul_rates(device, sizes)

    square = {n: max(run[n] for run in square_runs.values()) for n in square_runs["start"]}
    peak = max(square.values())
    reference = {
        "square_mm_gflops": square,
        "square_mm_gflops_by_time": square_runs,
        "peak_gflops": peak,
        "peak_note": "best of repeats of torch.mm on n x n float32 matrices, FLOPs = 2 n^3, measured before, "
        "between and after the phases; the best of all is the peak the headline fractions use",
        "train_shape_matched_gflops": train_ref["gflops"],
        "train_shape_matched_fraction_of_peak": train_ref["gflops"] / peak,
        "train_shapes": train_ref["per_shape"],
        "iwae_shape_matched_gflops": iwae_ref["gflops"],
        "iwae_shape_matched_fraction_of_peak": iwae_ref["gflops"] / peak,
        "iwae_shapes": iwae_ref["per_shape"],
        "cpu_contention": ref_monitor.result,
        "contention_note": contention_note(ref_monitor),
    }
    training["fraction_of_peak"] = training["gflops"] / peak
    training["fraction_of_train_shape_matched"] = training["gflops"] / train_ref["gflops"]
    training["meets_target"] = training["fraction_of_peak"] >= TARGET_FRACTION
    if iwae:
        iwae["fraction_of_peak"] = iwae["gflops"] / peak
        iwae["fraction_of_iwae_shape_matched"] = iwae["gflops"] / iwae_ref["gflops"]
        iwae["meets_target"] = iwae["fraction_of_peak"] >= TARGET_FRACTION

    result = {
        "benchmark": "elbox MLP VAE (784-512-20, Bernoulli) on Fashion-MNIST",
        "target_fraction_of_peak": TARGET_FRACTION,
        "environment": environment(device),
        "arguments": vars(args),
        "reference": reference,
        "training": training,
        "iwae": iwae,
        "wall_time_s": time.perf_counter() - wall_start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    env = result["environment"]
    print(
        f"elbox VAE benchmark on {env['cpu_model'] if device.type == 'cpu' else env['gpu_name']} "
        f"({device}, {env['num_threads']} threads, torch {env['torch_version']})"
    )
    drift = ", ".join(f"{when} {max(r.values()):.0f}" for when, r in square_runs.items())
    print(
        f"  reference  peak square float32 mm {peak:8.1f} GFLOP/s  "
        f"(best per size: {', '.join(f'n={n}: {r:.1f}' for n, r in square.items())}; by time: {drift})"
    )
    print(
        f"             shape-matched: training batch {args.batch_size} {train_ref['gflops']:.1f} GFLOP/s "
        f"({train_ref['gflops'] / peak:.0%} of peak), IWAE decoder {iw_rows} rows {iwae_ref['gflops']:.1f} GFLOP/s "
        f"({iwae_ref['gflops'] / peak:.0%}){reference['contention_note']}"
    )
    ok = lambda f: "meets" if f >= TARGET_FRACTION else "below"  # noqa: E731
    print(
        f"  training   {training['images_per_s']:8.0f} images/s  {training['gflops']:7.1f} GFLOP/s  "
        f"{training['fraction_of_peak']:6.1%} of peak ({ok(training['fraction_of_peak'])} the {TARGET_FRACTION:.0%} "
        "target); "
        f"{training['time_s']:.2f} s for {training['epochs']} epoch(s), {training['ms_per_step']:.2f} ms/step, "
        f"train ELBO {training['final_train_elbo']:.2f}{training['contention_note']}"
    )
    if iwae:
        print(
            f"  IWAE-{iwae['k']:<5d} {iwae['pairs_per_s']:8.0f} pairs/s   {iwae['gflops']:7.1f} GFLOP/s  "
            f"{iwae['fraction_of_peak']:6.1%} of peak ({ok(iwae['fraction_of_peak'])} the {TARGET_FRACTION:.0%} "
            "target); "
            f"{iwae['time_s']:.2f} s for {iwae['n_examples']} images, mean bound {iwae['mean_iwae_bound_nats']:.2f} "
            f"nats{iwae['contention_note']}"
        )
    print(f"  written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
