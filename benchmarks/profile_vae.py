"""Where the time goes in the VAE benchmark's two phases: a training epoch and an IWAE-K evaluation.

Runs the real library code (elbox.training.trainer.Trainer.train_epoch and elbox.models.estimates.iwae_per_example)
with thin timing wrappers around the library's own functions and modules, and reports exclusive
wall time per piece (a piece's time excludes the pieces nested inside it):

  training:  gather (train_data[idx]), binarize (space.train_batch), encoder, posterior (softplus,
             chunk), sample z, decoder (per layer), likelihood log_prob, KL, backward,
             clip_grad_norm_, optimizer step, zero_grad, .item() syncs, loop/tqdm/Python rest
  IWAE:      encoder, sample z, decoder layers, likelihood log_prob, prior and posterior
             log-densities, and the rest (float64 logsumexp accumulation, chunking)

Usage: .venv/bin/python benchmarks/profile_vae.py [--train-batches 200] [--iw-samples 1000]
       [--iw-examples 500] [--max-decoder-elements N] [--torch-profiler] [--out benchmarks/results/profile_vae_cpu.json]

Numbers are for the machine at hand; wrappers cost ~1-2 us per call (negligible against ms steps).
The script does not modify the library: wrappers are installed on objects in this process only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_vae import (  # same folder
    CpuMonitor,
    contention_note,
    linear_layers,
    linear_matmuls,
    shape_matched_rate,
)
from torch import nn

import elbox.core.bounds
import elbox.models.vae
import elbox.training.trainer
from elbox.data import get_data_space, load_split
from elbox.io.run_config import TrainConfig
from elbox.models import build_model
from elbox.models.estimates import CPU_MAX_DECODER_ELEMENTS, iwae_per_example, samples_per_pass
from elbox.training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent


class ExclusiveTimer:
    """Accumulates exclusive wall time per named region; nested regions pause their parent."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [name, start of the current uninterrupted stretch]

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            parent = self.stack[-1]
            self.totals[parent[0]] += now - parent[1]
        self.stack.append([name, now])
        self.calls[name] += 1

    def exit(self) -> None:
        now = time.perf_counter()
        name, start = self.stack.pop()
        self.totals[name] += now - start
        if self.stack:
            self.stack[-1][1] = now

    @contextlib.contextmanager
    def region(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


class Patches:
    """Install timing wrappers on attributes; undo them all on exit."""

    def __init__(self, timer: ExclusiveTimer):
        self.timer = timer
        self.undo: list = []
        self.missing: list[str] = []

    def wrap(self, owner, attr: str, name: str) -> None:
        if not hasattr(owner, attr):
            self.missing.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}")
            return
        original = getattr(owner, attr)
        had_own = attr in getattr(owner, "__dict__", {})
        timer = self.timer

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            timer.enter(name)
            try:
                return original(*args, **kwargs)
            finally:
                timer.exit()

        setattr(owner, attr, wrapper)
        self.undo.append((owner, attr, original, had_own))

    def hook_module(self, module: nn.Module, name: str) -> None:
        timer = self.timer
        pre = module.register_forward_pre_hook(lambda m, a: timer.enter(name))
        post = module.register_forward_hook(lambda m, a, o: timer.exit())
        self.undo.append((pre, post))

    def restore(self) -> None:
        for item in reversed(self.undo):
            if len(item) == 2:
                item[0].remove()
                item[1].remove()
                continue
            owner, attr, original, had_own = item
            if had_own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self.undo.clear()


def layer_names(prefix: str, seq: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for _child_name, m in seq.named_modules():
        if isinstance(m, nn.Linear):
            out.append((f"{prefix} linear {m.in_features}->{m.out_features}", m))
        elif len(list(m.children())) == 0 and not isinstance(m, nn.Flatten):
            out.append((f"{prefix} {type(m).__name__.lower()}", m))
    return out


def build_vae(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "vae", {"data_shape": (1, 28, 28), "latent_dim": 20, "hidden_dims": [512], "likelihood": "bernoulli"}
    )


def install_model_patches(p: Patches, model: nn.Module) -> None:
    p.wrap(model, "posterior_params", "posterior: encoder + softplus")
    p.wrap(model.likelihood, "log_prob", "likelihood log_prob")
    p.wrap(elbox.models.vae, "sample_diag_gaussian", "sample z")
    p.wrap(elbox.core.bounds, "sample_diag_gaussian", "sample z")
    p.wrap(elbox.core.bounds, "kl_diag_gaussians", "KL")
    p.wrap(elbox.models.vae, "standard_normal_log_prob", "prior + posterior log-density")
    p.wrap(elbox.models.vae, "diag_gaussian_log_prob_from_noise", "prior + posterior log-density")
    for name, m in layer_names("encoder", model.encoder):
        p.hook_module(m, name)
    for name, m in layer_names("decoder", model.decoder):
        p.hook_module(m, name)


def report(title: str, timer: ExclusiveTimer, total: float, units: int, unit: str) -> list[dict]:
    rows = []
    attributed = sum(timer.totals.values())
    items = sorted(timer.totals.items(), key=lambda kv: -kv[1])
    items.append(("rest: loop, Python, tqdm, unwrapped ops", max(total - attributed, 0.0)))
    print(
        f"\n{title}: {total:.3f} s for {units} {unit}{'es' if unit.endswith('s') else 's'} ({1e3 * total / units:.3f} "
        f"ms per {unit})"
    )
    print(f"  {'piece':<44} {'ms/' + unit:>10} {'share':>7} {'calls':>7}")
    for name, t in items:
        calls = timer.calls.get(name, 0)
        rows.append({"piece": name, "time_s": t, "ms_per_unit": 1e3 * t / units, "share": t / total, "calls": calls})
        print(f"  {name:<44} {1e3 * t / units:10.3f} {t / total:7.1%} {calls:7d}")
    return rows


def profile_training(args) -> dict:
    train_images, _ = load_split("fashion-mnist", "train")
    val_images, _ = load_split("fashion-mnist", "validation")
    n = min(train_images.shape[0], args.train_batches * args.batch_size)
    space = get_data_space("binary")
    model = build_vae(args.seed)
    trainer = Trainer(
        model,
        train_images[:n],
        val_images[:500],
        space,
        TrainConfig(epochs=1, batch_size=args.batch_size, seed=args.seed),
        tempfile.mkdtemp(),
        progress=False,
    )
    trainer.train_epoch(1)  # warm-up, untimed

    # plain timing first (no wrappers), then the same epoch with wrappers
    start = time.perf_counter()
    trainer.train_epoch(2)
    plain = time.perf_counter() - start

    timer = ExclusiveTimer()
    p = Patches(timer)
    install_model_patches(p, model)
    p.wrap(space, "train_batch", "binarize (space.train_batch)")
    p.wrap(torch.Tensor, "__getitem__", "gather train_data[idx]")
    p.wrap(torch.Tensor, "backward", "backward")
    p.wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_ (norms + scale)")
    p.wrap(trainer.optimizer, "step", "optimizer step (fused Adam)")
    p.wrap(trainer.optimizer, "zero_grad", "zero_grad")
    p.wrap(torch.Tensor, "item", ".item() syncs")
    p.wrap(torch, "isfinite", "isfinite checks")
    p.wrap(elbox.training.trainer, "iterate_batches", "iterate_batches (randperm)")
    try:
        with CpuMonitor() as monitor:
            start = time.perf_counter()
            trainer.train_epoch(3)
            total = time.perf_counter() - start
    finally:
        p.restore()
    steps = trainer.steps_per_epoch
    rows = report("training", timer, total, steps, "step")
    layers = linear_layers(model.encoder) + linear_layers(model.decoder)
    floor = shape_matched_rate(
        linear_matmuls(layers, args.batch_size, training=True, input_grad_first=False), torch.device("cpu")
    )
    floor_ms = sum(r["time_ms"] for r in floor["per_shape"])
    print(
        f"  (without wrappers: {1e3 * plain / steps:.3f} ms per step, {n / plain:.0f} images/s; "
        f"the step's 11 matmuls alone, timed bare: {floor_ms:.3f} ms){contention_note(monitor)}"
    )

    prof_table = None
    if args.torch_profiler:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_epoch(4)
        prof_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(prof_table)
    return {
        "steps": steps,
        "batch_size": args.batch_size,
        "time_s": total,
        "plain_time_s": plain,
        "matmul_floor_ms_per_step": floor_ms,
        "cpu_contention": monitor.result,
        "plain_ms_per_step": 1e3 * plain / steps,
        "pieces": rows,
        "unpatched": p.missing,
        "torch_profiler_table": prof_table,
    }


def profile_iwae(args) -> dict:
    test_images, _ = load_split("fashion-mnist", "test")
    space = get_data_space("binary")
    x = space.eval_data(test_images[: args.iw_examples], seed=0)
    model = build_vae(args.seed)
    model.eval()
    batch = min(500, x.shape[0])
    max_el = args.max_decoder_elements or CPU_MAX_DECODER_ELEMENTS
    chunk = min(args.iw_samples, samples_per_pass(model, batch, max_el))
    iwae_per_example(model, x[:batch], chunk, batch, max_el)  # warm-up
    start = time.perf_counter()
    iwae_per_example(model, x, args.iw_samples, batch, max_el)
    plain = time.perf_counter() - start

    timer = ExclusiveTimer()
    p = Patches(timer)
    install_model_patches(p, model)
    try:
        with CpuMonitor() as monitor:
            start = time.perf_counter()
            iwae_per_example(model, x, args.iw_samples, batch, max_el)
            total = time.perf_counter() - start
    finally:
        p.restore()
    passes = -(-args.iw_samples // chunk) * -(-x.shape[0] // batch)
    rows = report(
        f"IWAE-{args.iw_samples} on {x.shape[0]} images (batch {batch}, {chunk} samples per pass)",
        timer,
        total,
        passes,
        "pass",
    )
    pairs = x.shape[0] * args.iw_samples
    floor = shape_matched_rate(
        linear_matmuls(linear_layers(model.decoder), batch * chunk, training=False), torch.device("cpu")
    )
    floor_ms = sum(r["time_ms"] for r in floor["per_shape"])
    print(
        f"  (without wrappers: {plain:.3f} s, {pairs / plain:.0f} pairs/s; the decoder matmuls of one pass alone, "
        f"timed bare: {floor_ms:.1f} ms){contention_note(monitor)}"
    )
    return {
        "k": args.iw_samples,
        "n_examples": x.shape[0],
        "batch_size": batch,
        "samples_per_pass": chunk,
        "max_decoder_elements": max_el,
        "decoder_matmul_floor_ms_per_pass": floor_ms,
        "cpu_contention": monitor.result,
        "passes": passes,
        "time_s": total,
        "plain_time_s": plain,
        "plain_pairs_per_s": pairs / plain,
        "pieces": rows,
        "unpatched": p.missing,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Per-piece timing of the VAE benchmark's training and IWAE phases")
    ap.add_argument("--train-batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--iw-samples", type=int, default=1000)
    ap.add_argument("--iw-examples", type=int, default=500)
    ap.add_argument(
        "--max-decoder-elements",
        type=int,
        default=0,
        help="IWAE pass size bound (default: elbox.models.estimates.CPU_MAX_DECODER_ELEMENTS)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-profiler", action="store_true", help="also print torch.profiler's op table for training")
    ap.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "profile_vae_cpu.json"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = {
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "training": profile_training(args),
        "iwae": profile_iwae(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
