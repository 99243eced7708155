"""The validation pass of the training loop (Trainer.validate): the mean ELBO of the evaluation weights on the
validation examples (all, or the first val_limit), with a progress bar, shared out over torchrun's processes."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from elbox.core.errors import ElboxError
from elbox.core.progress import progress_bar
from elbox.models.estimates import elbo_per_example
from elbox.training.batches import Images, num_examples, share, validation_chunks
from elbox.training.distributed import local_part


def validation_data(trainer: Any) -> Images:
    """The validation examples validated on: all, or the first val_limit (in the data space when held in memory)."""
    data = trainer.val_x if trainer.val_data is None else trainer.val_data
    limit = min(trainer.config.val_limit or num_examples(data), num_examples(data))
    return data[:limit] if isinstance(data, Tensor) else torch.utils.data.Subset(data, range(limit))


def validate(trainer: Any) -> dict[str, float]:
    """Validation ELBO (and KL per latent group when there are several) of trainer.eval_model: {"val_elbo", ...}
    in nats per example, the data space's offset included."""
    trainer.eval_model.eval()
    data = validation_data(trainer)
    shown = trainer.progress and trainer.rank == 0
    if trainer.val_data is None:
        parts = [
            elbo_per_example(
                trainer.eval_model,
                local_part(data),
                trainer.config.eval_batch_size,
                progress=shown,
                final=False,
            )
        ]
    else:
        parts = streamed_parts(trainer, data, shown)
    if not parts:
        raise ElboxError(f"the validation set has fewer examples than the {trainer.world_size} processes")
    groups = [key for key in parts[0] if key.startswith("kl/")]
    keys = ["elbo", "reconstruction", "kl", *(groups if len(groups) > 1 else [])]
    sums = torch.stack([sum(part[k].sum() for part in parts) for k in keys])
    if trainer.world_size > 1:  # each process validated a share; sum the shares
        sums = sums.to(trainer.device)
        dist.all_reduce(sums)
    means = (sums.cpu() / num_examples(data)).tolist()
    record = {f"val_{k}": v for k, v in zip(keys, means)}
    record["val_elbo"] += trainer.offset
    record["val_reconstruction"] += trainer.offset
    return record


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
            parts.append(elbo_per_example(trainer.eval_model, x, trainer.config.eval_batch_size, final=False))
            examples.update(images.shape[0])
    return parts
