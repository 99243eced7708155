"""The cost of the ConvHVAE row's protocol on this CPU: the time of one training step (batch 100) and of validating
10,000 images of `--hvae-type conv-skip` (Tomczak & Welling's ConvHVAE, 2,210,861 parameters), eager and compiled,
on --threads threads, and the hours of an epoch and of a run to the protocol's early stop.

    python benchmarks/reproduce/convhvae_cost.py [--threads 1] [--steps 20] [--epochs 500 1000 2000]

Writes benchmarks/results/reproduce-convhvae-cost-DATE.json. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elbox.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def seconds(threads: int, steps: int, compiled: bool) -> tuple[float, float]:
    """(seconds per training step of batch 100, seconds to validate 10,000 images)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(
        "hvae", {"data_shape": [1, 28, 28], "hvae_type": "conv-skip", "logvar_bounds": [-6.0, 2.0], "weight_init": "he"}
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)
    x = (torch.rand(100, 1, 28, 28) < 0.3).float()

    def loss(x):
        terms = model.elbo(x)
        return -(terms.reconstruction - terms.kl_total).mean()

    objective = torch.compile(loss) if compiled else loss

    def step():
        value = objective(x)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per_step = (time.perf_counter() - start) / steps
    with torch.no_grad():
        start = time.perf_counter()
        model.elbo(torch.cat([x] * 10))
        validation = (time.perf_counter() - start) * 10
    return per_step, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, nargs="+", default=[500, 1000, 2000])
    args = parser.parse_args()
    result = {"threads": args.threads, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for mode in ("eager", "compiled"):
        step, validation = seconds(args.threads, args.steps, mode == "compiled")
        epoch = 500 * step + validation
        result[mode] = {
            "step_s": step,
            "validation_s": validation,
            "epoch_s": epoch,
            "hours_for_epochs": {str(n): n * epoch / 3600 for n in args.epochs},
        }
        print(
            f"{mode:8s} {step:.2f} s a step, {epoch / 60:.1f} min an epoch, "
            + ", ".join(f"{n} epochs {n * epoch / 3600:.0f} h" for n in args.epochs),
            flush=True,
        )
    out = ROOT / "benchmarks" / "results" / f"reproduce-convhvae-cost-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
