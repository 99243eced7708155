"""Command-line tool: elbox train | evaluate | score | encode | report | sample | reconstruct | tighten.

Every error is one line on stderr ("elbox: error: ...") and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from elbox.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    load_run,
    load_training_state,
    read_run_config,
    remove_stale_temporaries,
    save_weights,
    write_run_config,
)
from elbox.bounds import IWAE_ESTIMATORS
from elbox.data import SPLITS, dataset_names, get_data_space, load_split
from elbox.errors import ElboxError
from elbox.evaluate import evaluate, format_table, log_prob_per_example, score_per_example
from elbox.likelihoods import LIKELIHOODS
from elbox.loggers import LOGGERS
from elbox.models import build_model
from elbox.models.base import config_from_dict
from elbox.models.diffusion import DIFFUSION_LOSSES, PARAMETERIZATIONS, SCHEDULES
from elbox.models.hvae import HVAE_TYPES, POSTERIORS
from elbox.models.vae import ARCHITECTURES
from elbox.nets import ACTIVATIONS
from elbox.plots import save_image_grid
from elbox.report import write_report
from elbox.score import read_images, to_8bit_tensor, write_scores_csv
from elbox.system import keep_freed_memory_in_heap, set_threads
from elbox.tighten import check_tightenable, format_gap_table, gap_split, refit_encoder
from elbox.train import BETA_SCHEDULES, LR_SCHEDULES, OBJECTIVES, PRECISIONS, Trainer, TrainConfig, config_dict

DEVICES = ("auto", "cpu", "cuda", "mps")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ElboxError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ElboxError("--device mps was asked for, but PyTorch sees no Apple GPU")
    return torch.device(name)


def init_distributed(device_name: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per process (LOCAL_RANK), gloo on
    CPUs. Rendezvous (single machine or several) is torchrun's, through its environment variables."""
    device = resolve_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto = cuda, mps, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for PyTorch (default: $OMP_NUM_THREADS, else every usable core shared among "
                        "the processes on this machine)")


def add_input_options(p: argparse.ArgumentParser) -> None:
    """RUN_DIR, --input images (read_input_data), --batch-size, --seed and the common options (score, encode)."""
    p.add_argument("run_dir")
    p.add_argument("--input", required=True, metavar="FILE|DIR", help=".npy, .npz (array 'x', 'images' or the only one) or a folder of PNGs")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of binarization/dequantization and of any sampling")
    add_common(p)


# ----------------------------------------------------------------------------------------------
# train


def likelihood_options(args: argparse.Namespace) -> dict:
    options = {}
    if args.likelihood == "gaussian":
        options["sigma"] = args.sigma
    if args.likelihood == "discretized-logistic":
        options["n_mixtures"] = args.n_mixtures
    return options


def vae_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    return {
        "data_shape": tuple(data_shape),
        "latent_dim": args.latent_dim,
        "hidden_dims": args.hidden_dims,
        "architecture": args.architecture,
        "activation": args.activation,
        "likelihood": args.likelihood,
        "likelihood_options": likelihood_options(args),
    }


def hvae_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    """--levels T; markov: --latent-dims (default 32, 16, 8, ... halving per level, at least 2) and --hidden-dims;
    ladder: --channels, --latent-channels, --blocks-per-level, --level-downsample, --posterior."""
    latent_dims = args.latent_dims or [max(2, 32 >> t) for t in range(args.levels)]
    return {
        "data_shape": tuple(data_shape),
        "hvae_type": args.hvae_type,
        "levels": args.levels,
        "likelihood": args.likelihood,
        "likelihood_options": likelihood_options(args),
        "activation": args.activation,
        "latent_dims": latent_dims,
        "hidden_dims": args.hidden_dims,
        "channels": args.channels,
        "latent_channels": args.latent_channels,
        "blocks_per_level": args.blocks_per_level,
        "level_downsample": args.level_downsample or [],
        "posterior": args.posterior,
    }


def diffusion_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    return {
        "data_shape": tuple(data_shape),
        "timesteps": args.timesteps,
        "schedule": args.schedule,
        "gamma_min": args.gamma_min,
        "gamma_max": args.gamma_max,
        "parameterization": args.parameterization,
        "loss": args.diffusion_loss,
        "channels": args.unet_channels,
        "blocks_per_level": args.blocks_per_level,
        "fourier_features": not args.no_fourier_features,
    }


def linear_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    return {
        "data_shape": tuple(data_shape),
        "latent_dim": args.latent_dim,
        "noise": args.noise,
        "encoder": args.encoder,
        "fit": args.fit,
    }


def gaussian_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    return {"data_shape": tuple(data_shape), "covariance": args.covariance, "ridge": args.ridge}


def mixture_config_from_args(args: argparse.Namespace, data_shape: tuple[int, ...]) -> dict:
    return {
        "data_shape": tuple(data_shape),
        "n_components": args.components,
        "covariance": args.covariance,
        "init": args.init,
        "max_iter": args.max_iter,
        "tol": args.tol,
        "covariance_floor": args.covariance_floor,
        "seed": args.seed,
    }


MODEL_CONFIG_FROM_ARGS = {
    "vae": vae_config_from_args,
    "hvae": hvae_config_from_args,
    "diffusion": diffusion_config_from_args,
    "linear": linear_config_from_args,
    "gaussian": gaussian_config_from_args,
    "mixture": mixture_config_from_args,
}


def fit_without_gradients(model, train_images, val_images, space, args, out: Path) -> dict:
    """Closed-form or EM fit on the (dequantized) training split; records go to metrics.jsonl."""
    device = next(model.buffers(), next(model.parameters(), None))
    device = device.device if device is not None else torch.device("cpu")
    offset = space.log_prob_offset(math.prod(train_images.shape[1:]))
    records = model.fit(space.eval_data(train_images.to(device), seed=args.seed), progress=not args.no_progress)
    for record in records:  # densities of dequantized data become log-probabilities of the 8-bit data
        record.update({key: record[key] + offset for key in ("log_likelihood", "elbo") if key in record})
        record["kind"] = "fit"
    val_x = space.eval_data(val_images.to(device), seed=args.seed)
    with torch.no_grad():
        summary = {"kind": "epoch", "epoch": 1, "val_log_likelihood": log_prob_per_example(model, val_x, 1000).mean().item() + offset}
    save_weights(out / WEIGHTS_FILE, model)
    atomic_write_jsonl(out / METRICS_FILE, [*records, summary])
    print(f"fitted: train log-likelihood {records[-1].get('log_likelihood', math.nan):.2f}, "
          f"validation log-likelihood {summary['val_log_likelihood']:.2f} nats per example", file=sys.stderr)
    return summary


def load_training_images(name: str, data_dir: str | None, limit_train: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    train_images, _ = load_split(name, "train", data_dir)
    val_images, _ = load_split(name, "validation", data_dir)
    return (train_images[:limit_train] if limit_train else train_images), val_images


def finish_training(model, record: dict, out: Path) -> int:
    """samples.png from the saved weights, and the last epoch's summary on stdout (process 0 only)."""
    if dist.is_initialized():
        main_process = is_main_process()
        dist.destroy_process_group()
        if not main_process:
            return 0
    with torch.no_grad():
        save_image_grid(model.sample(64).clamp(0, 1).cpu(), out / "samples.png")
    print(json.dumps({k: v for k, v in record.items() if k.startswith("val_") or k in ("epoch", "step", "skipped_steps", "skipped_large_grad")}))
    return 0


def initialize_from_data(model, space, train_images: torch.Tensor, seed: int) -> None:
    """Data-dependent initialization for models that have one (the linear model's fit="elbo": b = the data mean)."""
    if hasattr(model, "initialize_from_data"):
        device = next(model.parameters()).device
        with torch.no_grad():
            model.initialize_from_data(space.eval_data(train_images.to(device), seed=seed))


# options that --resume may be given with; every other one comes from the run's config.json
RESUME_OPTIONS = {"command", "resume", "device", "no_progress", "threads", "func", "train_parser"}


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a run from its last good checkpoint (state.safetensors), bit for bit on CPU."""
    given = sorted(k for k, v in vars(args).items() if k not in RESUME_OPTIONS and v != args.train_parser.get_default(k))
    if given:
        raise ElboxError(f"--resume takes every setting from the run's {CONFIG_FILE}; drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    out = Path(args.resume)
    config = read_run_config(out)
    device = init_distributed(args.device)
    train_config = config_from_dict(TrainConfig, config.get("train"))
    torch.manual_seed(train_config.seed)  # as a new run does: without a checkpoint, resuming starts the run afresh
    model = build_model(config["model"], config["model_config"]).to(device)
    if not model.trains_by_gradient:
        raise ElboxError(f"the {model.name} model is fitted in one go; there is no training to resume")
    data = config["data"]
    train_images, val_images = load_training_images(data["name"], data.get("data_dir"), data.get("limit_train"))
    space = get_data_space(data["space"])
    initialize_from_data(model, space, train_images, train_config.seed)  # as the new run did (overwritten by a state)
    trainer = Trainer(model, train_images, val_images, space, train_config, out, progress=not args.no_progress)
    if is_main_process():
        remove_stale_temporaries(out)
    if (out / STATE_FILE).exists():
        trainer.restore(*load_training_state(out / STATE_FILE), what=f"training state {out / STATE_FILE}")
    if trainer.start_epoch > train_config.epochs:
        raise ElboxError(f"run {out} is complete: all {train_config.epochs} epochs are done")
    if is_main_process():
        print(f"elbox: resuming {out} at epoch {trainer.start_epoch} of {train_config.epochs} (step {trainer.step})", file=sys.stderr)
    record = trainer.fit()
    return finish_training(trainer.eval_model, record, out)


# `elbox train` defaults that depend on the model. The VAE's were chosen by measuring time to quality: on a 2-core
# CPU they reach a test NLL below 234 nats (IWAE-5000, binarized Fashion-MNIST) in under 200 s (benchmarks/README.md)
MODEL_TRAIN_DEFAULTS = {"vae": {"epochs": 36, "lr": 3e-3, "lr_schedule": "cosine", "latent_dim": 32}}
TRAIN_DEFAULTS = {"epochs": 10, "lr": 1e-3, "lr_schedule": "constant", "latent_dim": 20}


def fill_model_defaults(args: argparse.Namespace) -> None:
    """Give the options left unset (None) the model's default, else the general one."""
    for name, value in {**TRAIN_DEFAULTS, **MODEL_TRAIN_DEFAULTS.get(args.model, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of `elbox train`'s options."""
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, beta=args.beta,
        beta_schedule=args.beta_schedule, warmup_epochs=args.warmup_epochs, n_samples=args.n_samples,
        max_nonfinite=args.max_nonfinite, grad_clip=args.grad_clip, objective=args.objective,
        iw_samples=args.iw_samples, estimator=args.estimator, free_bits=args.free_bits,
        cycle_epochs=args.cycle_epochs, cycle_ramp_fraction=args.cycle_ramp_fraction,
        grad_skip_threshold=args.grad_skip_threshold, lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
        logger=args.logger, precision=args.precision, compile=args.compile, channels_last=args.channels_last,
    )


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        return cmd_resume(args)
    if args.out is None:
        raise ElboxError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    fill_model_defaults(args)
    out = Path(args.out)
    if (out / CONFIG_FILE).exists():
        raise ElboxError(f"{out} already holds a run ({CONFIG_FILE} exists); choose another --out, or continue it with --resume {out}")
    device = init_distributed(args.device)
    if dist.is_initialized():
        dist.barrier()  # every process has checked --out before process 0 writes into it
    train_images, val_images = load_training_images(args.data, args.data_dir, args.limit_train)
    config = train_config_from_args(args)
    torch.manual_seed(args.seed)
    model = build_model(args.model, MODEL_CONFIG_FROM_ARGS[args.model](args, tuple(train_images.shape[1:]))).to(device)
    space = get_data_space(model.data_space)
    data = {"name": args.data, "data_dir": args.data_dir, "space": space.name, "validation": "last 5000 of the official training set",
            "limit_train": args.limit_train}
    if is_main_process():
        write_run_config(out, model, data, config_dict(config))
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"elbox: training {args.model} ({n_params:,} parameters) on {args.data} [{space.name}] "
            f"with {train_images.shape[0]} training and {val_images.shape[0]} validation images on {device}; run dir {out}",
            file=sys.stderr,
        )
    if dist.is_initialized():
        world = dist.get_world_size()
        if is_main_process():
            print(f"elbox: distributed over {world} processes ({dist.get_backend()}): global batch {args.batch_size} = "
                  f"{world} x {args.batch_size // world} per process; learning rate {args.lr} as given (not scaled)", file=sys.stderr)
        if not model.trains_by_gradient:
            raise ElboxError(f"the {args.model} model is fitted in one go; run it without torchrun")
    if model.trains_by_gradient:
        initialize_from_data(model, space, train_images, args.seed)
        trainer = Trainer(model, train_images, val_images, space, config, out, progress=not args.no_progress)
        record = trainer.fit()
        model = trainer.eval_model  # the saved weights (the EMA when --ema-decay is set)
    else:
        record = fit_without_gradients(model, train_images, val_images, space, args, out)
    return finish_training(model, record, out)


# ----------------------------------------------------------------------------------------------
# evaluate / sample / reconstruct


def load_eval_data(config: dict, split: str, limit: int | None, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """The split in the run's data space (deterministic for the seed) and its log-probability offset."""
    data = config["data"]
    if "name" not in data:
        raise ElboxError("this model directory names no dataset (save_pretrained was given no data={'name': ...}); "
                         "score your own images with elbox score --input")
    images, _ = load_split(data["name"], split, data.get("data_dir"))
    if limit:
        images = images[:limit]
    space = get_data_space(data["space"])
    x = space.eval_data(images.to(device), seed=seed)
    return x, space.log_prob_offset(math.prod(images.shape[1:]))


def print_and_save(title: str, table: str, result: dict, json_path: str | Path) -> int:
    """Print a result table and write the result as JSON (atomically)."""
    print(title)
    print(table)
    atomic_write_json(json_path, result)
    print(f"wrote {json_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    x, offset = load_eval_data(config, args.split, args.limit, args.seed, device)
    result = evaluate(
        model, x, offset, iw_samples=args.iw_samples, batch_size=args.batch_size,
        elbo_samples=args.elbo_samples, seed=args.seed, progress=not args.no_progress,
    )
    result.update(split=args.split, dataset=config["data"]["name"], data_space=config["data"]["space"], model=config["model"])
    title = f"{config['model']} on {config['data']['name']} {args.split} [{config['data']['space']}]"
    return print_and_save(title, format_table(result), result, args.json or Path(args.run_dir) / f"eval-{args.split}.json")


def sample_options(model, args: argparse.Namespace) -> dict:
    """--draw and --temperature, for models whose sample() takes them (the VAE); an error for others."""
    options = {}
    if args.draw:
        options["mean"] = False
    if args.temperature != [1.0]:
        options["temperature"] = args.temperature[0] if len(args.temperature) == 1 else args.temperature
    if args.steps is not None:
        options["steps"] = args.steps
    accepted = inspect.signature(model.sample).parameters
    flags = {"mean": "--draw", "temperature": "--temperature", "steps": "--steps"}
    unsupported = [flags[name] for name in options if name not in accepted]
    if unsupported:
        raise ElboxError(f"the {model.name} model's samples take no {' or '.join(unsupported)} option")
    return options


def cmd_sample(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, _ = load_run(args.run_dir, device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        images = model.sample(args.n, **sample_options(model, args))
    out = save_image_grid(images.clamp(0, 1).cpu(), args.out or Path(args.run_dir) / "samples.png")
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Per-image log-likelihood estimates of a user's images, as CSV."""
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    x, names, space = read_input_data(args, model, config, device)
    num_dims = math.prod(x.shape[1:])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        log_likelihood, estimate = score_per_example(
            model, x, space.log_prob_offset(num_dims), args.iw_samples, args.batch_size, args.elbo_samples, progress=not args.no_progress)
    out = Path(args.out or Path(args.run_dir) / "scores.csv")
    write_scores_csv(out, names, log_likelihood, num_dims, estimate)
    mean = log_likelihood.mean().item()
    print(f"scored {len(names)} images: mean log-likelihood {mean:.3f} nats ({-mean / (num_dims * math.log(2)):.4f} bits/dim), "
          f"{estimate}; wrote {out}")
    return 0


def read_input_data(args: argparse.Namespace, model, config: dict, device: torch.device) -> tuple[torch.Tensor, list[str], object]:
    """--input images, checked and put in the run's data space: (x, names, space)."""
    array, names = read_images(args.input)
    images = to_8bit_tensor(array, tuple(model.config.data_shape), f"input {args.input}")
    space = get_data_space(config["data"]["space"])
    return space.eval_data(images.to(device), seed=args.seed), names, space


def cmd_encode(args: argparse.Namespace) -> int:
    """Posterior means (and variances where the model has them) of a user's images, as features in an .npz."""
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    if not hasattr(model, "encode"):
        raise ElboxError(f"the {model.name} model has no encoder")
    x, names, _ = read_input_data(args, model, config, device)
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for s in range(0, x.shape[0], args.batch_size):
            xb = x[s : s + args.batch_size]
            mean, variance = model.encode_moments(xb) if hasattr(model, "encode_moments") else (model.encode(xb), None)
            parts.setdefault("mean", []).append(mean.cpu())
            if variance is not None:
                parts.setdefault("variance", []).append(variance.cpu())
    features = {k: torch.cat(v).numpy() for k, v in parts.items()}
    out = Path(args.out)
    buffer = io.BytesIO()
    np.savez(buffer, names=np.array(names), **features)
    atomic_write_bytes(out, buffer.getvalue())
    print(f"encoded {len(names)} images: {', '.join(f'{k} {v.shape}' for k, v in features.items())}; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    html_path, md_path = write_report(args.run_dir, resolve_device(args.device), args.out, args.seed)
    print(f"wrote {html_path} and {md_path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    x, _ = load_eval_data(config, args.split, args.n, args.seed, device)
    if not hasattr(model, "reconstruct"):
        raise ElboxError(f"the {model.name} model has no reconstructions (no encoder to map an image to a latent)")
    with torch.no_grad():
        recon = model.reconstruct(x)
    # rows alternate: originals, then their reconstructions
    nrow = 8
    pairs = [t for i in range(0, x.shape[0], nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]
    out = save_image_grid(torch.cat(pairs).cpu(), args.out or Path(args.run_dir) / "reconstructions.png", nrow=nrow)
    print(f"wrote {out}")
    return 0


def cmd_tighten(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config = load_run(args.run_dir, device)
    check_tightenable(model)
    x, offset = load_eval_data(config, args.split, args.limit, args.seed, device)
    refit = None
    if args.refit_epochs:
        train_images, _ = load_split(config["data"]["name"], "train", config["data"].get("data_dir"))
        val_x, _ = load_eval_data(config, "validation", None, args.seed, device)
        space = get_data_space(config["data"]["space"])
        print(f"refitting the encoder for {args.refit_epochs} epoch(s) with the decoder frozen", file=sys.stderr)
        refit, history = refit_encoder(model, train_images.to(device), val_x, space, epochs=args.refit_epochs, seed=args.seed)
        for record in history:
            print(f"  epoch {record['epoch']}: validation ELBO {record['val_elbo'] + offset:.3f} nats", file=sys.stderr)
    result = gap_split(
        model, x, refit, steps=args.steps, lr=args.lr, iw_samples=args.iw_samples,
        elbo_samples=args.elbo_samples, log_prob_offset=offset, seed=args.seed,
    )
    result.update(split=args.split, refit_epochs=args.refit_epochs, dataset=config["data"]["name"], model=config["model"])
    title = f"{config['model']} on {config['data']['name']} {args.split}: where the gap log p(x) - ELBO comes from"
    return print_and_save(title, format_gap_table(result), result, args.json or Path(args.run_dir) / f"tighten-{args.split}.json")


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbox", description="Generative models trained by maximizing the ELBO.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model and write a run directory", description="Train a model.")
    p.add_argument("--model", choices=sorted(MODEL_CONFIG_FROM_ARGS), default="vae")
    p.add_argument("--data", choices=dataset_names(), default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help="directory with the dataset's IDX files (else $ELBOX_DATA, cache, system, download)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training set (default: vae 36, others 10)")
    p.add_argument("--out", default=None, help="run directory to create")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run from its last good checkpoint with the run's own settings (bit-exact on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (default: vae 3e-3, others 1e-3)")
    p.add_argument("--latent-dim", type=positive_int, default=None, help="vae, linear: latent dimensions (default: vae 32, linear 20)")
    p.add_argument("--hidden-dims", type=positive_int, nargs="+", default=[512], metavar="H",
                   help="hidden layer widths of encoder and decoder (decoder mirrored); '512' = one layer of 512")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="mlp")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    p.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default="bernoulli",
                   help="p(x|z); picks the data space: bernoulli=binary (dynamic binarization), "
                        "gaussian*=continuous (dequantized), discretized-logistic/categorical=8-bit")
    p.add_argument("--sigma", type=positive_float, default=0.1, help="standard deviation of the fixed-sigma gaussian likelihood")
    p.add_argument("--n-mixtures", type=positive_int, default=1, help="components of the discretized logistic mixture")
    p.add_argument("--beta", type=non_negative_float, default=1.0, help="KL weight of the elbo training objective (reports always use 1)")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default="constant")
    p.add_argument("--warmup-epochs", type=non_negative_float, default=0.0, help="epochs of linear beta warm-up")
    p.add_argument("--n-samples", type=positive_int, default=1, help="Monte Carlo samples of z per example while training")
    p.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                   help="training objective: elbo (beta-weighted, optional free bits) or iwae (IWAE-K; see --iw-samples, --estimator)")
    p.add_argument("--iw-samples", type=positive_int, default=1, metavar="K",
                   help="importance samples K per example of the iwae training objective (K=1: ELBO with a Monte Carlo KL)")
    p.add_argument("--estimator", choices=IWAE_ESTIMATORS, default="reparam",
                   help="gradient estimator of the iwae objective: reparam, stl (sticking the landing) or dreg (doubly reparameterized)")
    p.add_argument("--free-bits", type=non_negative_float, default=0.0, metavar="NATS",
                   help="floor in nats on the batch-mean KL of each latent group (the whole z for the VAE); elbo objective only")
    p.add_argument("--cycle-epochs", type=non_negative_float, default=0.0,
                   help="length in epochs of one cycle of the cyclical beta schedule (required with --beta-schedule cyclical)")
    p.add_argument("--cycle-ramp-fraction", type=positive_float, default=0.5,
                   help="fraction of each cycle over which beta rises from 0 to --beta (cyclical schedule)")
    p.add_argument("--grad-clip", type=non_negative_float, default=0.0, help="clip the gradient norm (0: off)")
    p.add_argument("--grad-skip-threshold", type=non_negative_float, default=0.0, metavar="NORM",
                   help="skip updates whose gradient norm exceeds this (counted and logged; 0: off)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="cosine: decay the learning rate to 0 over the run (default: vae cosine, others constant)")
    p.add_argument("--ema-decay", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999) for validation and the saved model; 0: off")
    p.add_argument("--max-nonfinite", type=positive_int, default=20, help="stop after this many non-finite steps in a row")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="bf16: autocast the training forward pass to bfloat16 (weights, optimizer state and reported "
                        "validation/evaluation bounds stay float32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward and backward (costs compilation time up front; "
                        "measured 0-14%% faster on 2 CPU cores, see benchmarks/README.md)")
    p.add_argument("--channels-last", action="store_true",
                   help="convolutional models: NHWC memory layout for weights and batches (on 2 CPU cores: 1.04-1.27x for the "
                        "conv HVAE, none for the diffusion U-Net; see benchmarks/README.md)")
    p.add_argument("--logger", choices=LOGGERS, default="jsonl",
                   help="training curves: metrics.jsonl (jsonl), plus TensorBoard events in RUN_DIR/tensorboard "
                        "(tensorboard), or neither (none; they stay in the checkpoint state)")
    p.add_argument("--hvae-type", choices=HVAE_TYPES, default="ladder", help="hvae: markov (bottom-up MLP chain) or ladder (top-down, convolutional)")
    p.add_argument("--levels", type=positive_int, default=3, metavar="T", help="hvae: number of latent levels")
    p.add_argument("--latent-dims", type=positive_int, nargs="+", default=None, metavar="D",
                   help="hvae markov: latent size per level, z_1 (next to x) first (default 32, 16, 8, ...)")
    p.add_argument("--channels", type=positive_int, default=64, help="hvae ladder: width of the residual state")
    p.add_argument("--latent-channels", type=positive_int, default=8, help="hvae ladder: channels of each level's latent map")
    p.add_argument("--blocks-per-level", type=positive_int, default=1,
                   help="hvae ladder: residual blocks per level and resolution; diffusion: U-Net blocks per resolution")
    p.add_argument("--level-downsample", type=positive_int, nargs="+", default=None, metavar="F",
                   help="hvae ladder: per level, top first, image size / latent map size (default: top half 4, rest 2)")
    p.add_argument("--posterior", choices=POSTERIORS, default="residual",
                   help="hvae ladder: residual (NVAE) or precision-weighted (LVAE) posterior")
    p.add_argument("--timesteps", type=non_negative_int, default=0, metavar="T",
                   help="diffusion: number of steps T of the discrete-time model; 0 = continuous time (default)")
    p.add_argument("--schedule", choices=SCHEDULES, default="learned-linear", help="diffusion: noise schedule gamma(t) = -log SNR(t)")
    p.add_argument("--gamma-min", type=float, default=-13.3, help="diffusion: gamma(0) (initial value when learned)")
    p.add_argument("--gamma-max", type=float, default=5.0, help="diffusion: gamma(1) (initial value when learned)")
    p.add_argument("--parameterization", choices=PARAMETERIZATIONS, default="eps",
                   help="diffusion: what the denoiser predicts, the noise (eps), the data (x0) or the score")
    p.add_argument("--diffusion-loss", choices=DIFFUSION_LOSSES, default="elbo",
                   help="diffusion: train on the ELBO or on the simple unweighted noise-prediction loss (reports are always the ELBO)")
    p.add_argument("--unet-channels", type=positive_int, nargs="+", default=[16, 32, 64], metavar="C",
                   help="diffusion: U-Net width per resolution level (each further level halves the image)")
    p.add_argument("--no-fourier-features", action="store_true", help="diffusion: do not feed Fourier features of z_t to the U-Net")
    p.add_argument("--noise", choices=("isotropic", "diagonal"), default="isotropic",
                   help="linear: observation noise, isotropic (probabilistic PCA) or diagonal (factor analysis)")
    p.add_argument("--encoder", choices=("exact", "amortized"), default="amortized",
                   help="linear: q(z|x) is the exact posterior or an amortized diagonal Gaussian")
    p.add_argument("--fit", choices=("closed-form", "elbo"), default="closed-form",
                   help="linear: maximum likelihood in closed form (EM for factor analysis) or gradient ascent on the ELBO")
    p.add_argument("--covariance", choices=("full", "diag"), default="full", help="gaussian, mixture: covariance structure")
    p.add_argument("--ridge", type=non_negative_float, default=1e-3, help="gaussian: added to the covariance diagonal")
    p.add_argument("--components", type=positive_int, default=10, help="mixture: number of components")
    p.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++", help="mixture: EM initialization")
    p.add_argument("--max-iter", type=positive_int, default=100, help="mixture: EM iterations at most")
    p.add_argument("--tol", type=non_negative_float, default=1e-4,
                   help="mixture: stop when the mean ELBO improves by less than this many nats per example")
    p.add_argument("--covariance-floor", type=non_negative_float, default=1e-3,
                   help="mixture: added to each covariance diagonal (full) or floor on the variances (diag)")
    p.add_argument("--limit-train", type=positive_int, default=None, help="use only the first N training images")
    add_common(p)
    p.set_defaults(func=cmd_train, train_parser=p)

    p = sub.add_parser("evaluate", help="bounds, NLL, bits/dim and active units on a split",
                       description="Evaluate a trained run: ELBO terms, IWAE-K NLL, bits/dim, active units.")
    p.add_argument("run_dir")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--iw-samples", type=positive_int, nargs="+", default=[1, 10, 100, 1000], metavar="K",
                   help="importance samples K for the NLL, one or several (one stream of max K samples serves "
                        "all); use 5000 to compare with IWAE/VampPrior tables (default: 1 10 100 1000)")
    p.add_argument("--elbo-samples", type=positive_int, default=1, help="Monte Carlo samples per example for the ELBO terms")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N", help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the test-set binarization/dequantization and of the samples")
    p.add_argument("--json", default=None, metavar="FILE", help="where to write the JSON result (default RUN_DIR/eval-SPLIT.json)")
    add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="a grid of samples from the prior", description="Write a PNG grid of prior samples.")
    p.add_argument("run_dir")
    p.add_argument("--n", type=positive_int, default=64)
    p.add_argument("--out", default=None, metavar="FILE.png", help="default RUN_DIR/samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=positive_float, nargs="+", default=[1.0], metavar="T",
                   help="scale of the prior's standard deviation: one value, or one per level in the order z1, z2, ... (hvae)")
    p.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing its mean")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="diffusion: ancestral sampling steps (default: the model's T, or 256 in continuous time)")
    add_common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("score", help="per-image log-likelihood estimates of your images, as CSV",
                       description="Score images (a .npy or .npz file, or a folder of PNGs) under a trained model: "
                                   "exact log p(x) where the model has it, else IWAE-K, else the ELBO; one CSV row per image.")
    add_input_options(p)
    p.add_argument("--out", default=None, metavar="FILE.csv", help="default RUN_DIR/scores.csv")
    p.add_argument("--iw-samples", type=positive_int, default=1000, metavar="K", help="importance samples for IWAE-K (default 1000)")
    p.add_argument("--elbo-samples", type=positive_int, default=8,
                   help="models scored by their ELBO (diffusion): Monte Carlo samples per image (default 8)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("encode", help="posterior means and variances of your images, as features in an .npz",
                       description="Encode images (a .npy or .npz file, or a folder of PNGs): writes an .npz with "
                                   "'mean' [N, d], 'variance' [N, d] (models that have it) and 'names'.")
    add_input_options(p)
    p.add_argument("--out", required=True, metavar="FILE.npz")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("report", help="an HTML page (and Markdown) with curves, the evaluation and image grids",
                       description="Write RUN_DIR/report.html, self-contained, and RUN_DIR/report.md: training curves, the "
                                   "evaluation table (eval-test.json, or a quick evaluation), samples, reconstructions, "
                                   "latent interpolations and, for 2-D latents, a scatter of test encodings.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, metavar="FILE.html", help="default RUN_DIR/report.html (the .md goes beside it)")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reconstruct", help="a grid of test images and their reconstructions",
                       description="Write a PNG grid: rows of test images, each followed by its reconstructions.")
    p.add_argument("run_dir")
    p.add_argument("--n", type=positive_int, default=32)
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--out", default=None, metavar="FILE.png", help="default RUN_DIR/reconstructions.png")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_reconstruct)
    p = sub.add_parser(
        "tighten", help="split the inference gap into approximation and amortization parts",
        description="With the decoder fixed, refit the amortized encoder and optimize q per example; report "
                    "log p(x) - ELBO split into the approximation gap (best diagonal Gaussian q vs the true "
                    "posterior) and the amortization gap (encoder vs best per-example q), Cremer et al. 2018.",
    )
    p.add_argument("run_dir")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--limit", type=positive_int, default=200, metavar="N", help="examples to optimize (default 200)")
    p.add_argument("--steps", type=positive_int, default=300, help="Adam steps of the per-example optimization")
    p.add_argument("--lr", type=positive_float, default=0.05, help="learning rate of the per-example optimization")
    p.add_argument("--refit-epochs", type=non_negative_int, default=3, help="epochs to refit the encoder on the training split (0: skip)")
    p.add_argument("--iw-samples", type=positive_int, default=1000, metavar="K", help="IWAE-K estimate of log p(x) where it is not exact")
    p.add_argument("--elbo-samples", type=positive_int, default=100, help="Monte Carlo samples per ELBO estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="default RUN_DIR/tighten-SPLIT.json")
    add_common(p)
    p.set_defaults(func=cmd_tighten)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory_in_heap()
    set_threads(args.threads)
    try:
        return args.func(args)
    except ElboxError as e:
        print(f"elbox: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elbox: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
