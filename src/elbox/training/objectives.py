"""Training objectives, applied by the trainer to a model's ELBOTerms (the model never bakes a schedule in).

  "elbo"  reconstruction - beta * KL, beta constant, linearly warmed up or cyclical (Fu et al. 2019), and
          optionally free bits (Kingma et al. 2016): the KL term becomes sum_groups max(free_bits, batch-mean KL_group).
  "iwae"  the IWAE_K estimate logsumexp_k log w_k - log K (K = iw_samples, Burda et al. 2016) with the gradient
          estimator "reparam", "stl" (Roeder et al. 2017) or "dreg" (Tucker et al. 2019); see elbox.core.bounds.

Every reported ELBO is the true ELBO with beta = 1; the training objective's value is logged separately.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from elbox.core.bounds import (
    DETACHED_POSTERIOR_ESTIMATORS,
    ELBOTerms,
    check_iwae_estimator,
    dreg_reweight_latent_gradient,
    free_bits_kl,
    iwae_objective,
)
from elbox.core.errors import ElboxError
from elbox.io.run_config import TrainConfig
from elbox.models.base import ImportanceSampled, LatentVariableModel


def beta_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """KL weight of the training objective at an optimizer step (counted from 0).

    cyclical (Fu et al. 2019): the schedule repeats every cycle_epochs; within a cycle, at position
    tau in [0, 1), beta rises linearly from 0 to `beta` while tau < cycle_ramp_fraction, then stays at `beta`.
    """
    if config.beta_schedule == "cyclical":
        cycle_steps = config.cycle_epochs * steps_per_epoch
        tau = math.fmod(step, cycle_steps) / cycle_steps
        return config.beta * min(1.0, tau / config.cycle_ramp_fraction)
    warmup_steps = config.warmup_epochs * steps_per_epoch
    if config.beta_schedule == "constant" or warmup_steps == 0:
        return config.beta
    return config.beta * min(1.0, step / warmup_steps)


def elbo_training_objective(terms: ELBOTerms, beta: float, free_bits: float = 0.0) -> Tensor:
    """Batch mean of reconstruction - beta * KL; with free bits > 0 the KL term is sum_groups max(free_bits,
    batch-mean KL_group) (elbox.core.bounds.free_bits_kl). A scalar to maximize."""
    if free_bits > 0:
        return terms.reconstruction.mean() - beta * free_bits_kl(terms.kl, free_bits)
    return (terms.reconstruction - beta * terms.kl_total).mean()


def iwae_training_objective(model: LatentVariableModel, x: Tensor, k: int, estimator: str) -> tuple[Tensor, ELBOTerms]:
    """Per-example IWAE_K estimate [B] whose gradient is the chosen estimator's ("reparam", "stl", "dreg"; the
    value is the same for all three, see elbox.core.bounds), and ELBOTerms for reporting: the reconstruction
    averaged over the same K draws and the analytic KL."""
    check_iwae_estimator(estimator)
    samples = model.importance_samples(x, k, detach_posterior_params=estimator in DETACHED_POSTERIOR_ESTIMATORS)
    if estimator == "dreg":
        dreg_reweight_latent_gradient(samples.z, samples.log_w)
    return iwae_objective(samples.log_w), samples.terms


class TrainingObjective(nn.Module):
    """One step's objective as a forward pass, (objective to maximize, ELBOTerms for reporting), so that
    DistributedDataParallel, which synchronizes the gradients of what runs through forward, can wrap it."""

    def __init__(self, model: LatentVariableModel, config: TrainConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, x: Tensor, beta: float) -> tuple[Tensor, ELBOTerms]:
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            objective, terms = self._objective(x, beta)
        if self.config.precision == "bf16":  # the logged terms and the loss in float32
            terms = ELBOTerms(
                terms.reconstruction.float(),
                {k: v.float() for k, v in terms.kl.items()},
                None if terms.objective is None else terms.objective.float(),
                terms.inexact_kl,
            )
            objective = objective.float()
        return objective, terms

    def _objective(self, x: Tensor, beta: float) -> tuple[Tensor, ELBOTerms]:
        if self.config.objective == "iwae":
            per_example, terms = iwae_training_objective(self.model, x, self.config.iw_samples, self.config.estimator)
            return per_example.mean(), terms
        terms = self.model.elbo(x, n_samples=self.config.n_samples)
        if terms.objective is not None:  # the model's own surrogate (checked free of beta and free bits)
            return terms.objective.mean(), terms
        return elbo_training_objective(terms, beta, self.config.free_bits), terms


def warn_if_schedule_outlasts_run(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> None:
    """A warning when the KL weight has not reached its final value by the run's last step (a warm-up longer than
    the run, or a cyclical schedule cut in a ramp): the model was then trained on a different objective than the
    ELBO it is judged by, and looks worse than it would."""
    if config.beta_schedule == "constant" or total_steps == 0:
        return
    final = beta_at(config, total_steps - 1, steps_per_epoch)
    if final < config.beta * (1 - 1e-9):
        length = (
            f"its {config.warmup_epochs:g}-epoch KL warm-up"
            if config.beta_schedule == "linear"
            else f"its cyclical KL schedule (cycles of {config.cycle_epochs:g} epochs)"
        )
        warnings.warn(
            f"the run's {total_steps} steps end inside {length}: the last step trains with beta = {final:.3g}, "
            f"not {config.beta:g}; give more --epochs or a shorter --warmup-epochs",
            stacklevel=3,
        )


def check_training_settings(model: LatentVariableModel, config: TrainConfig) -> None:
    """ElboxError for settings the model cannot train with: the iwae objective without importance samples, a
    detached-posterior estimator for a posterior that cannot be detached, free bits on terms that are not KLs,
    beta or iwae for a model trained on its own surrogate loss."""
    if config.objective == "iwae" and not isinstance(model, ImportanceSampled):
        raise ElboxError(f"the iwae objective needs a model with importance_samples; {type(model).__name__} has none")
    if (
        config.objective == "iwae"
        and config.estimator in DETACHED_POSTERIOR_ESTIMATORS
        and not model.detachable_posterior
    ):
        raise ElboxError(
            f"the {config.estimator} estimator is not available for the {type(model).__name__}: its posterior's "
            "parameters depend on earlier draws and cannot be detached; use --estimator reparam"
        )
    if config.free_bits > 0 and model.inexact_kl_terms:
        raise ElboxError(
            f"free bits need KL terms that are KL divergences; the {type(model).__name__}'s terms "
            f"{', '.join(sorted(model.inexact_kl_terms))} are single-sample log q - log p estimates (they can be "
            "negative). Use KL warm-up instead"
        )
    if model.trains_on_surrogate and (
        config.beta_schedule != "constant" or config.beta != 1 or config.free_bits > 0 or config.objective != "elbo"
    ):
        raise ElboxError(
            f"the {type(model).__name__} trains on its own surrogate loss; beta, its schedules, free bits and the "
            "iwae objective do not apply"
        )
