"""The lines a run prints on stderr: what is being trained, and one line per epoch or per closed-form / EM record;
the divergence guard's checks and messages."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from elbox.core.errors import ElboxError
from elbox.io.checkpoint import STATE_FILE, WEIGHTS_FILE
from elbox.models.base import Callback, LatentVariableModel

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler


def model_size(model: LatentVariableModel) -> str:
    """'853,840 parameters' for a model trained by gradient; for one fitted in closed form or by EM (its numbers are
    buffers, not parameters) how many numbers it stores."""
    if model.trains_by_gradient:
        return f"{sum(p.numel() for p in model.parameters()):,} parameters"
    return (
        f"fitted in closed form or by EM, not by gradient: {sum(v.numel() for v in model.state_dict().values()):,} "
        "numbers"
    )


def epoch_summary(record: dict) -> str:
    """One line for an epoch record of Trainer.fit ("epoch", validated, or "train_epoch", not validated)."""
    validation = (
        f"validation ELBO {record['val_elbo']:.2f} nats (rec {record['val_reconstruction']:.2f}, "
        f"KL {record['val_kl']:.2f})" + (f", IWAE {record['val_iwae']:.2f}" if "val_iwae" in record else "")
        if "val_elbo" in record
        else "not validated (val_every)"
    )
    return (
        f"epoch {record['epoch']}: train ELBO {record.get('train_elbo', math.nan):.2f} "
        f"(objective {record.get('train_objective', math.nan):.2f}), {validation}, {record['images_per_s']:.0f} img/s, "
        f"skipped steps {record['skipped_steps']} non-finite, {record['skipped_large_grad']} large gradient"
    )


def fit_summary(record: dict) -> str:
    """One line for a record of a closed-form or EM fit (its values are in the units of the final validation value:
    the data space's offset is already added) or for the fit's closing validation record."""
    if "val_log_likelihood" in record:
        return f"validation log-likelihood {record['val_log_likelihood']:.2f} nats per example (exact)"
    if "iteration" in record:
        step = f"EM iteration {record['iteration']}" + (f" (run {record['restart']})" if "restart" in record else "")
        step += f" ({record['n_components']} components)" if "n_components" in record else ""
    else:
        step = f"fit ({record['method']})" if "method" in record else "closed-form fit"
    values = ", ".join(
        f"{name} {record[key]:.2f}"
        for key, name in (("elbo", "ELBO"), ("log_likelihood", "log-likelihood"))
        if key in record
    )
    tail = f", {record['time_s']:.2f} s" if "time_s" in record else ""
    if "converged" in record:
        tail += ", converged" if record["converged"] else ", stopped at max_iter"
    return f"{step}: training-set {values} nats per example (same units as the validation value){tail}"


def with_summaries(callback: Callback | None) -> Callback:
    """The callback, after printing a one-line summary of each record to stderr (process 0 only)."""

    def report(record: dict) -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            line = (
                epoch_summary(record)
                if record.get("kind") in ("epoch", "train_epoch") and "images_per_s" in record
                else fit_summary(record)
            )
            LOG.info(line)
        if callback is not None:
            callback(record)

    return report


RETRY = (
    "Start a new run with a lower learning rate or gradient clipping: elbox train --config RUN_DIR/config.json "
    "--lr SMALLER --grad-clip 100 --out NEW_DIR."
)


def weights_are_finite(*models: torch.nn.Module) -> bool:
    """Whether every floating-point tensor of the models' state is finite."""
    tensors = [t for m in models for t in m.state_dict().values() if t.is_floating_point()]
    return all(torch.isfinite(t).all() for t in tensors)


def last_good_checkpoint(trainer: Any) -> str:
    """Where the run's last finite checkpoint is, in words."""
    if trainer.run_dir is None:
        return "no run directory was written"
    if trainer.saved_epoch == 0:
        return "no epoch finished with finite values, so no checkpoint was saved"
    return (
        f"the last good checkpoint, epoch {trainer.saved_epoch}, is in {trainer.run_dir} ({WEIGHTS_FILE}, {STATE_FILE})"
    )


def check_finite(trainer: Any, record: dict) -> None:
    """ElboxError (before anything is saved) when the epoch's validation ELBO or weights are not finite."""
    if not weights_are_finite(trainer.model, trainer.eval_model):
        problem = "the weights hold NaN or infinite values"
    elif not all(math.isfinite(record.get(k, 0.0)) for k in ("val_elbo", "val_iwae")):
        problem = f"the validation bounds are ELBO {record['val_elbo']}, IWAE {record.get('val_iwae')}"
    else:
        return
    raise ElboxError(
        f"training diverged in epoch {record['epoch']}: {problem}; nothing of that epoch was saved, "
        f"{last_good_checkpoint(trainer)}. {RETRY}"
    )
