"""The public Python API: fit (resume: elbox.training.resuming; evaluate: elbox.evaluation.runs). The command line
calls these and nothing else does the work.

    run = elbox.fit("vae", "fashion-mnist", epochs=5, out="runs/vae")   # or a tensor, an array, a Dataset
    elbox.evaluate(run, "fashion-mnist", iw_samples=[1, 100])           # what `elbox evaluate` prints
    run = elbox.resume("runs/vae")                                      # continue an interrupted run, bit for bit
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from elbox.core.errors import ElboxError
from elbox.core.options import config_from_dict, config_to_dict
from elbox.core.progress import sample_with_progress
from elbox.data import (
    fit_real_space,
    get_data_space,
    iterate_batches,
    space_record,
)
from elbox.data.inputs import as_examples, example_shape, training_data
from elbox.data.preprocessing import Preprocessing
from elbox.io.atomic import atomic_write_json, atomic_write_jsonl
from elbox.io.checkpoint import (
    BEST_WEIGHTS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    checked_run_config,
    load_run,
    read_json,
    read_run_config,
    result_weights,
    save_weights,
    write_run_config,
)
from elbox.io.plots import save_image_grid
from elbox.io.run_config import DataConfig, TrainConfig, config_dict, train_config
from elbox.io.rundir import run_directory
from elbox.models.base import (
    Callback,
    DataInitialized,
    LatentVariableModel,
    check_model_size,
    model_class,
    model_config,
)
from elbox.models.estimates import log_prob_per_example
from elbox.training.batches import gather, num_examples
from elbox.training.distributed import first_process, init_distributed, is_main_process
from elbox.training.messages import model_size, with_summaries
from elbox.training.trainer import Trainer

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler


@dataclass
class Run:
    """A trained model with its history. `model` holds the weights that were validated and saved (the EMA when
    training kept one); `history` the metrics records; `config` what config.json holds; `directory` the run
    directory, or None when fit was given no `out`."""

    model: LatentVariableModel
    history: list[dict]
    config: dict
    directory: Path | None = None
    # the validation examples of a run trained on data given in memory (what evaluate(run) uses; not saved)
    validation_data: Any = dataclasses.field(default=None, repr=False)


# -- fit ---------------------------------------------------------------------------------------------------------


def split_options(model_cls: type, options: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Keyword options of fit() as (model config values, training settings, data options); a name two declare
    (the mixture's seed) goes to both."""
    config_class = model_cls.config_class_for(options)
    fields = [{f.name for f in dataclasses.fields(c)} for c in (config_class, TrainConfig, DataConfig)]
    fields[2] -= {"data", "validation"}  # fit's own arguments
    unknown = sorted(set(options) - set.union(*fields))
    homes = {name: home for name in unknown if (home := model_cls.variants_with(name))}
    if homes:
        raise ElboxError(
            "; ".join(f"{name} is an option of {home}" for name, home in homes.items())
            + f", not of this {model_cls.name} ({config_class.__name__}); set {next(iter(homes.values())).split()[0]} "
            "or drop it"
        )
    if unknown:
        raise ElboxError(
            f"unknown option(s) {', '.join(unknown)} for the {model_cls.name} model; its options: "
            f"{', '.join(sorted(fields[0] - {'data_shape'}))}; training options: {', '.join(sorted(fields[1]))}; "
            f"data options: {', '.join(sorted(fields[2]))}"
        )
    return tuple({k: v for k, v in options.items() if k in names} for names in fields)


def fit_space(model: LatentVariableModel, train_data, batch_size: int):
    """The model's data space; for real vectors, the standardization fitted on the training data in one streamed
    pass (stored with the run: every reported number is in the data's original units)."""
    if model.data_space != "real":
        return get_data_space(model.data_space)
    batches = iterate_batches(num_examples(train_data), max(batch_size, 4096), False, None)
    return fit_real_space(gather(train_data, list(batches), torch.device("cpu"), workers=0))


def check_batches(train_data, batch_size: int) -> None:
    if num_examples(train_data) < batch_size:
        raise ElboxError(
            f"the training data have {num_examples(train_data)} examples, fewer than one batch of {batch_size}; "
            "give more data or a smaller batch size"
        )


def run_settings(config_path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a run's config.json as keywords of fit(): {"model": name, "data": dataset, "data_dir": ...,
    "limit_train": ..., and every model-config and training option}, validated (and upgraded from older formats).
    elbox.fit(**run_settings(path), out=NEW) trains the same run again, bit for bit on CPU."""
    config = checked_run_config(read_json(config_path, "config file"), f"config file {config_path}")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise ElboxError(f"config file {config_path} names no model; give a run's config.json")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    if "name" not in data and "path" not in data:
        raise ElboxError(f"config file {config_path} trained on images given in memory; give the data again")
    values = config_to_dict(model_config(config["model"], config.get("model_config") or {}))
    values.pop("data_shape")
    train = config_to_dict(config_from_dict(TrainConfig, config.get("train") or {}, "training settings"))
    own_validation = "path" in data and "validation_fraction" not in data
    return {
        **values,
        **train,
        "model": config["model"],
        "data": data.get("name", data.get("path")),
        "validation": data.get("validation") if own_validation else None,
        "validation_fraction": data.get("validation_fraction", DataConfig.validation_fraction),
        **{key: data.get(key) for key in ("data_dir", "limit_train", "image_size", "columns", "validation_size")},
    }


def fit(
    model: str | LatentVariableModel = "vae",
    data: Any = "fashion-mnist",
    *,
    out: str | os.PathLike | None = None,
    validation: Any = None,
    device: str = "auto",
    progress: bool = True,
    verbose: bool = True,
    callback: Callback | None = None,
    train: TrainConfig | None = None,
    **options: Any,
) -> Run:
    """Train a model (or fit it in closed form / by EM) and return the Run.

    model: a registered name ("vae", "hvae", "diffusion", "linear", "gaussian", "mixture") or a model object.
    data: a built-in dataset name; a path (a folder of images, an .npy/.npz array, a .csv/.parquet table), read
      on demand; or 8-bit images as a tensor, a NumPy array or a torch Dataset. `validation` gives your own
      validation data in the same form; without it a seeded random fraction is held out (recorded in the run).
    options: model config fields (latent_dim=16, likelihood="gaussian", ...), TrainConfig fields (epochs=5,
      lr=1e-3, seed=0, ...; quick runs: max_steps=N, val_limit=N, val_every=N, samples=False) and DataConfig fields
      (image_size=64, columns=[...], workers=2, limit_train=...), one flat set of keywords; each defaults as declared on
      its dataclass. train: the training settings as a TrainConfig (keywords given as well override its fields).
    out: the run directory to write (config.json, weights, training state, metrics, samples.png), or None.
    progress: progress bars; verbose: a line on stderr at the start and for each epoch (or fit record).
    callback: called with each epoch's record (each fit record for closed-form models)."""
    callback = with_summaries(callback) if verbose else callback
    if train is not None:
        if not isinstance(train, TrainConfig):
            raise ElboxError(f"train must be a TrainConfig, got {type(train).__name__}")
        options = {**config_dict(train), **options}
    if out is None:
        return fit_into(None, model, data, validation, device, progress, verbose, callback, options)
    with run_directory(Path(out), new=True, lock=first_process()) as directory:
        return fit_into(directory, model, data, validation, device, progress, verbose, callback, options)


def fit_into(
    out: Path | None,
    model: str | LatentVariableModel,
    data: Any,
    validation: Any,
    device: str,
    progress: bool,
    verbose: bool,
    callback: Callback | None,
    options: dict[str, Any],
) -> Run:
    """fit() once its run directory (if any) is locked."""
    device = init_distributed(device)
    if dist.is_initialized():
        dist.barrier()  # every process has checked `out` before process 0 writes into it
    cls = type(model) if isinstance(model, LatentVariableModel) else model_class(model)
    model_values, train_values, data_values = split_options(cls, options)
    if train_values.get("init_from") is not None:  # recorded absolute: a resume from elsewhere finds it
        train_values["init_from"] = str(Path(train_values["init_from"]).resolve())
    chosen = dataclasses.asdict(model.config) if isinstance(model, LatentVariableModel) else model_values
    config = train_config(cls, train_values, chosen)
    named = {
        "data": data if isinstance(data, (str, os.PathLike)) else None,
        "validation": validation if isinstance(validation, (str, os.PathLike)) else None,
    }
    data_config = config_from_dict(
        DataConfig, {**data_values, **{k: str(v) if v is not None else None for k, v in named.items()}}, "data options"
    )
    train_images, val_images, data_record = training_data(
        data,
        validation,
        data_config.data_dir,
        data_config.limit_train,
        config.seed,
        data_config.validation_fraction,
        data_config.image_size,
        data_config.columns,
        data_config.validation_size,
    )
    shape = example_shape(train_images)
    torch.manual_seed(config.seed)
    if isinstance(model, LatentVariableModel):
        if model_values:
            raise ElboxError(f"{', '.join(model_values)}: the model is already built; set these on its config")
        if tuple(model.config.data_shape) != shape:
            raise ElboxError(
                f"the model takes examples of shape {tuple(model.config.data_shape)}; the data has {shape}"
            )
    else:
        model_settings = config_from_dict(
            cls.config_class_for(model_values), {**model_values, "data_shape": shape}, f"{cls.name} model config"
        )
        check_model_size(cls, model_settings)
        model = cls.from_config(model_settings)
    model = model.to(device)
    space = fit_space(model, train_images, config.batch_size)
    data_record.update(space_record(space))
    model.preprocessing = Preprocessing.from_record(data_record)
    if (
        model.trains_by_gradient and "name" not in data_record
    ):  # your own data (a built-in's --limit-train may be small)
        check_batches(train_images, config.batch_size)
    system = {"threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__}
    run_config = (
        write_run_config(out, model, data_record, config_dict(config), system)
        if out and is_main_process()
        else {
            "model": model.name,
            "model_config": config_to_dict(model.config),
            "data": data_record,
            "train": config_dict(config),
        }
    )
    if is_main_process() and verbose and space.name == "binary" and "name" not in data_record:
        LOG.info(
            "this model's Bernoulli likelihood takes black-and-white pixels, so your images are binarized "
            "afresh in each batch (pixel on with probability k/255: dynamic binarization); to model grey levels, "
            "train with --likelihood discretized-logistic or categorical"
        )
    if is_main_process() and verbose:
        LOG.info(
            f"training {model.name} ({model_size(model)}) on "
            f"{data_record.get('name', data_record.get('path', 'your data'))} "
            f"[{space.name}] with {num_examples(train_images)} training and {num_examples(val_images)} validation "
            "examples on "
            f"{device}"
            + (f" ({system['threads']} threads)" if device.type == "cpu" else "")
            + (f"; run dir {out}" if out else "")
        )
    if config.perturb and (space.name == "real" or not model.trains_by_gradient):
        raise ElboxError(
            f"--perturb perturbs the 8-bit images of a model trained by gradient; the {model.name} model "
            + ("is fitted in one go" if space.name != "real" else "of this run reads vectors")
        )
    if not model.trains_by_gradient:
        if config.init_from is not None:
            raise ElboxError(
                f"--init-from starts gradient training from a run's weights; the {model.name} model is fitted in one go"
            )
        if dist.is_initialized():
            raise ElboxError(f"the {model.name} model is fitted in one go; run it without torchrun")
        history = fit_without_gradients(model, train_images, val_images, space, config.seed, out, callback)
        run_config["model_config"] = config_to_dict(model.config)
        return finish(Run(model, history, run_config, out, val_images), progress)
    initialize(model, space, train_images, config)
    trainer = Trainer(
        model,
        train_images,
        val_images,
        space,
        config,
        out,
        progress=progress,
        callback=callback,
        workers=data_config.workers,
    )
    if dist.is_initialized() and is_main_process():
        world = dist.get_world_size()
        LOG.info(
            f"distributed over {world} processes ({dist.get_backend()}): global batch {config.batch_size} = "
            f"{world} x {config.batch_size // world} per process; learning rate {config.lr} as given (not scaled)"
        )
    trainer.fit()
    return finish(
        Run(with_preprocessing(trainer.eval_model, model), trainer.records, run_config, out, val_images), progress
    )


def with_preprocessing(trained: LatentVariableModel, model: LatentVariableModel) -> LatentVariableModel:
    """The trained model (the trainer's EMA copy, or the model itself), carrying the model's preprocessing."""
    trained.preprocessing = model.preprocessing
    return trained


def initialize(model: LatentVariableModel, space, train_images: Any, config: TrainConfig) -> None:
    """The starting weights of a model trained by gradient: a run's (config.init_from), else the model's own
    initialization, data-dependent where it has one."""
    if config.init_from is None:
        initialize_from_data(model, space, train_images, config.seed)
        return
    try:
        weights = result_weights(read_run_config(config.init_from).get("train", {}))
        if weights == "best" and not (Path(config.init_from) / BEST_WEIGHTS_FILE).is_file():
            raise ElboxError("that run was trained with early stopping and has validated no epoch yet")
        start, _ = load_run(config.init_from, weights=weights)
    except ElboxError as error:
        raise ElboxError(f"--init-from {config.init_from}: {error}") from None
    ours, theirs = config_to_dict(model.config), config_to_dict(start.config)
    if start.name != model.name or ours != theirs:
        differ = [k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
        raise ElboxError(
            f"--init-from {config.init_from}: that run is a {start.name} model"
            + (f" with other {', '.join(differ)}" if start.name == model.name else "")
            + "; give this run the same model and model options as that run's config.json"
        )
    model.load_state_dict(start.state_dict())


def initialize_from_data(model: LatentVariableModel, space, train_images: Any, seed: int) -> None:
    """The model's data-dependent initialization, for models that have one (the whole training set is put in the
    data space only then)."""
    if isinstance(model, DataInitialized):
        with torch.no_grad():
            examples = train_images if isinstance(train_images, Tensor) else as_examples(train_images, "training data")
            model.initialize_from_data(space.eval_data(examples.to(model.device), seed=seed))


def fit_without_gradients(
    model: LatentVariableModel,
    train_images: Tensor,
    val_images: Tensor,
    space,
    seed: int,
    out: Path | None,
    callback: Callback | None,
) -> list[dict]:
    """Closed-form or EM fit on the whole training split, held in memory (read whole where it is streamed). Densities
    of dequantized data become log-probabilities of the 8-bit data, of standardized vectors densities in the original
    units (the space's offset is added to every record)."""
    train_images, val_images = as_examples(train_images, "training data"), as_examples(val_images, "validation data")
    offset = space.log_prob_offset(math.prod(train_images.shape[1:]))

    def on_record(record: dict) -> None:
        record.update({key: record[key] + offset for key in ("log_likelihood", "elbo") if key in record})
        record["kind"] = "fit"
        if callback is not None:
            callback(record)

    records = model.fit(space.eval_data(train_images.to(model.device), seed=seed), callback=on_record)
    if out is not None:  # the fit may settle model options (the mixture's n_components): config.json, then the weights
        run_config = read_json(out / CONFIG_FILE, "run config")
        atomic_write_json(out / CONFIG_FILE, {**run_config, "model_config": config_to_dict(model.config)})
    val_x = space.eval_data(val_images.to(model.device), seed=seed)
    with torch.no_grad():
        val_log_likelihood = log_prob_per_example(model, val_x, 1000).mean().item() + offset
    summary = {"kind": "epoch", "epoch": 1, "val_log_likelihood": val_log_likelihood}
    if callback is not None:
        callback(summary)
    if out is not None:
        save_weights(out / WEIGHTS_FILE, model)
        atomic_write_jsonl(out / METRICS_FILE, [*records, summary])
    return [*records, summary]


def finish(run: Run, progress: bool) -> Run:
    """Leave the process group; process 0 writes samples.png (images, unless the run's samples option is off) from
    the saved weights, with a progress bar for a sampler of many steps."""
    if dist.is_initialized():
        main_process = is_main_process()
        dist.destroy_process_group()
        if not main_process:
            return run
    wanted = run.config.get("train", {}).get("samples", True)
    if wanted and run.directory is not None and len(run.model.config.data_shape) == 3:  # pictures of images only
        with torch.no_grad():
            images = sample_with_progress(run.model, 64, progress)
        save_image_grid(images.clamp(0, 1).cpu(), run.directory / "samples.png")
    return run
