"""elbox.resume: continue a run from its last good checkpoint with its own settings, or extend a finished one."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from elbox.core.errors import ElboxError
from elbox.core.options import config_from_dict
from elbox.data.inputs import run_data
from elbox.data.preprocessing import Preprocessing
from elbox.io.atomic import atomic_write_json
from elbox.io.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_training_state, read_run_config, resume_state_file
from elbox.io.run_config import TrainConfig, config_dict
from elbox.io.rundir import remove_stale_temporaries, run_directory
from elbox.models.base import Callback, build_model
from elbox.training.distributed import first_process, init_distributed, is_main_process
from elbox.training.messages import with_summaries
from elbox.training.state import saved_train_config
from elbox.training.trainer import Trainer
from elbox.training.workflows import (
    Run,
    finish,
    fit_into,
    initialize,
    initialize_from_data,
    run_settings,
    with_preprocessing,
)

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler


def resume(
    run_dir: str | os.PathLike,
    device: str = "auto",
    progress: bool = True,
    verbose: bool = True,
    callback: Callback | None = None,
    epochs: int | None = None,
    checkpoint_minutes: float | None = None,
) -> Run:
    """Continue a run from its last good checkpoint (state.safetensors, or state-in-epoch.safetensors within the
    epoch after) with its own settings, bit for bit on CPU.
    epochs: extend the run (finished or not) to this many epochs, recorded in its config.json and its metrics; a
    cosine learning rate then follows the longer run's cosine from the current step (extend_run). A model fitted
    in one go (a mixture fit killed part-way) is fitted again from the start. checkpoint_minutes: how often to save
    the state within an epoch from now on (it does not change the run's numbers), recorded in its config.json."""
    out = Path(run_dir)
    with run_directory(out, new=False, lock=first_process()):
        config = changed = read_run_config(out)
        extended_from = None
        if epochs is not None:
            extended_from = config_from_dict(TrainConfig, config.get("train"), "training settings").epochs
            changed = extended_config(out, changed, epochs)
        if checkpoint_minutes is not None:
            changed = with_checkpoint_minutes(changed, checkpoint_minutes)
        if changed is not config and is_main_process():  # once both changes are checked
            atomic_write_json(out / CONFIG_FILE, changed)
        config = changed
        if not build_model(config["model"], config["model_config"]).trains_by_gradient:  # the linear model's fit option
            if (out / WEIGHTS_FILE).exists():
                raise ElboxError(f"run {out} is complete: the {config['model']} model is fitted in one go")
            if verbose:
                LOG.info(
                    f"fitting {out} again from the start (a {config['model']} fit has no checkpoint to continue from)"
                )
            settings = run_settings(out / CONFIG_FILE)
            name, data, validation = settings.pop("model"), settings.pop("data"), settings.pop("validation")
            return fit_into(
                out,
                name,
                data,
                validation,
                device,
                progress,
                verbose,
                with_summaries(callback) if verbose else callback,
                settings,
            )
        return resume_training(
            out, config, device, progress, verbose, with_summaries(callback) if verbose else callback, extended_from
        )


def with_checkpoint_minutes(config: dict, minutes: Any) -> dict:
    """The run's config with another checkpoint_minutes (checked)."""
    train = {**config.get("train", {}), "checkpoint_minutes": minutes}
    minutes = config_from_dict(TrainConfig, train, "training settings").checkpoint_minutes
    return {**config, "train": {**train, "checkpoint_minutes": minutes}}


def extended_config(out: Path, config: dict, epochs: Any) -> dict:
    """The run's config with `epochs` more than it had (checked: a model trained by gradient, no max_steps). The
    trainer extends the restored run to it (extend_run)."""
    settings = config_from_dict(TrainConfig, config.get("train"), "training settings")
    epochs = config_from_dict(TrainConfig, {**config_dict(settings), "epochs": epochs}, "training settings").epochs
    if not build_model(config["model"], config["model_config"]).trains_by_gradient:
        raise ElboxError(f"run {out}: the {config['model']} model is fitted in one go; it has no epochs to extend")
    if epochs <= settings.epochs:
        raise ElboxError(f"run {out} has {settings.epochs} epoch(s); give --epochs more than that to extend it")
    if settings.max_steps is not None:
        raise ElboxError(
            f"run {out} is a quick run that ends at max_steps {settings.max_steps}; it cannot be extended "
            "by epochs: train a new run without --max-steps"
        )
    return {**config, "train": {**config.get("train", {}), "epochs": epochs}}


def resume_training(
    out: Path,
    config: dict,
    device: str,
    progress: bool,
    verbose: bool,
    callback: Callback | None,
    extended_from: int | None = None,
) -> Run:
    """resume() of a model trained by gradient, once its directory is locked (extended_from: the epochs the run had
    before resume(epochs=...) extended it)."""
    device = init_distributed(device)
    settings = config_from_dict(TrainConfig, config.get("train"), "training settings")
    torch.manual_seed(settings.seed)  # as a new run does: without a checkpoint, resuming starts the run afresh
    model = build_model(config["model"], config["model_config"]).to(device)
    data = config["data"]
    train_images, val_images, _ = run_data(data, settings.seed)
    model.preprocessing = Preprocessing.from_record(data)
    space = model.preprocessing.space
    state_file = resume_state_file(out)  # the last epoch's, or a newer one within the epoch after
    if state_file.exists():  # the restored state overwrites the weights (--init-from's run may be gone)
        initialize_from_data(model, space, train_images, settings.seed)
    else:  # as the new run did
        initialize(model, space, train_images, settings)
    what = f"training state {state_file}"
    tensors, state = load_training_state(state_file) if state_file.exists() else ({}, None)
    # a run extended by resume(epochs=N) continues from a state of fewer epochs than its config.json now says
    saved = saved_train_config(state, what) if state is not None else settings
    saved = dataclasses.replace(saved, checkpoint_minutes=settings.checkpoint_minutes)  # may change on resume
    if dataclasses.replace(saved, epochs=settings.epochs) == settings and saved.epochs < settings.epochs:
        settings, extend_to = saved, settings.epochs
    else:
        extend_to = None
    trainer = Trainer(model, train_images, val_images, space, settings, out, progress=progress, callback=callback)
    if is_main_process():
        remove_stale_temporaries(out)
    if state is not None:
        trainer.restore(tensors, state, what=what)
    if extend_to is not None:
        extend_run(trainer, extend_to)
        settings = trainer.config
    if trainer.stopped_early is not None:
        raise ElboxError(
            f"run {out} stopped early: its validation bound had not improved on epoch {trainer.stopped_early}'s "
            f"for {settings.patience} epochs (best.safetensors holds that epoch)"
        )
    if trainer.is_complete:
        done = (
            f"all {settings.epochs} epochs"
            if trainer.start_epoch > settings.epochs
            else f"its {settings.max_steps} steps (max_steps)"
        )
        raise ElboxError(
            f"run {out} is complete: {done} are done; extend it with elbox train --resume {out} --epochs N "
            "(elbox.resume(run_dir, epochs=N))"
        )
    if extended_from is not None:  # in the metrics: where the run was extended, and from how many epochs
        trainer.records.append(
            {
                "kind": "extended",
                "epoch": trainer.start_epoch - 1,
                "from_epochs": extended_from,
                "to_epochs": settings.epochs,
                "step": trainer.step,
            }
        )
    if is_main_process() and verbose:
        within, epoch = trainer.resume_progress, f"epoch {trainer.start_epoch} of {settings.epochs}"
        where = f"at {epoch}" if within is None else f"within {epoch}, after its batch {within.batches}"
        LOG.info(f"resuming {out} {where} (step {trainer.step})")
    trainer.fit()
    return finish(Run(with_preprocessing(trainer.eval_model, model), trainer.records, config, out), progress)


def extend_run(trainer: Trainer, epochs: int) -> None:
    """Make the (restored) run of `trainer` one of `epochs` epochs. A cosine learning rate follows the longer run's
    cosine from the current step on (Loshchilov & Hutter 2017's annealing over the new length): set to its value at
    this step (a finished run's rate, near 0, rises to it), then stepped as usual."""
    trainer.config = dataclasses.replace(trainer.config, epochs=epochs)
    if trainer.scheduler is not None:
        trainer.scheduler.T_max = trainer.total_steps
        cosine = (1 + math.cos(math.pi * trainer.step / trainer.total_steps)) / 2
        eta_min = trainer.scheduler.eta_min
        rates = [eta_min + (base - eta_min) * cosine for base in trainer.scheduler.base_lrs]
        for group, lr in zip(trainer.optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
        trainer.scheduler._last_lr = rates  # what get_last_lr() reports  # noqa: SLF001
