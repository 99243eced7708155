"""The training loop: Adam on a training objective, validation bounds each epoch (selection_key), atomic run files.

Quick runs: max_steps ends the run after that many optimizer steps (the epoch it falls in ends there, validated and
checkpointed as a last epoch; a cosine schedule spans max_steps); val_limit validates on the first N validation
examples; val_every validates every N epochs and after the last. An epoch not validated is still checkpointed
(model.safetensors, state.safetensors, metrics.jsonl) and recorded with kind "train_epoch" (no val_* values);
best.safetensors changes on validated epochs only. Within an epoch, every checkpoint_minutes, the training state alone
is saved with where the epoch stands (elbox.training.state.EpochProgress), and --resume continues after its done
batches, bit for bit.

Progress (process 0): a bar per epoch on stderr whose description carries the time left in the whole run ("run ETA",
at the pace of the steps so far, validations included), and a bar over the validation examples.

Mixed precision: precision="bf16" runs the training forward pass under torch.autocast(bfloat16) (on GPUs, and on
CPUs with bf16 matrix units); weights, Adam's state and every validation or evaluation number stay float32. The
training-batch ELBO logged under bf16 is the autocast forward's value, so it carries bf16 rounding.

Speed: compile=True runs the training objective (the model's forward pass and loss, and through AOTAutograd its
backward) through torch.compile; the first steps pay the compilation (benchmarks/run.py records it as time to
first step). channels_last=True keeps convolution weights and batches in NHWC layout. Adam is always the fused
kernel. Defaults (eager, contiguous, fp32) are the fastest measured on a 2-core CPU (benchmarks/run.py).

Stability options for deep (hierarchical) models: KL warm-up (beta_schedule="linear"), free bits per latent
group (each level of a hierarchical model is a group), gradient-norm clipping (grad_clip), skipping updates
whose gradient norm is non-finite or above grad_skip_threshold (both counted and logged), a cosine learning-
rate decay, and an exponential moving average (EMA) of the weights: with ema_decay > 0, validation and the
saved model.safetensors use the EMA weights.

Divergence guard: training stops when max_nonfinite of the last 2 * max_nonfinite optimizer steps were non-finite
(counted across epochs, and kept in the training state), and after an epoch whose weights or validation ELBO are
not finite. Non-finite weights are never saved, so the run directory keeps the last good epoch, which the message
names.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from elbox.core.errors import ElboxError
from elbox.core.progress import time_left
from elbox.core.system import bf16_is_native
from elbox.data import DataSpace, iterate_batches
from elbox.data.inputs import example_shape
from elbox.io.atomic import atomic_write_jsonl
from elbox.io.checkpoint import (
    BEST_WEIGHTS_FILE,
    METRICS_FILE,
    STATE_FILE,
    STATE_IN_EPOCH_FILE,
    WEIGHTS_FILE,
    save_training_state,
    save_weights,
)
from elbox.io.loggers import TensorBoardLog
from elbox.io.run_config import TrainConfig
from elbox.models.base import Callback, LatentVariableModel
from elbox.training.batches import (
    Images,
    gather,
    num_examples,
    share,
    stack_examples,
)
from elbox.training.distributed import all_ranks_agree, mean_over_ranks, rank_and_world_size
from elbox.training.messages import RETRY, check_finite, last_good_checkpoint, weights_are_finite
from elbox.training.objectives import TrainingObjective, beta_at, check_training_settings, warn_if_schedule_outlasts_run
from elbox.training.optimizer import early_stop_epoch, ema_update_with_warmup, make_optimizer, selection_key
from elbox.training.state import EpochProgress, pack_training_state, unpack_training_state
from elbox.training.validation import validate

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler

MAX_STEPS = 2**63 - 1
POSTFIX = {"elbo": "elbo", "rec": "reconstruction", "kl": "kl", "obj": "objective"}  # the epoch bar's numbers
PREVIEW = 500  # validation examples held in memory for pictures when the validation data are streamed


class Trainer:
    """Trains one model on one dataset and writes the run directory as it goes."""

    def __init__(
        self,
        model: LatentVariableModel,
        train_data: Images,
        val_data: Images,
        space: DataSpace,
        config: TrainConfig,
        run_dir: str | Path | None,
        progress: bool = True,
        callback: Callback | None = None,
        workers: int = 0,
    ):
        """train_data, val_data: uint8 images [N, C, H, W] or float32 vectors [N, D] in memory, or Datasets of such
        examples read on demand by `workers` DataLoader processes (elbox.training.batches)."""
        check_training_settings(model, config)
        if num_examples(train_data) == 0:
            raise ElboxError("the training set is empty")
        if num_examples(val_data) == 0:
            raise ElboxError("the validation set is empty")
        self.model = model
        self.device = model.device
        if config.precision == "bf16" and not bf16_is_native(self.device):
            warnings.warn(
                f"--precision bf16: this {self.device.type} has no native bfloat16 matrix units, so PyTorch "
                "emulates them and training will be much slower than fp32 (measured 5-12x on an AVX2 CPU)",
                stacklevel=2,
            )
        self.train_data = train_data.to(self.device) if isinstance(train_data, Tensor) else train_data
        self.workers = workers
        self.space = space
        # validation data in the data space when held in memory; streamed ones are read (and transformed, chunk by
        # chunk) at each validation, and val_x holds their first examples for pictures
        self.val_data = None if isinstance(val_data, Tensor) else val_data
        self.val_x = space.eval_data(
            val_data.to(self.device)
            if isinstance(val_data, Tensor)
            else stack_examples([val_data[i] for i in range(min(PREVIEW, len(val_data)))]).to(self.device),
            seed=config.seed,
        )
        self.num_dims = math.prod(example_shape(train_data))
        self.offset = space.log_prob_offset(self.num_dims)
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.callback = callback
        self.rank, self.world_size = rank_and_world_size()
        if config.batch_size % self.world_size:
            raise ElboxError(
                f"the batch size {config.batch_size} is the global batch; it must divide evenly over "
                f"{self.world_size} processes"
            )
        # DistributedDataParallel broadcasts rank 0's weights and averages gradients in backward
        self.objective = TrainingObjective(model, config)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D (convolution) weights only
        if self.world_size > 1:
            self.objective = DistributedDataParallel(self.objective)
        if config.compile:
            # static shapes: the epoch's last, smaller batch gets its own graph (one recompilation)
            self.objective = torch.compile(self.objective, dynamic=False)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay)
        self.steps_per_epoch = math.ceil(num_examples(train_data) / config.batch_size)
        self.scheduler = None
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=self.total_steps)
        # the weights validated and saved: an EMA copy, or the trained model itself
        self.ema = (
            AveragedModel(model, multi_avg_fn=ema_update_with_warmup(config.ema_decay), use_buffers=True)
            if config.ema_decay > 0
            else None
        )
        self.eval_model = self.ema.module if self.ema is not None else model
        if self.rank > 0:  # model noise (reparameterization, diffusion times) differs between processes
            torch.manual_seed(config.seed + 1_000_003 * self.rank)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        if config.beta_schedule == "cyclical" and config.cycle_epochs * self.steps_per_epoch < 2:
            raise ElboxError(
                f"a cyclical beta cycle of {config.cycle_epochs} epochs is "
                f"{config.cycle_epochs * self.steps_per_epoch:g} "
                f"optimizer steps ({self.steps_per_epoch} per epoch); it needs at least 2, or beta stays 0"
            )
        self.step = 0
        self.skipped_steps = 0  # non-finite loss or gradient norm
        self.skipped_large_grad = 0  # gradient norm above grad_skip_threshold
        self.recent_nonfinite: deque[bool] = deque(maxlen=2 * config.max_nonfinite)  # of the last steps, across epochs
        self.saved_epoch = 0  # the last epoch written to the run directory
        self.records: list[dict] = []
        self.start_epoch = 1
        self.resume_progress: EpochProgress | None = None  # of the start epoch, from a state saved within it
        self.last_save = time.perf_counter()  # for the checkpoints within an epoch (checkpoint_minutes)
        self.best_val_elbo = -math.inf
        self.clock = (time.perf_counter(), 0)  # (time, step) at the start of fit(): the pace for the run ETA
        writes = self.run_dir is not None and self.rank == 0
        self.tensorboard = (
            TensorBoardLog(self.run_dir, self.num_dims) if config.logger == "tensorboard" and writes else None
        )

    def training_step(self, x: Tensor, beta: float) -> dict[str, Tensor] | str:
        """One Adam step on a batch. Returns the batch's mean terms, or why the step was skipped:
        "nonfinite" (loss or gradient norm) or "large_grad" (gradient norm above grad_skip_threshold).

        Reported: elbo, reconstruction and kl of the true ELBO (beta = 1; for the iwae objective the
        reconstruction is averaged over its K draws), and objective, the value of the training objective
        (what the step maximizes), in the same units as elbo.
        """
        # compiled, beta goes in as a tensor: as a Python number every new value of a warm-up would recompile the graph
        objective, terms = self.objective(x, torch.tensor(beta, device=x.device) if self.config.compile else beta)
        loss = -objective
        kl = terms.kl_total
        self.optimizer.zero_grad(set_to_none=True)
        if not all_ranks_agree(torch.isfinite(loss)):
            return "nonfinite"
        loss.backward()  # under DDP, gradients are averaged over the processes here
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads)  # each tensor's, as get_total_norm computes them; reused to normalize
        grad_norm = torch.linalg.vector_norm(torch.stack(norms))
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
            norms = torch._foreach_norm(grads) if self.config.normalize_gradients else norms  # of the clipped
        if self.config.normalize_gradients:  # each tensor's gradient to unit L2 norm (the eps keeps a zero one finite)
            torch._foreach_div_(grads, torch._foreach_add(norms, 1e-7))
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
        return mean_over_ranks(values)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set, or the rest of the pass a state saved within the epoch stopped in."""
        self.model.train()
        progress, self.resume_progress = self.resume_progress, None
        if progress is None or progress.epoch != epoch:
            progress = EpochProgress(epoch, self.shuffle_generator.get_state())
        now = time.perf_counter()  # a resumed epoch's clocks go on from what its state had counted
        start, interval_start = now - progress.seconds, now - progress.interval_seconds
        # a last batch too small to share is skipped by every process
        batches = [
            idx
            for idx in iterate_batches(
                num_examples(self.train_data), self.config.batch_size, True, self.shuffle_generator
            )
            if idx.numel() >= self.world_size
        ]
        if self.config.max_steps is not None:  # max_steps ends the run inside this epoch
            batches = batches[: max(0, self.config.max_steps - (self.step - progress.batches))]
        # each process reads its share of every global batch; the data randomness is drawn for the global batch
        # (DataSpace.train_batch's part), so it is that of one process with the global batch
        todo = [(idx, share(idx.numel(), self.rank, self.world_size)) for idx in batches[progress.batches :]]
        images = gather(self.train_data, [idx[a:b] for idx, (a, b) in todo], self.device, self.workers)
        bar = tqdm(
            zip(todo, images),
            total=len(batches),
            initial=progress.batches,
            desc=self.epoch_label(epoch),
            unit="batch",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
            leave=True,
        )
        for (idx, (first, _)), local_images in bar:
            if progress.batches > 0:  # between two batches, skipped steps included (the last ends in the epoch's)
                self.save_within_epoch(progress, start, interval_start)
            bar.set_description_str(self.epoch_label(epoch), refresh=False)
            x = self.space.train_batch(
                local_images, self.generator, part=(first, idx.numel()), perturb=self.config.perturb
            )
            beta = beta_at(self.config, self.step, self.steps_per_epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            values = self.training_step(x, beta)
            self.step += 1
            progress.batches += 1
            if self.scheduler is not None:  # the schedule follows the step count, skipped steps included
                self.scheduler.step()
            self.recent_nonfinite.append(values == "nonfinite")
            if values == "large_grad":
                self.skipped_large_grad += 1
                continue
            if values == "nonfinite":
                self.skipped_steps += 1
                if sum(self.recent_nonfinite) >= self.config.max_nonfinite:
                    self.discard_state_in_epoch()
                    raise ElboxError(
                        f"training diverged: {sum(self.recent_nonfinite)} of the last {len(self.recent_nonfinite)} "
                        f"steps had a non-finite loss or gradient (stopped at step {self.step}, limit "
                        f"{self.config.max_nonfinite}); {last_good_checkpoint(self)}. {RETRY}"
                    )
                continue
            values = {k: v.item() for k, v in values.items()}
            n = idx.numel()
            progress.examples += n
            progress.interval_examples += n
            for k, v in values.items():
                progress.sums[k] = progress.sums.get(k, 0.0) + v * n
                progress.interval[k] = progress.interval.get(k, 0.0) + v * n
            if self.step % self.config.log_every == 0:
                now = time.perf_counter()
                record = self.record_interval(
                    progress, epoch, beta, lr, progress.interval_examples / (now - interval_start)
                )
                shown = {short: f"{record[name]:.2f}" for short, name in POSTFIX.items()}
                bar.set_postfix(shown | {"beta": f"{beta:.2f}", "img_s": f"{record['images_per_s']:.0f}"})
                interval_start = now
        bar.close()
        elapsed = time.perf_counter() - start
        summary = {f"train_{k}": v / max(progress.examples, 1) for k, v in progress.sums.items()}
        summary.update(images_per_s=progress.examples / elapsed, epoch_time_s=elapsed)
        return summary

    def record_interval(self, progress: EpochProgress, epoch: int, beta: float, lr: float, rate: float) -> dict:
        """The training record of the steps since the last one (metrics.jsonl, TensorBoard); starts the next."""
        record = {k: v / progress.interval_examples for k, v in progress.interval.items()}
        record.update(kind="train", epoch=epoch, step=self.step, beta=beta, lr=lr, images_per_s=rate)
        self.records.append(record)
        if self.tensorboard is not None:
            self.tensorboard.record(record)
        progress.interval, progress.interval_examples = {}, 0
        return record

    def epoch_label(self, epoch: int) -> str:
        """The epoch bar's description: the epoch and the estimated time left in the whole run."""
        started, first_step = self.clock
        left = time_left(time.perf_counter() - started, self.step - first_step, self.total_steps - self.step)
        return f"epoch {epoch}/{self.config.epochs} (run ETA {left})"

    def validate(self) -> dict[str, float]:
        """Validation ELBO (and KL per latent group when there are several) of the evaluation weights, on all the
        validation examples or the first val_limit (elbox.training.validation)."""
        return validate(self)

    # -- checkpoints --------------------------------------------------------------------------------

    def training_state(self, epoch: int) -> tuple[dict[str, Tensor], dict]:
        """Everything a resumed run needs to continue bit for bit: (tensors, JSON-ready state)."""
        return pack_training_state(self, epoch)

    def restore(self, tensors: dict[str, Tensor], state: dict, what: str = "training state") -> None:
        """Load a training_state() back; ElboxError when it does not fit this model and configuration."""
        unpack_training_state(self, tensors, state, what)

    def save(self, epoch: int, is_best: bool) -> None:
        """Weights, best weights, metrics, then the training state: the state file is what --resume trusts, so a
        crash before it is written re-runs the epoch (deterministically) and rewrites the other files.
        Only process 0 writes, and nothing is written without a run directory."""
        if self.rank != 0 or self.run_dir is None:
            return
        save_weights(self.run_dir / WEIGHTS_FILE, self.eval_model)
        if is_best:
            save_weights(self.run_dir / BEST_WEIGHTS_FILE, self.eval_model)
        if self.config.logger != "none":
            atomic_write_jsonl(self.run_dir / METRICS_FILE, self.records)
        save_training_state(self.run_dir / STATE_FILE, *self.training_state(epoch))
        self.discard_state_in_epoch()  # after the epoch's state: a crash between leaves the older one (fewer steps)
        self.saved_epoch, self.last_save = epoch, time.perf_counter()

    def save_within_epoch(self, progress: EpochProgress, start: float, interval_start: float) -> None:
        """Every checkpoint_minutes, the training state with where the epoch stands (its clocks started at `start`
        and `interval_start`), in its own file: the last epoch's files stay, for a divergence to fall back on.
        Weights that are not finite are not saved (the epoch's end says why)."""
        now, minutes = time.perf_counter(), self.config.checkpoint_minutes
        if minutes == 0 or now - self.last_save < 60 * minutes:
            return
        progress.seconds, progress.interval_seconds, self.last_save = now - start, now - interval_start, now
        if self.rank == 0 and self.run_dir is not None and weights_are_finite(self.model, self.eval_model):
            path = self.run_dir / STATE_IN_EPOCH_FILE
            save_training_state(path, *pack_training_state(self, progress.epoch - 1, progress))

    def discard_state_in_epoch(self) -> None:
        """Remove the state saved within the epoch (after the epoch's own, or when the epoch diverged)."""
        path = None if self.run_dir is None or self.rank != 0 else self.run_dir / STATE_IN_EPOCH_FILE
        if path is not None and path.is_file() and not path.is_symlink():
            path.unlink()

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: its epochs, or max_steps if fewer."""
        return min(self.config.epochs * self.steps_per_epoch, self.config.max_steps or MAX_STEPS)

    @property
    def steps_capped(self) -> bool:
        """Whether max_steps has ended the run."""
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    @property
    def is_complete(self) -> bool:
        """Whether the run has done its epochs, or its max_steps, or stopped early."""
        return self.start_epoch > self.config.epochs or self.steps_capped or self.stopped_early is not None

    @property
    def stopped_early(self) -> int | None:
        """The best epoch once early stopping has ended the run, else None (early_stop_epoch)."""
        return early_stop_epoch(self.records, self.config)

    def report(self, record: dict) -> None:
        """The epoch's record to the callback and TensorBoard; a line when early stopping ends the run (process 0)."""
        if self.callback is not None:
            self.callback(record)
        if self.tensorboard is not None:
            self.tensorboard.record(record)
            self.tensorboard.images(self.eval_model, self.val_x, self.step)
        if self.stopped_early is not None:
            LOG.info(
                f"stopped early after epoch {record['epoch']}: the validation bound has not improved on "
                f"epoch {self.stopped_early}'s for {self.config.patience} epochs; best.safetensors holds it"
            )

    def validates(self, epoch: int) -> bool:
        """Whether this epoch ends with a validation: every val_every epochs and after the last (max_steps included)."""
        return epoch % self.config.val_every == 0 or epoch == self.config.epochs or self.steps_capped

    def fit(self) -> dict:
        """Train from start_epoch (1, or the epoch after a restored state) to the configured epochs or max_steps;
        after each epoch validate (see validates) and checkpoint. Returns the last epoch record."""
        record: dict = {}
        warn_if_schedule_outlasts_run(self.config, self.steps_per_epoch, self.total_steps)  # after any extend_run()
        self.clock = (time.perf_counter(), self.step)
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            if self.steps_capped:
                break
            record = {"epoch": epoch, **self.train_epoch(epoch), "step": self.step}
            validated = self.validates(epoch)
            record = {
                "kind": "epoch" if validated else "train_epoch",
                **record,
                **(self.validate() if validated else {}),
                "skipped_steps": self.skipped_steps,
                "skipped_large_grad": self.skipped_large_grad,
            }
            try:
                check_finite(self, record)
            except ElboxError:
                self.discard_state_in_epoch()
                raise
            self.records.append(record)
            bound = record.get(selection_key(self.config, self.records), -math.inf)  # best kept: best_val_elbo
            is_best, self.best_val_elbo = validated and bound > self.best_val_elbo, max(self.best_val_elbo, bound)
            self.save(epoch, is_best)
            if self.rank == 0:
                self.report(record)
            if self.stopped_early is not None:  # the same records on every process: all stop together
                break
        if self.tensorboard is not None:
            self.tensorboard.close()
        return record
