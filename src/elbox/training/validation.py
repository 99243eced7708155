"""The validation pass of the training loop (Trainer.validate): the mean ELBO of the evaluation weights on the
validation examples (all, or the first val_limit), and the IWAE-K bound where it selects the best epoch (the iwae
objective), with a progress bar, shared out over torchrun's processes."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from elbox.core.errors import ElboxError
from elbox.core.progress import progress_bar
from elbox.models.estimates import elbo_per_example, iwae_per_example
from elbox.training.batches import Images, num_examples, share, validation_chunks
from elbox.training.distributed import local_part
from elbox.training.optimizer import selection_key


def validation_data(trainer: Any) -> Images:
    """The validation examples validated on: all, or the first val_limit (in the data space when held in memory)."""
    data = trainer.val_x if trainer.val_data is None else trainer.val_data
    limit = min(trainer.config.val_limit or num_examples(data), num_examples(data))
    return data[:limit] if isinstance(data, Tensor) else torch.utils.data.Subset(data, range(limit))


def validate(trainer: Any) -> dict[str, float]:
    """Validation ELBO (and KL per latent group when there are several; "val_iwae" under the iwae objective) of
    trainer.eval_model: {"val_elbo", ...} in nats per example, the data space's offset included."""
    trainer.eval_model.eval()
    data = validation_data(trainer)
    shown = trainer.progress and trainer.rank == 0
    if trainer.val_data is None:
        parts = [bounds_per_example(trainer, local_part(data), shown)]
    else:
        parts = streamed_parts(trainer, data, shown)
    if not parts:
        raise ElboxError(f"the validation set has fewer examples than the {trainer.world_size} processes")
    groups = [key for key in parts[0] if key.startswith("kl/")]
    bounds = [k for k in ("elbo", "reconstruction", "kl", "iwae") if k in parts[0]]
    keys = [*bounds, *(groups if len(groups) > 1 else [])]
    sums = torch.stack([sum(part[k].sum() for part in parts) for k in keys])
    if trainer.world_size > 1:  # each process validated a share; sum the shares
        sums = sums.to(trainer.device)
        dist.all_reduce(sums)
    means = (sums.cpu() / num_examples(data)).tolist()
    record = {f"val_{k}": v for k, v in zip(keys, means)}
    record["val_elbo"] += trainer.offset
    record["val_reconstruction"] += trainer.offset
    if "val_iwae" in record:
        record["val_iwae"] += trainer.offset
    return record


def bounds_per_example(trainer: Any, x: Tensor, shown: bool) -> dict[str, Tensor]:
    """The ELBO's terms per example, and "iwae", the IWAE-K bound with the objective's K, where it selects the best
    epoch (selection_key)."""
    model, batch_size = trainer.eval_model, trainer.config.eval_batch_size
    part = elbo_per_example(model, x, batch_size, progress=shown, final=False)
    if selection_key(trainer.config) == "val_iwae":
        part["iwae"] = iwae_per_example(model, x, trainer.config.iw_samples, batch_size, progress=shown)
    return part


def streamed_parts(trainer: Any, data: Images, shown: bool) -> list[dict[str, Tensor]]:
    """Per-example ELBO terms of this process's share of streamed validation data, chunk by chunk: each chunk in
    the data space with the seed + its first row (deterministic for the chunking)."""
    first_row, stop = share(num_examples(data), trainer.rank, trainer.world_size)
    parts = []
    with progress_bar(stop - first_row, "validation", shown, unit="ex") as examples:
        for first, images in validation_chunks(
            data, trainer.config.eval_batch_size, trainer.rank, trainer.world_size, trainer.device, trainer.workers
        ):
            x = trainer.space.eval_data(images, seed=trainer.config.seed + first)
            parts.append(bounds_per_example(trainer, x, False))
            examples.update(images.shape[0])
    return parts
