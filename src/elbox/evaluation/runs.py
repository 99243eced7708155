"""elbox.evaluate: a model, a Run or a run directory evaluated on data, by default the run's own (a built-in dataset's
split, or your own data's validation part), read as its run read its data.

    elbox.evaluate(run, iw_samples=[1, 100])        # what `elbox evaluate` prints and saves
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from elbox.core.command_options import EvaluateOptions
from elbox.core.errors import ElboxError
from elbox.core.limits import check_count_option
from elbox.core.options import did_you_mean, short_repr
from elbox.core.system import resolve_device
from elbox.data import SPLITS, load_split
from elbox.data.inputs import as_examples, first, is_builtin, is_path, run_data
from elbox.data.preprocessing import input_space, open_input
from elbox.evaluation.evaluator import evaluate as evaluate_on
from elbox.io.checkpoint import CONFIG_FILE, load_run, read_run_config, result_weights
from elbox.models.base import LatentVariableModel
from elbox.training.workflows import Run

# -- data --------------------------------------------------------------------------------------------------------


def data_in_space(
    model: LatentVariableModel, data: Any, split: str, data_dir: str | None, seed: int, limit: int | None
) -> tuple[Tensor, float, str]:
    """Evaluation data in the model's data space (deterministic for the seed), its log-probability offset, and a name
    for it. data: a built-in dataset's name (its `split`), a path (read whole, as the model's run read its data:
    model.preprocessing), or examples in memory."""
    space = input_space(model)
    if is_builtin(data):
        images, _ = load_split(data, split, data_dir)
        name = f"{data} {split}"
    elif is_path(data):
        images, name = as_examples(first(open_input(model, data), limit), f"data {data}"), str(data)
    else:
        images, name = as_examples(data, "data"), "data given in memory"
    if tuple(images.shape[1:]) != tuple(model.config.data_shape):
        raise ElboxError(
            f"{name} has examples of shape {tuple(images.shape[1:])}; the model takes {tuple(model.config.data_shape)}"
        )
    images = images[:limit] if limit else images
    return space.eval_data(images.to(model.device), seed=seed), space.log_prob_offset(math.prod(images.shape[1:])), name


def evaluation_split(record: dict, data: Any, split: str) -> str:
    """The split an evaluation reports (and names its JSON after): a built-in dataset's `split`; for a run's own data
    (data None) its "train" or "validation" part; "given" for other data."""
    if data is not None and not is_builtin(data):
        return "given"
    if data is not None or "name" in record:
        return split
    return "train" if split in ("train", "train-full") else "validation"


def default_weights(model: Any) -> str:
    """ "best" for a run (a Run or a run directory) trained with early stopping, whose best epoch is its result; else
    "last"."""
    if isinstance(model, Run):
        train = model.config.get("train", {})
    elif isinstance(model, (str, os.PathLike)) and (Path(model) / CONFIG_FILE).is_file():
        train = read_run_config(model).get("train", {})
    else:
        return "last"
    return result_weights(train)


def check_evaluate_options(
    split: Any, iw_samples: Any, elbo_samples: Any, limit: Any, batch_size: Any, seed: Any
) -> None:
    """evaluate()'s options, in the command line's ranges (elbox.core.limits); ElboxError naming the first out of
    range."""
    if split not in SPLITS:
        raise ElboxError(
            f"unknown split {short_repr(split)}; {did_you_mean(split, SPLITS)}choose one of {', '.join(SPLITS)}"
        )
    ks = [iw_samples] if isinstance(iw_samples, int) else iw_samples
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ElboxError(f"iw_samples must be a whole number or a non-empty list of them, got {short_repr(iw_samples)}")
    for value, name in (
        *((k, "iw_samples") for k in ks),
        (elbo_samples, "elbo_samples"),
        (batch_size, "batch_size"),
        (seed, "seed"),
        *(((limit, "limit"),) if limit is not None else ()),
    ):
        check_count_option(value, name)


def own_data(config: dict, split: str, seed: int, in_memory: Any = None) -> tuple[Any, str | None, str]:
    """The data a run is evaluated on by default, (data, data_dir, its name): a built-in dataset's `split`; for a
    run on your own files, its validation examples (held out at random, or its --validation); for one on data given
    in memory, `in_memory` (a Run's validation_data)."""
    record = config.get("data", {})
    if "name" in record:
        return record["name"], record.get("data_dir"), f"{record['name']} {split}"
    training = split in ("train", "train-full")  # your own data have a training and a validation part, no test split
    if "path" in record:
        train, validation, _ = run_data(record, config.get("train", {}).get("seed", 0))
        return (
            (train if training else validation),
            None,
            f"{record['path']} (the run's {'training' if training else 'validation'} data)",
        )
    if training:
        raise ElboxError("this run was trained on data given in memory; give the data to evaluate on")
    if in_memory is not None:
        return in_memory, None, "the validation data given in memory"
    raise ElboxError(
        "give the data: this model carries no record of the data it was trained on (a Run or a run "
        "directory has it; one trained on data given in memory needs them again)"
    )


def run_examples(config: dict, split: str, seed: int, limit: int | None) -> Tensor:
    """The first `limit` examples of a run's own `split` (own_data), as given: uint8 images, or vectors."""
    data, data_dir, _ = own_data(config, split, seed)
    if is_builtin(data):
        images, _ = load_split(data, split, data_dir, config["data"].get("validation_size"))
        return images[:limit] if limit else images
    return as_examples(first(data, limit), "the run's data")


def evaluate(
    model: Run | LatentVariableModel | str | os.PathLike,
    data: Any = None,
    *,
    split: str = EvaluateOptions.split,
    iw_samples: int | Sequence[int] = EvaluateOptions.iw_samples,
    elbo_samples: int = EvaluateOptions.elbo_samples,
    limit: int | None = EvaluateOptions.limit,
    batch_size: int = EvaluateOptions.batch_size,
    seed: int = EvaluateOptions.seed,
    data_dir: str | None = None,
    device: str | None = None,
    progress: bool = False,
    weights: str | None = None,
    compile: bool = EvaluateOptions.compile,
) -> dict:
    """Evaluate a model (a Run, a model, or a run directory) on data: a built-in dataset name (its `split`), a path
    (read as the model's run read its data), or examples as a tensor, array or Dataset; by default the run's own data
    (a built-in dataset's `split`; for your own data, the run's validation examples). Returns what `elbox evaluate`
    prints and saves: ELBO and its terms, IWAE-K NLL for each K, exact NLL, gaps, bits/dim, active units, each with
    its standard error, in nats per example of the 8-bit data (of vectors: in their units). weights: "best" evaluates
    a run directory's best-on-validation weights, "last" the last epoch's; by default the best for a run trained with
    early stopping (patience), else the last. compile: torch.compile the importance-sampling passes (about 1.2x
    faster IWAE on CPU after some seconds of compilation)."""
    config: dict = {}
    weights = weights or default_weights(model)
    in_memory = model.validation_data if isinstance(model, Run) else None
    if weights != "last" and isinstance(model, Run):
        if model.directory is None:
            raise ElboxError("this Run has no directory, so no best weights: evaluate run.model, or fit with out=")
        model = model.directory
    if isinstance(model, (str, os.PathLike)):
        model, config = load_run(model, resolve_device(device or "auto"), weights=weights)
    elif weights != "last":
        raise ElboxError(f"weights={weights!r} picks a run directory's weights; give the run directory or the Run")
    elif isinstance(model, Run):
        model, config = model.model, model.config
    elif device is not None and isinstance(model, LatentVariableModel):
        model = model.to(resolve_device(device))
    if not isinstance(model, LatentVariableModel):
        raise ElboxError(f"evaluate takes a Run, a model or a run directory, got {type(model).__name__}")
    check_evaluate_options(split, iw_samples, elbo_samples, limit, batch_size, seed)
    own = data is None
    if own:
        data, data_dir, name = own_data(config, split, seed, in_memory)
    x, offset, given_name = data_in_space(model, data, split, data_dir, seed, limit)
    result = evaluate_on(
        model,
        x,
        offset,
        iw_samples=list([iw_samples] if isinstance(iw_samples, int) else iw_samples),
        batch_size=batch_size,
        elbo_samples=elbo_samples,
        seed=seed,
        progress=progress,
        compile=compile,
    )
    result.update(
        split=evaluation_split(config.get("data", {}), None if own else data, split),
        dataset=name if own else given_name,
        data_space=model.data_space,
        model=model.name,
    )
    return result
