"""The training loop: Adam on a training objective, validation ELBO each epoch, atomic run files.

Training objectives (TrainConfig.objective):
  "elbo"  reconstruction - beta * KL, beta constant, linearly warmed up or cyclical (Fu et al. 2019), and
          optionally free bits: the KL term becomes sum_groups max(free_bits, batch-mean KL_group).
  "iwae"  the IWAE_K estimate logsumexp_k log w_k - log K (K = iw_samples, Burda et al. 2015) with the
          gradient estimator "reparam", "stl" or "dreg" (see elbox.bounds). beta, its schedules and free bits
          are ELBO-only and rejected with it; K = 1 is the ELBO with a Monte Carlo KL.

Every reported ELBO, on training batches and on validation, is the true ELBO with beta = 1. The value of the
training objective itself is logged separately as "objective" (train_objective per epoch).

Mixed precision: precision="bf16" runs the training forward pass under torch.autocast(bfloat16) (on GPUs, and on
CPUs with bf16 matrix units); weights, Adam's state and every validation or evaluation number stay float32. The
training-batch ELBO logged under bf16 is the autocast forward's value, so it carries bf16 rounding.

Speed: compile=True runs the training objective (the model's forward pass and loss, and through AOTAutograd its
backward) through torch.compile; the first steps pay the compilation (benchmarks/run.py records it as time to
first step). channels_last=True keeps convolution weights and batches in NHWC layout. Adam is always the fused
kernel. Defaults (eager, contiguous, fp32) are the fastest measured on a 2-core CPU; see benchmarks/README.md.

Stability options for deep (hierarchical) models: KL warm-up (beta_schedule="linear"), free bits per latent
group (each level of a hierarchical model is a group), gradient-norm clipping (grad_clip), skipping updates
whose gradient norm is non-finite or above grad_skip_threshold (both counted and logged), a cosine learning-
rate decay, and an exponential moving average (EMA) of the weights: with ema_decay > 0, validation and the
saved model.safetensors use the EMA weights.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from elbox.bounds import (
    DETACHED_POSTERIOR_ESTIMATORS,
    IWAE_ESTIMATORS,
    ELBOTerms,
    check_iwae_estimator,
    dreg_reweight_latent_gradient,
    free_bits_kl,
    iwae_objective,
)
from elbox.checkpoint import (
    BEST_WEIGHTS_FILE,
    METRICS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    atomic_write_jsonl,
    check_tensors,
    save_training_state,
    save_weights,
)
from elbox.data import DataSpace, iterate_batches
from elbox.errors import ElboxError
from elbox.evaluate import elbo_per_example
from elbox.loggers import LOGGERS, TensorBoardLog
from elbox.models.base import LatentVariableModel, config_from_dict
from elbox.system import bf16_is_native

BETA_SCHEDULES = ("constant", "linear", "cyclical")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    objective: str = "elbo"  # "elbo" (beta-weighted, optional free bits) or "iwae" (IWAE_K, iw_samples and estimator)
    beta: float = 1.0  # final KL weight of the ELBO objective
    beta_schedule: str = "constant"  # "linear": 0 -> beta over warmup_epochs; "cyclical": see cycle_* below
    warmup_epochs: float = 0.0
    cycle_epochs: float = 0.0  # "cyclical": length of one cycle in epochs (required, > 0)
    cycle_ramp_fraction: float = 0.5  # "cyclical": fraction of each cycle over which beta rises 0 -> beta
    free_bits: float = 0.0  # ELBO objective: floor in nats on each latent group's batch-mean KL; 0 disables
    n_samples: int = 1  # Monte Carlo samples of z per example in the training ELBO
    iw_samples: int = 1  # IWAE objective: importance samples K per example
    estimator: str = "reparam"  # IWAE objective: gradient estimator, "reparam", "stl" or "dreg"
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 disables clipping
    grad_skip_threshold: float = 0.0  # skip updates whose gradient norm (before clipping) exceeds this; 0 disables
    lr_schedule: str = "constant"  # "cosine": decay lr to 0 over the run (per step)
    ema_decay: float = 0.0  # EMA of the weights used for validation and saved; 0 disables (e.g. 0.999)
    eval_batch_size: int = 1000
    log_every: int = 50  # steps between training records in metrics.jsonl
    logger: str = "jsonl"  # also "tensorboard" (metrics.jsonl and TensorBoard events) or "none" (records only in the state)
    precision: str = "fp32"  # "bf16": autocast the training forward pass to bfloat16 (weights, optimizer, validation stay fp32)
    compile: bool = False  # torch.compile the training objective (forward and its backward); Adam stays the fused kernel
    channels_last: bool = False  # convolutional models: weights and batches in NHWC memory layout

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.beta_schedule in BETA_SCHEDULES, f"unknown beta schedule {self.beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (self.cycle_epochs >= 0, f"cycle_epochs must be >= 0, got {self.cycle_epochs}"),
            (self.beta_schedule != "cyclical" or self.cycle_epochs > 0,
             f"the cyclical beta schedule needs cycle_epochs > 0 (the length of one cycle in epochs), got {self.cycle_epochs}"),
            (0 < self.cycle_ramp_fraction <= 1, f"cycle_ramp_fraction must be in (0, 1], got {self.cycle_ramp_fraction}"),
            (self.free_bits >= 0 and math.isfinite(self.free_bits), f"free_bits must be a finite number >= 0 nats, got {self.free_bits}"),
            (self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}"),
            (self.objective in OBJECTIVES, f"unknown training objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}"),
            (isinstance(self.iw_samples, int) and not isinstance(self.iw_samples, bool) and self.iw_samples >= 1,
             f"iw_samples must be a whole number >= 1, got {self.iw_samples!r}"),
            (self.estimator in IWAE_ESTIMATORS, f"unknown IWAE gradient estimator {self.estimator!r}; choose one of {', '.join(IWAE_ESTIMATORS)}"),
            (self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.grad_skip_threshold >= 0, f"grad_skip_threshold must be >= 0, got {self.grad_skip_threshold}"),
            (self.lr_schedule in LR_SCHEDULES, f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.logger in LOGGERS, f"unknown logger {self.logger!r}; choose one of {', '.join(LOGGERS)}"),
            (self.precision in PRECISIONS, f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ElboxError(message)
        self._check_objective_options()

    def _check_objective_options(self) -> None:
        """Reject options that the chosen objective would silently ignore."""
        if self.objective == "iwae":
            elbo_only = [
                (self.beta != 1.0, f"beta={self.beta}"),
                (self.beta_schedule != "constant", f"beta_schedule={self.beta_schedule!r}"),
                (self.free_bits != 0.0, f"free_bits={self.free_bits}"),
                (self.n_samples != 1, f"n_samples={self.n_samples} (use iw_samples for K)"),
            ]
            used = [what for is_set, what in elbo_only if is_set]
            if used:
                raise ElboxError(
                    f"{', '.join(used)}: beta, its schedules, free bits and n_samples apply to the elbo objective only; "
                    "the iwae objective has no KL term to weight"
                )
        else:
            if self.iw_samples != 1 or self.estimator != "reparam":
                raise ElboxError(
                    f"iw_samples={self.iw_samples}, estimator={self.estimator!r}: these apply to the iwae objective only; "
                    "set objective='iwae' (iw_samples=1 trains the ELBO with a Monte Carlo KL and that estimator)"
                )


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
    batch-mean KL_group) (elbox.bounds.free_bits_kl). A scalar to maximize."""
    if free_bits > 0:
        return terms.reconstruction.mean() - beta * free_bits_kl(terms.kl, free_bits)
    return (terms.reconstruction - beta * terms.kl_total).mean()


def iwae_training_objective(model: LatentVariableModel, x: Tensor, k: int, estimator: str) -> tuple[Tensor, ELBOTerms]:
    """Per-example IWAE_K estimate [B] whose gradient is the chosen estimator's ("reparam", "stl", "dreg"; the
    value is the same for all three, see elbox.bounds), and ELBOTerms for reporting: the reconstruction
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
            terms = ELBOTerms(terms.reconstruction.float(), {k: v.float() for k, v in terms.kl.items()},
                              None if terms.objective is None else terms.objective.float())
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


def make_optimizer(model: LatentVariableModel, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused multi-tensor kernel (one kernel for all parameters per step)."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=True)


class Trainer:
    """Trains one model on one dataset and writes the run directory as it goes."""

    def __init__(
        self,
        model: LatentVariableModel,
        train_data: Tensor,
        val_data: Tensor,
        space: DataSpace,
        config: TrainConfig,
        run_dir: str | Path,
        progress: bool = True,
    ):
        if config.objective == "iwae" and not hasattr(model, "importance_samples"):
            raise ElboxError(f"the iwae objective needs a model with importance_samples; {type(model).__name__} has none")
        if config.free_bits > 0 and not model.kl_terms_are_kls:
            raise ElboxError(
                f"free bits need KL terms that are KL divergences; the {type(model).__name__}'s per-level terms below "
                "the top are single-sample log q - log p estimates (they can be negative). Use KL warm-up instead"
            )
        if model.trains_on_surrogate and (config.beta_schedule != "constant" or config.beta != 1 or config.free_bits > 0 or config.objective != "elbo"):
            raise ElboxError(f"the {type(model).__name__} trains on its own surrogate loss; beta, its schedules, free bits and the iwae objective do not apply")
        if train_data.shape[0] == 0:
            raise ElboxError("the training set is empty")
        if val_data.shape[0] == 0:
            raise ElboxError("the validation set is empty")
        self.model = model
        self.device = next(model.parameters()).device
        if config.precision == "bf16" and not bf16_is_native(self.device):
            warnings.warn(f"--precision bf16: this {self.device.type} has no native bfloat16 matrix units, so PyTorch "
                          "emulates them and training will be much slower than fp32 (measured 5-12x on an AVX2 CPU)", stacklevel=2)
        self.train_data = train_data.to(self.device)
        self.space = space
        self.val_x = space.eval_data(val_data.to(self.device), seed=config.seed)
        self.num_dims = math.prod(train_data.shape[1:])
        self.offset = space.log_prob_offset(self.num_dims)
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if config.batch_size % self.world_size:
            raise ElboxError(f"the batch size {config.batch_size} is the global batch; it must divide evenly over "
                             f"{self.world_size} processes")
        # DistributedDataParallel broadcasts rank 0's weights and averages gradients in backward
        self.objective = TrainingObjective(model, config)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D (convolution) weights only
        if self.world_size > 1:
            self.objective = DistributedDataParallel(self.objective)
        if config.compile:
            # static shapes: the epoch's last, smaller batch gets its own graph (one recompilation)
            self.objective = torch.compile(self.objective, dynamic=False)
        self.optimizer = make_optimizer(model, config.lr)
        self.steps_per_epoch = math.ceil(train_data.shape[0] / config.batch_size)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs * self.steps_per_epoch)
        # the weights validated and saved: an EMA copy, or the trained model itself
        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True) if config.ema_decay > 0 else None
        self.eval_model = self.ema.module if self.ema is not None else model
        if self.rank > 0:  # model noise (reparameterization, diffusion times) differs between processes
            torch.manual_seed(config.seed + 1_000_003 * self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        if config.beta_schedule == "cyclical" and config.cycle_epochs * self.steps_per_epoch < 2:
            raise ElboxError(
                f"a cyclical beta cycle of {config.cycle_epochs} epochs is {config.cycle_epochs * self.steps_per_epoch:g} "
                f"optimizer steps ({self.steps_per_epoch} per epoch); it needs at least 2, or beta stays 0"
            )
        self.step = 0
        self.skipped_steps = 0  # non-finite loss or gradient norm
        self.skipped_large_grad = 0  # gradient norm above grad_skip_threshold
        self.records: list[dict] = []
        self.start_epoch = 1
        self.best_val_elbo = -math.inf
        self.tensorboard = TensorBoardLog(self.run_dir, self.num_dims) if config.logger == "tensorboard" and self.rank == 0 else None

    def training_step(self, x: Tensor, beta: float) -> dict[str, Tensor] | str:
        """One Adam step on a batch. Returns the batch's mean terms, or why the step was skipped:
        "nonfinite" (loss or gradient norm) or "large_grad" (gradient norm above grad_skip_threshold).

        Reported: elbo, reconstruction and kl of the true ELBO (beta = 1; for the iwae objective the
        reconstruction is averaged over its K draws), and objective, the value of the training objective
        (what the step maximizes), in the same units as elbo.
        """
        objective, terms = self.objective(x, beta)
        loss = -objective
        kl = terms.kl_total
        self.optimizer.zero_grad(set_to_none=True)
        if not self.all_ranks_agree(torch.isfinite(loss)):
            return "nonfinite"
        loss.backward()  # under DDP, gradients are averaged over the processes here
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        skip = None
        if not torch.isfinite(grad_norm):
            skip = "nonfinite"
        elif self.config.grad_skip_threshold > 0 and grad_norm > self.config.grad_skip_threshold:
            skip = "large_grad"
        if skip is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return skip
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.config.grad_clip, grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        values = {
            "elbo": (terms.elbo.detach().mean() + self.offset),
            "reconstruction": (terms.reconstruction.detach().mean() + self.offset),
            "kl": kl.detach().mean(),
            "objective": objective.detach() + self.offset,
            "grad_norm": grad_norm.detach(),
            **{f"kl/{name}": v.detach().mean() for name, v in terms.kl.items() if len(terms.kl) > 1},
        }
        return self.mean_over_ranks(values)

    # -- distributed helpers (no-ops in a single process) ---------------------------------------------

    def all_ranks_agree(self, flag: Tensor) -> bool:
        """True when the flag holds on every process (so all take the same branch and none waits forever)."""
        if self.world_size == 1:
            return bool(flag)
        flag = flag.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def mean_over_ranks(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Average per-process batch means: each process holds an equal share of the global batch."""
        if self.world_size == 1:
            return values
        stacked = torch.stack([v.float() for v in values.values()])
        dist.all_reduce(stacked)
        return dict(zip(values, stacked / self.world_size))

    def local_part(self, x: Tensor) -> Tensor:
        """This process's contiguous share of a global batch."""
        return torch.tensor_split(x, self.world_size)[self.rank] if self.world_size > 1 else x

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        interval: dict[str, float] = {}
        n_done = n_interval = 0
        nonfinite_in_a_row = 0
        start = interval_start = time.perf_counter()
        batches = iterate_batches(self.train_data.shape[0], self.config.batch_size, True, self.shuffle_generator)
        bar = tqdm(
            batches,
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{self.config.epochs}",
            unit="batch",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
            leave=True,
        )
        for idx in bar:
            if idx.numel() < self.world_size:  # a last batch too small to share: every process skips it
                continue
            # every process draws the same global batch (same generators), then takes its share: the data
            # randomness is that of one process with the global batch
            x = self.local_part(self.space.train_batch(self.train_data[idx.to(self.device)], self.generator))
            beta = beta_at(self.config, self.step, self.steps_per_epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            values = self.training_step(x, beta)
            self.step += 1
            if self.scheduler is not None:  # the schedule follows the step count, skipped steps included
                self.scheduler.step()
            if values == "large_grad":
                self.skipped_large_grad += 1
                continue
            if values == "nonfinite":
                self.skipped_steps += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= self.config.max_nonfinite:
                    raise ElboxError(
                        f"training stopped at step {self.step}: {nonfinite_in_a_row} non-finite losses or gradients "
                        f"in a row (limit {self.config.max_nonfinite}); the last good checkpoint is in {self.run_dir}. "
                        "Try a lower learning rate or gradient clipping (--grad-clip)."
                    )
                continue
            nonfinite_in_a_row = 0
            values = {k: v.item() for k, v in values.items()}
            n = idx.numel()
            n_done += n
            n_interval += n
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
                interval[k] = interval.get(k, 0.0) + v * n
            if self.step % self.config.log_every == 0:
                now = time.perf_counter()
                rate = n_interval / (now - interval_start)
                record = {k: v / n_interval for k, v in interval.items()}
                record.update(kind="train", epoch=epoch, step=self.step, beta=beta, lr=lr, images_per_s=rate)
                self.records.append(record)
                if self.tensorboard is not None:
                    self.tensorboard.record(record)
                bar.set_postfix(
                    elbo=f"{record['elbo']:.2f}", rec=f"{record['reconstruction']:.2f}",
                    kl=f"{record['kl']:.2f}", obj=f"{record['objective']:.2f}", beta=f"{beta:.2f}", img_s=f"{rate:.0f}",
                )
                interval, n_interval, interval_start = {}, 0, now
        bar.close()
        elapsed = time.perf_counter() - start
        summary = {f"train_{k}": v / max(n_done, 1) for k, v in sums.items()}
        summary.update(images_per_s=n_done / elapsed, epoch_time_s=elapsed)
        return summary

    def validate(self) -> dict[str, float]:
        """Validation ELBO (and KL per latent group when there are several) of the evaluation weights."""
        self.eval_model.eval()
        terms = elbo_per_example(self.eval_model, self.local_part(self.val_x), self.config.eval_batch_size, final=False)
        groups = [key for key in terms if key.startswith("kl/")]
        keys = ["elbo", "reconstruction", "kl", *(groups if len(groups) > 1 else [])]
        sums = torch.stack([terms[k].sum() for k in keys])
        if self.world_size > 1:  # each process validated a share; sum the shares
            sums = sums.to(self.device)
            dist.all_reduce(sums)
        means = (sums.cpu() / self.val_x.shape[0]).tolist()
        record = {f"val_{k}": v for k, v in zip(keys, means)}
        record["val_elbo"] += self.offset
        record["val_reconstruction"] += self.offset
        return record

    # -- checkpoints --------------------------------------------------------------------------------

    def training_state(self, epoch: int) -> tuple[dict[str, Tensor], dict]:
        """Everything a resumed run needs to continue bit for bit: (tensors, JSON-ready state)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optimizer = self.optimizer.state_dict()
        for index, values in optimizer["state"].items():
            tensors.update({f"optimizer.{index}.{key}": v for key, v in values.items()})  # Adam's state is all tensors
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.batches"] = self.generator.get_state()
        tensors["rng.shuffle"] = self.shuffle_generator.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "epoch": epoch,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "skipped_large_grad": self.skipped_large_grad,
            "best_val_elbo": self.best_val_elbo,
            "optimizer_param_groups": optimizer["param_groups"],
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "train_config": config_dict(self.config),
            "records": self.records,
        }
        return tensors, state

    def restore(self, tensors: dict[str, Tensor], state: dict, what: str = "training state") -> None:
        """Load a training_state() back; ElboxError when it does not fit this model and configuration."""
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            if config_from_dict(TrainConfig, state["train_config"]) != self.config:  # fields added later take defaults
                raise ElboxError(f"{what} was written with other training settings than the run's config.json")
            check_tensors(part("model."), self.model.state_dict(), f"{what} (model tensors)")
            self.model.load_state_dict(part("model."))
            if self.ema is not None:
                check_tensors(part("ema."), self.ema.state_dict(), f"{what} (EMA tensors)")
                self.ema.load_state_dict(part("ema."))
            self.optimizer.load_state_dict({"state": self._optimizer_state(part("optimizer."), what),
                                            "param_groups": state["optimizer_param_groups"]})
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["lr_scheduler"])
            torch.set_rng_state(tensors["rng.torch"])
            self.generator.set_state(tensors["rng.batches"])
            self.shuffle_generator.set_state(tensors["rng.shuffle"])
            if self.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            self.step, self.start_epoch = int(state["step"]), int(state["epoch"]) + 1
            self.skipped_steps, self.skipped_large_grad = int(state["skipped_steps"]), int(state["skipped_large_grad"])
            self.best_val_elbo = float(state["best_val_elbo"])
            self.records = list(state["records"])
        except ElboxError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ElboxError(f"{what} is incomplete or does not fit this run: {type(e).__name__}: {e}") from None

    def _optimizer_state(self, tensors: dict[str, Tensor], what: str) -> dict[int, dict[str, Tensor]]:
        """{parameter index: {name: tensor}} from "index.name" keys, each moment shaped like its parameter."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(params):
                raise ElboxError(f"{what}: optimizer tensor {key!r} names no parameter of this model")
            if name != "step" and value.shape != params[int(index)].shape:
                raise ElboxError(f"{what}: optimizer tensor {key!r} has shape {tuple(value.shape)}, "
                                 f"its parameter {tuple(params[int(index)].shape)}")
            state.setdefault(int(index), {})[name] = value
        return state

    def save(self, epoch: int, is_best: bool) -> None:
        """Weights, best weights, metrics, then the training state: the state file is what --resume trusts, so a
        crash before it is written re-runs the epoch (deterministically) and rewrites the other files.
        Only process 0 writes."""
        if self.rank != 0:
            return
        save_weights(self.run_dir / WEIGHTS_FILE, self.eval_model)
        if is_best:
            save_weights(self.run_dir / BEST_WEIGHTS_FILE, self.eval_model)
        if self.config.logger != "none":
            atomic_write_jsonl(self.run_dir / METRICS_FILE, self.records)
        save_training_state(self.run_dir / STATE_FILE, *self.training_state(epoch))

    def fit(self) -> dict:
        """Train from start_epoch (1, or the epoch after a restored state) to the configured epochs; after each
        epoch validate and checkpoint. Returns the last epoch record."""
        record: dict = {}
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            record = {"kind": "epoch", "epoch": epoch}
            record.update(self.train_epoch(epoch))
            record["step"] = self.step
            record.update(self.validate())
            record["skipped_steps"] = self.skipped_steps
            record["skipped_large_grad"] = self.skipped_large_grad
            self.records.append(record)
            is_best = record["val_elbo"] > self.best_val_elbo
            self.best_val_elbo = max(self.best_val_elbo, record["val_elbo"])
            self.save(epoch, is_best)
            if self.rank != 0:
                continue
            if self.tensorboard is not None:
                self.tensorboard.record(record)
                self.tensorboard.images(self.eval_model, self.val_x, self.step)
            tqdm.write(
                f"epoch {epoch}: train ELBO {record.get('train_elbo', math.nan):.2f} "
                f"(objective {record.get('train_objective', math.nan):.2f}), "
                f"validation ELBO {record['val_elbo']:.2f} nats "
                f"(rec {record['val_reconstruction']:.2f}, KL {record['val_kl']:.2f}), "
                f"{record['images_per_s']:.0f} img/s, skipped steps {self.skipped_steps} non-finite, "
                f"{self.skipped_large_grad} large gradient",
                file=sys.stderr,
            )
        if self.tensorboard is not None:
            self.tensorboard.close()
        return record


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
