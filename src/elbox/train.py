"""The training loop: Adam on -(reconstruction - beta * KL), validation ELBO each epoch, atomic run files.

The training objective may weight the KL by beta (constant or linearly warmed up); every reported
ELBO, on training batches and on validation, is the true ELBO with beta = 1.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from elbox.checkpoint import METRICS_FILE, WEIGHTS_FILE, atomic_write_jsonl, save_weights
from elbox.data import DataSpace, iterate_batches
from elbox.errors import ElboxError
from elbox.evaluate import elbo_per_example
from elbox.models.base import LatentVariableModel

BETA_SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    beta: float = 1.0  # final KL weight of the training objective
    beta_schedule: str = "constant"  # "linear": beta grows from 0 to `beta` over warmup_epochs
    warmup_epochs: float = 0.0
    n_samples: int = 1  # Monte Carlo samples of z per example in the training ELBO
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 disables clipping
    eval_batch_size: int = 1000
    log_every: int = 50  # steps between training records in metrics.jsonl

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.beta_schedule in BETA_SCHEDULES, f"unknown beta schedule {self.beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}"),
            (self.max_nonfinite >= 1, f"max_nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.eval_batch_size >= 1, f"eval batch size must be >= 1, got {self.eval_batch_size}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ElboxError(message)


def beta_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """KL weight of the training objective at an optimizer step."""
    warmup_steps = config.warmup_epochs * steps_per_epoch
    if config.beta_schedule == "constant" or warmup_steps == 0:
        return config.beta
    return config.beta * min(1.0, step / warmup_steps)


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
        if train_data.shape[0] == 0:
            raise ElboxError("the training set is empty")
        if val_data.shape[0] == 0:
            raise ElboxError("the validation set is empty")
        self.model = model
        self.device = next(model.parameters()).device
        self.train_data = train_data.to(self.device)
        self.space = space
        self.val_x = space.eval_data(val_data.to(self.device), seed=config.seed)
        self.num_dims = math.prod(train_data.shape[1:])
        self.offset = space.log_prob_offset(self.num_dims)
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.optimizer = make_optimizer(model, config.lr)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.steps_per_epoch = math.ceil(train_data.shape[0] / config.batch_size)
        self.step = 0
        self.skipped_steps = 0
        self.records: list[dict] = []

    def training_step(self, x: Tensor, beta: float) -> dict[str, Tensor] | None:
        """One Adam step on a batch. Returns the batch's mean terms, or None when the step was skipped."""
        terms = self.model.elbo(x, n_samples=self.config.n_samples)
        kl = terms.kl_total
        loss = -(terms.reconstruction - beta * kl).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.config.grad_clip, grad_norm)
        self.optimizer.step()
        return {
            "elbo": (terms.elbo.detach().mean() + self.offset),
            "reconstruction": (terms.reconstruction.detach().mean() + self.offset),
            "kl": kl.detach().mean(),
            "grad_norm": grad_norm.detach(),
        }

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
            disable=not self.progress,
            dynamic_ncols=True,
            leave=True,
        )
        for idx in bar:
            x = self.space.train_batch(self.train_data[idx.to(self.device)], self.generator)
            beta = beta_at(self.config, self.step, self.steps_per_epoch)
            values = self.training_step(x, beta)
            self.step += 1
            if values is None:
                self.skipped_steps += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= self.config.max_nonfinite:
                    raise ElboxError(
                        f"training stopped at step {self.step}: {nonfinite_in_a_row} non-finite losses or gradients "
                        f"in a row (limit {self.config.max_nonfinite}); the last good weights are in {self.run_dir}. "
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
                record.update(kind="train", epoch=epoch, step=self.step, beta=beta, images_per_s=rate)
                self.records.append(record)
                bar.set_postfix(
                    elbo=f"{record['elbo']:.2f}", rec=f"{record['reconstruction']:.2f}",
                    kl=f"{record['kl']:.2f}", beta=f"{beta:.2f}", img_s=f"{rate:.0f}",
                )
                interval, n_interval, interval_start = {}, 0, now
        bar.close()
        elapsed = time.perf_counter() - start
        summary = {f"train_{k}": v / max(n_done, 1) for k, v in sums.items()}
        summary.update(images_per_s=n_done / elapsed, epoch_time_s=elapsed)
        return summary

    def validate(self) -> dict[str, float]:
        self.model.eval()
        terms = elbo_per_example(self.model, self.val_x, self.config.eval_batch_size)
        return {
            "val_elbo": terms["elbo"].mean().item() + self.offset,
            "val_reconstruction": terms["reconstruction"].mean().item() + self.offset,
            "val_kl": terms["kl"].mean().item(),
        }

    def save(self) -> None:
        save_weights(self.run_dir / WEIGHTS_FILE, self.model)
        atomic_write_jsonl(self.run_dir / METRICS_FILE, self.records)

    def fit(self) -> dict:
        """Train for the configured epochs; after each epoch validate and checkpoint. Returns the last epoch record."""
        record: dict = {}
        for epoch in range(1, self.config.epochs + 1):
            record = {"kind": "epoch", "epoch": epoch}
            record.update(self.train_epoch(epoch))
            record["step"] = self.step
            record.update(self.validate())
            record["skipped_steps"] = self.skipped_steps
            self.records.append(record)
            self.save()
            tqdm.write(
                f"epoch {epoch}: train ELBO {record.get('train_elbo', math.nan):.2f}, "
                f"validation ELBO {record['val_elbo']:.2f} nats "
                f"(rec {record['val_reconstruction']:.2f}, KL {record['val_kl']:.2f}), "
                f"{record['images_per_s']:.0f} img/s, skipped steps {self.skipped_steps}",
                file=sys.stderr,
            )
        return record


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
