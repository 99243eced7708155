"""Encoder tightening and the split of the inference gap (Cremer, Li & Duvenaud 2018).

With the decoder fixed, log p(x) - ELBO(q) = KL(q(z|x) || p(z|x)), so maximizing the ELBO over q alone
can only shrink the gap. On a split:

    total gap          = log p(x) - L[q_phi]      the amortized encoder
    approximation gap  = log p(x) - L[q*]         q* = the best diagonal Gaussian, found per example
    amortization gap   = L[q*] - L[q_phi]

log p(x) is exact where the model has `log_prob`; otherwise it is the IWAE-K estimate (K stated), a
lower bound, so the approximation gap is then a lower bound too.

A model supports tightening when it has
    posterior_params(x) -> (mean, std)   its amortized diagonal Gaussian q(z|x)
    log_joint(x, z) -> [S, B]            log p(x, z) for latents z [S, B, d]
    encoder_parameters() -> parameters   what "refit the encoder" may change

tighten_run refits the encoder on a subset tied to its limit: the first max(REFIT_PER_EXAMPLE * limit,
REFIT_MIN_EXAMPLES) training images (all of them without a limit), and selects the best epoch on as many validation
images (at most the whole validation split). Each stage shows a progress bar (progress=True): the refit epochs, the
IWAE or exact log p(x), and the per-example optimization.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from elbox.core.bounds import LOG_2PI, mean_and_stderr
from elbox.core.command_options import TightenOptions
from elbox.core.errors import ElboxError
from elbox.core.progress import progress_bar
from elbox.data import DataSpace, iterate_batches, space_from_record
from elbox.evaluation.runs import data_in_space, evaluation_split, run_examples
from elbox.io.checkpoint import load_run
from elbox.models.base import ExactLikelihood, LatentVariableModel, Tightenable
from elbox.models.estimates import iwae_per_example, log_prob_per_example

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler

REFIT_PER_EXAMPLE = 10  # training images of the encoder refit per tightened example ...
# Monte Carlo draws per step of the regret's per-example refit: 1 (measured, OOD VAE, 300 Fashion-MNIST against 300
# digits, 100 steps: AUROC 0.9949 with 1 draw, 0.9954 with 8 at 3.3x the time; s.e. about 0.003)
REFIT_SAMPLES = 1
REFIT_MIN_EXAMPLES = 5000  # ... and at least this many (or the whole training split, if smaller)


def check_tightenable(model: LatentVariableModel) -> None:
    if not isinstance(model, Tightenable):
        raise ElboxError(
            f"tighten does not apply to the {model.name} model: it splits the gap of an amortized Gaussian "
            "encoder q(z|x), which the vae model has (and the linear model trained with --encoder "
            "amortized); use elbox evaluate for the others' bounds"
        )


class SeededNoise:
    """Standard-normal draws for the rows of several examples, each example's from its own generator seeded with
    seeds[i] (counts[i] consecutive rows each), so an example's draws do not depend on the examples batched with it."""

    def __init__(self, seeds: list[int], counts: list[int], device: torch.device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.counts, self.device = counts, device

    def __call__(self, n_samples: int, dim: int) -> Tensor:
        """[n_samples, rows, dim]"""
        draws = [torch.randn(n_samples, n, dim, generator=g) for g, n in zip(self.generators, self.counts, strict=True)]
        return torch.cat(draws, 1).to(self.device)


def draw_noise(mean: Tensor, n_samples: int, noise: SeededNoise | None) -> Tensor:
    """eps [n_samples, *mean.shape] ~ N(0, I): from `noise` if given, else from the global generator."""
    if noise is None:
        return torch.randn((n_samples, *mean.shape), dtype=mean.dtype, device=mean.device)
    return noise(n_samples, mean.shape[-1]).to(mean.dtype)


def gaussian_q_elbo(
    model: LatentVariableModel,
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    n_samples: int,
    noise: SeededNoise | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """ELBO [B] of an explicit diagonal Gaussian q = N(mean, std^2): E_q[log p(x, z)] + H[q], H analytic; the
    reparameterized draws z = mean + std * eps use the given eps, else draw_noise's."""
    eps = draw_noise(mean, n_samples, noise) if eps is None else eps
    entropy = (std.log() + 0.5 * (1 + LOG_2PI)).sum(-1)
    return model.log_joint(x, mean + std * eps).mean(0) + entropy


def optimize_per_example_q(
    model: LatentVariableModel,
    x: Tensor,
    steps: int = 300,
    lr: float = 0.05,
    n_samples: int = 16,
    on_step: Callable[[int, int], None] | None = None,
    noise: SeededNoise | None = None,
) -> tuple[Tensor, Tensor]:
    """Best diagonal Gaussian q per example (semi-amortized: starts at the encoder's q), decoder fixed.

    Adam on each example's (mean, log std) with reparameterized Monte Carlo ELBO gradients and a cosine
    learning-rate decay, so the iterates settle instead of jittering around the optimum; the examples are
    independent, so one optimizer over the batch is the same as one per example. Each example keeps the
    optimized q only where it beats the encoder's q on a common set of 64 samples (paired comparison).
    on_step(done, steps) is called after each step; the draws come from `noise` if given (draw_noise).
    """
    with torch.no_grad():
        mean0, std0 = model.posterior_params(x)
    mean = mean0.clone().requires_grad_(True)
    log_std = std0.log().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([mean, log_std], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        loss = -gaussian_q_elbo(model, x, mean, log_std.exp(), n_samples, noise).sum()
        mean.grad, log_std.grad = torch.autograd.grad(loss, [mean, log_std])  # the model's .grad untouched
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step + 1, steps)
    mean, std = mean.detach(), log_std.detach().exp()
    optimized, initial = paired_elbos(model, x, (mean, std), (mean0, std0), noise=noise)
    keep = (optimized >= initial).unsqueeze(-1)
    return torch.where(keep, mean, mean0), torch.where(keep, std, std0)


@torch.no_grad()
def paired_elbos(
    model: LatentVariableModel,
    x: Tensor,
    q: tuple[Tensor, Tensor],
    q0: tuple[Tensor, Tensor],
    n_samples: int = 64,
    noise: SeededNoise | None = None,
) -> tuple[Tensor, Tensor]:
    """The ELBOs [B] of two diagonal Gaussians q and q0 on the same n_samples standard-normal draws (a paired
    comparison); the global generator's state is left as it was."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        eps = draw_noise(q[0], n_samples, noise)
    return gaussian_q_elbo(model, x, *q, n_samples, eps=eps), gaussian_q_elbo(model, x, *q0, n_samples, eps=eps)


def likelihood_regret(
    model: LatentVariableModel,
    x: Tensor,
    steps: int = 100,
    lr: float = 0.05,
    n_samples: int = REFIT_SAMPLES,
    noise: SeededNoise | None = None,
) -> Tensor:
    """The likelihood regret of each example [B] (Xiao et al. 2020): how much its ELBO rises when q is fitted to it
    alone (optimize_per_example_q, decoder fixed) over the amortized encoder's q, on 64 common draws: >= 0, and large
    where the encoder has not seen data like x. The draws come from `noise` if given (draw_noise)."""
    with torch.no_grad():
        q0 = model.posterior_params(x)
    with torch.enable_grad():
        q = optimize_per_example_q(model, x, steps, lr, n_samples, noise=noise)
    elbo, elbo0 = paired_elbos(model, x, q, q0, noise=noise)
    return (elbo - elbo0).double()


@torch.no_grad()
def _mean_elbo(model: LatentVariableModel, x: Tensor, batch_size: int = 1000) -> float:
    return torch.cat([model.elbo(x[s : s + batch_size]).elbo for s in range(0, x.shape[0], batch_size)]).mean().item()


def refit_encoder(
    model: LatentVariableModel,
    train_data: Tensor,
    val_x: Tensor,
    space: DataSpace,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> tuple[LatentVariableModel, list[dict]]:
    """A copy of the model whose amortized encoder is retrained on the ELBO with the decoder frozen.

    The validation ELBO (val_x, already in the data space) is measured before training and after each
    epoch, and the best encoder is kept: in exact arithmetic the refit can only shrink KL(q || p(z|x)),
    and model selection keeps optimizer noise from undoing that. Returns (model, per-epoch records).
    progress: a bar per epoch over its batches.
    """
    check_tightenable(model)
    refit = copy.deepcopy(model)
    for p in refit.parameters():
        p.requires_grad_(False)
    encoder = list(refit.encoder_parameters())
    for p in encoder:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(encoder, lr=lr)
    generator = torch.Generator(device=train_data.device).manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[val_x.device] if val_x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        best_elbo = _mean_elbo(refit.eval(), val_x)
    best_state = copy.deepcopy(refit.state_dict())
    records = [{"epoch": 0, "val_elbo": best_elbo}]
    for epoch in range(1, epochs + 1):
        refit.train()
        batches = list(iterate_batches(train_data.shape[0], batch_size, True, shuffle))
        with progress_bar(len(batches), f"refit epoch {epoch}/{epochs}", progress, unit="batch") as shown:
            for idx in batches:
                x = space.train_batch(train_data[idx.to(train_data.device)], generator)
                loss = -refit.elbo(x).elbo.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                shown.update(1)
        with torch.random.fork_rng(devices=[val_x.device] if val_x.device.type == "cuda" else []):
            torch.manual_seed(seed)  # the same samples for every epoch's validation ELBO: a paired comparison
            val_elbo = _mean_elbo(refit.eval(), val_x)
        records.append({"epoch": epoch, "val_elbo": val_elbo})
        if val_elbo > best_elbo:
            best_elbo, best_state = val_elbo, copy.deepcopy(refit.state_dict())
    refit.load_state_dict(best_state)
    for p in refit.parameters():
        p.requires_grad_(True)
    return refit.eval(), records


def gap_split(
    model: LatentVariableModel,
    x: Tensor,
    refit: LatentVariableModel | None = None,
    steps: int = 300,
    lr: float = 0.05,
    iw_samples: int = 1000,
    elbo_samples: int = 100,
    batch_size: int = 100,
    log_prob_offset: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """The approximation / amortization split of the gap on x, in nats per example, with standard errors.
    progress: bars over the IWAE estimate of log p(x) and over the per-example optimization's steps."""
    check_tightenable(model)
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if isinstance(model, ExactLikelihood):
            log_px, source = log_prob_per_example(model, x, batch_size), "exact"
        else:
            log_px, source = iwae_per_example(model, x, iw_samples, batch_size, progress=progress), f"IWAE-{iw_samples}"
        amortized, best, refitted = [], [], []
        starts = range(0, x.shape[0], batch_size)
        shown = progress_bar(len(starts) * steps, f"per-example q ({x.shape[0]} examples)", progress)
        for s in starts:
            xb = x[s : s + batch_size]
            with torch.no_grad():
                amortized.append(gaussian_q_elbo(model, xb, *model.posterior_params(xb), elbo_samples).double().cpu())
                if refit is not None:
                    refitted.append(
                        gaussian_q_elbo(refit, xb, *refit.posterior_params(xb), elbo_samples).double().cpu()
                    )
            mean, std = optimize_per_example_q(model, xb, steps, lr, on_step=lambda done, total: shown.update(1))
            with torch.no_grad():
                best.append(gaussian_q_elbo(model, xb, mean, std, elbo_samples).double().cpu())
        shown.close()
    log_px = log_px + log_prob_offset
    elbo_amortized = torch.cat(amortized) + log_prob_offset
    elbo_best = torch.cat(best) + log_prob_offset
    result: dict = {
        "n_examples": x.shape[0],
        "units": "nats per example",
        "log_px_source": source,
        "per_example_steps": steps,
        "elbo_samples": elbo_samples,
    }
    result["log_px"], result["log_px_stderr"] = mean_and_stderr(log_px)
    result["elbo_amortized"], result["elbo_amortized_stderr"] = mean_and_stderr(elbo_amortized)
    result["elbo_per_example"], result["elbo_per_example_stderr"] = mean_and_stderr(elbo_best)
    result["gap_total"], result["gap_total_stderr"] = mean_and_stderr(log_px - elbo_amortized)
    result["gap_approximation"], result["gap_approximation_stderr"] = mean_and_stderr(log_px - elbo_best)
    result["gap_amortization"], result["gap_amortization_stderr"] = mean_and_stderr(elbo_best - elbo_amortized)
    if refit is not None:
        elbo_refit = torch.cat(refitted) + log_prob_offset
        result["elbo_refit_encoder"], result["elbo_refit_encoder_stderr"] = mean_and_stderr(elbo_refit)
        result["gap_refit_encoder"], result["gap_refit_encoder_stderr"] = mean_and_stderr(log_px - elbo_refit)
    return result


def refit_size(limit: int | None) -> int | None:
    """Training images of the encoder refit for `limit` tightened examples (None: all)."""
    return None if limit is None else max(REFIT_PER_EXAMPLE * limit, REFIT_MIN_EXAMPLES)


def refit_examples(config: dict, seed: int, n: int | None) -> tuple[Tensor, Tensor, str]:
    """(examples to refit the encoder on, examples to choose its best epoch on, what those are): a built-in dataset's
    first n training and n validation images; for your own data, whose validation part is what tighten measures, the
    first n training examples and the next n (half each when there are fewer than 2n)."""
    if "name" in config["data"]:
        return (
            run_examples(config, "train", seed, n),
            run_examples(config, "validation", seed, n),
            "validation images",
        )
    rows = run_examples(config, "train", seed, None)
    n = min(n or rows.shape[0] // 2, rows.shape[0] // 2)
    return rows[:n], rows[n : 2 * n], "training examples it did not refit on"


def tighten_run(
    run_dir: str,
    device: torch.device,
    split: str = TightenOptions.split,
    limit: int | None = TightenOptions.limit,
    steps: int = TightenOptions.steps,
    lr: float = TightenOptions.lr,
    refit_epochs: int = TightenOptions.refit_epochs,
    iw_samples: int = TightenOptions.iw_samples,
    elbo_samples: int = TightenOptions.elbo_samples,
    seed: int = TightenOptions.seed,
    progress: bool = True,
) -> dict:
    """gap_split on the first `limit` examples of a run's split, after refitting the encoder for refit_epochs on the
    first refit_size(limit) examples of its training split (0: no refit), keeping the epoch best on as many examples
    it did not fit and does not measure: a built-in dataset's validation split, or for your own data (measured on
    its validation part) the training examples after those of the refit. Progress bars on stderr for each stage
    (progress=False: none). Returns the JSON-ready result."""
    model, config = load_run(run_dir, device)
    check_tightenable(model)
    data = config["data"]
    x, offset, _ = data_in_space(model, run_examples(config, split, seed, limit), split, None, seed, None)
    refit = None
    if refit_epochs:
        train_images, val_images, chosen_on = refit_examples(config, seed, refit_size(limit))
        val_x, _, _ = data_in_space(model, val_images, "validation", None, seed, None)
        rule = (
            "all of them"
            if limit is None
            else f"{REFIT_PER_EXAMPLE} per example of --limit, at least {REFIT_MIN_EXAMPLES}"
        )
        LOG.info(
            f"refitting the encoder for {refit_epochs} epoch(s) with the decoder frozen on the first "
            f"{train_images.shape[0]} training examples ({rule}, or as many as there are), keeping the epoch best on "
            f"{val_x.shape[0]} {chosen_on}"
        )
        refit, history = refit_encoder(
            model,
            train_images.to(device),
            val_x,
            space_from_record(data),
            epochs=refit_epochs,
            seed=seed,
            progress=progress,
        )
        for record in history:
            LOG.info(f"refit epoch {record['epoch']}: validation ELBO {record['val_elbo'] + offset:.3f} nats")
    result = gap_split(
        model,
        x,
        refit,
        steps=steps,
        lr=lr,
        iw_samples=iw_samples,
        elbo_samples=elbo_samples,
        log_prob_offset=offset,
        seed=seed,
        progress=progress,
    )
    result.update(
        split=evaluation_split(data, None, split),
        refit_epochs=refit_epochs,
        dataset=data.get("name", data.get("path", "data given in memory")),
        model=config["model"],
    )
    if refit_epochs:
        result["refit_examples"] = train_images.shape[0]
    return result


def format_gap_table(result: dict) -> str:
    def row(label: str, key: str) -> tuple[str, str]:
        return label, f"{result[key]:.3f} ± {result[key + '_stderr']:.3f} nats"

    rows = [("examples", str(result["n_examples"])), row(f"log p(x) ({result['log_px_source']})", "log_px")]
    rows.append(row("ELBO, amortized encoder", "elbo_amortized"))
    if "elbo_refit_encoder" in result:
        rows.append(row("ELBO, refitted encoder", "elbo_refit_encoder"))
    rows.append(row(f"ELBO, per-example q ({result['per_example_steps']} steps)", "elbo_per_example"))
    rows.append(row("total gap", "gap_total"))
    rows.append(row("  approximation gap", "gap_approximation"))
    rows.append(row("  amortization gap", "gap_amortization"))
    if "gap_refit_encoder" in result:
        rows.append(row("gap after refitting the encoder", "gap_refit_encoder"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + (
        f"\n(ELBOs from {result['elbo_samples']} samples per example; gaps are paired differences)"
    )
