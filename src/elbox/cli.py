"""Command-line tool: elbox train | evaluate | score | encode | report | sample | reconstruct | tighten | ood.

It parses, calls the public API (elbox.fit, resume, evaluate, elbox.inference, elbox.tighten) and prints. The
options of `elbox train` are generated from the config dataclasses (elbox.options): `elbox train MODEL --help`
lists exactly that model's. Every error is one line on stderr ("elbox: error: ...") and a non-zero exit code.
Modules that import torch load only when a command runs (cli_types.lazy): `elbox --help` and `--version` start at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import elbox
from elbox.atomic import shown
from elbox.cli_commands import (
    cmd_encode,
    cmd_evaluate,
    cmd_ood,
    cmd_reconstruct,
    cmd_report,
    cmd_sample,
    cmd_score,
    cmd_tighten,
)
from elbox.cli_session import TRAINING_RUN, given_options, interrupted, replayed_threads, show_warning
from elbox.cli_types import Parser, UsageError, count, integer, lazy, output_file, real, report_file
from elbox.errors import ElboxError
from elbox.limits import ANOMALY_METHODS, OOD_BINARIZATIONS, OOD_IW_SAMPLES, TEMPERATURE
from elbox.options import add_options, did_you_mean, option_values

# the working parts of train, imported when it runs (they import torch); the other commands are elbox.cli_commands
read_json = lazy("elbox.checkpoint", "read_json")
keep_freed_memory_in_heap, set_threads = lazy("elbox.system", "keep_freed_memory_in_heap"), lazy("elbox.system", "set_threads")
run_settings = lazy("elbox.training.workflows", "run_settings")

SPLITS = ("train", "validation", "train-full", "test")  # elbox.data.SPLITS, without importing torch (a test compares)
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_MODEL = "vae"
# options that --resume may be given with; every other one comes from the run's config.json
RESUME_OPTIONS = {"device", "no_progress", "threads", "resume"}



def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run (default: auto = cuda, mps, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument("--threads", type=count("threads"), default=None, metavar="N",
                   help="CPU threads for PyTorch (default: $OMP_NUM_THREADS, else every usable core shared among "
                        "the processes on this machine)")


# -- train -------------------------------------------------------------------------------------------------------


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv (--flag VALUE or --flag=VALUE), or None."""
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def train_parser(model: str | None, saved: dict, argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, list, list]:
    """The parser of `elbox train [MODEL]`: run, data and training options, and MODEL's own options. The training
    defaults may depend on the model's options (an HVAE's type), read from `argv` and `saved` before parsing."""
    from elbox.models import MODELS
    from elbox.training.config import DataConfig, TrainConfig, train_defaults

    name = model or DEFAULT_MODEL
    p = Parser(
        prog=f"elbox train{' ' + model if model else ''}", description=f"Train a model{' (' + model + ')' if model else ''}.",
        epilog=None if model else f"models: {', '.join(sorted(MODELS))}; `elbox train MODEL --help` lists a model's options")
    p.add_argument("model", nargs="?", choices=sorted(MODELS), default=name, help=argparse.SUPPRESS)
    p.add_argument("--model", dest="model_flag", choices=sorted(MODELS), default=None, help=f"the model (default: {DEFAULT_MODEL})")
    p.add_argument("--config", default=None, metavar="FILE", help="start from a run's config.json (options given override it)")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory to create (required for a new run)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run from its last good checkpoint with the run's own settings (bit-exact on CPU)")
    add_common(p)
    taken: set[str] = set()
    general = add_options(p.add_argument_group("data"), DataConfig, saved, taken)
    config_fields = [f.name for f in dataclasses.fields(MODELS[name].config_class)]
    chosen = {k: saved[k] for k in config_fields if k in saved}
    chosen.update({k: v for k in config_fields if (v := flag_value(argv, "--" + k.replace("_", "-"))) is not None})
    general += add_options(p.add_argument_group("training"), TrainConfig, {**train_defaults(name, chosen), **saved}, taken)
    own = add_options(p.add_argument_group(f"{name} model"), MODELS[name].config_class, saved, taken) if model else []
    return p, general, own


def cmd_train(argv: list[str]) -> int:
    from elbox.models import MODELS

    TRAINING_RUN.clear()  # set once the arguments are parsed: what Ctrl-C reports on
    keep_freed_memory_in_heap()
    model = argv[0] if argv and not argv[0].startswith("-") else flag_value(argv, "--model")
    config_path = flag_value(argv, "--config")
    saved = run_settings(config_path) if config_path else {}
    if saved and model not in (None, saved["model"]):
        raise ElboxError(f"--config {config_path} is a {saved['model']} run; it cannot configure a {model} model")
    model = model or saved.get("model")
    if model is not None and model not in MODELS:
        raise ElboxError(f"unknown model {shown(repr(model), 60)}; {did_you_mean(model, MODELS)}choose one of {', '.join(sorted(MODELS))}")
    if model is None and flag_value(argv, "--resume") is None and not {"-h", "--help"} & set(argv):
        model = DEFAULT_MODEL
    parser, general, own = train_parser(model, saved, argv)
    args = parser.parse_args(argv)
    if args.model_flag not in (None, args.model):
        raise ElboxError(f"two models given: {args.model} and --model {args.model_flag}")
    TRAINING_RUN[:] = [args.resume or args.out] if args.resume or args.out else []
    replayed = args.resume and Path(args.resume, "config.json") or config_path
    set_threads(args.threads or (replayed_threads(read_json(replayed, "run config")) if replayed else None))

    if args.resume:
        extend = "epochs" in given_options(parser, argv)
        given = sorted(k for k, v in vars(args).items() if k not in RESUME_OPTIONS and v != parser.get_default(k)
                       and not (k == "epochs" and extend))
        if given:
            raise ElboxError(f"--resume takes every setting from the run's config.json (only --epochs N extends it); "
                             f"drop {', '.join('--' + k.replace('_', '-') for k in given)}")
        run = elbox.resume(args.resume, device=args.device, progress=not args.no_progress,
                           epochs=args.epochs if extend else None)
    else:
        if args.out is None:
            raise ElboxError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
        options = {**option_values(args, general), **option_values(args, own)}
        run = elbox.fit(args.model, options.pop("data"), validation=options.pop("validation"), out=args.out,
                        device=args.device, progress=not args.no_progress, **options)
    last = next((r for r in reversed(run.history) if r.get("kind") == "epoch"), {})
    value = {k: v for k, v in last.items() if k in ("val_elbo", "val_log_likelihood")}
    if os.environ.get("RANK", "0") == "0":  # torchrun: process 0 speaks
        print(f"elbox: trained {run.model.name} for {last.get('epoch', 0)} epoch(s); "
              + "".join(f"{k.removeprefix('val_').replace('_', '-')} on validation {v:.2f} nats per example; " for k, v in value.items())
              + f"run dir {run.directory}")
    return 0


# -- the other commands ------------------------------------------------------------------------------------------


INPUT = ("--input", dict(required=True, metavar="FILE|DIR", help=".npy, .npz (array 'x', 'images' or the only one), a "
                         "folder of images, one image file, or for a model of vectors a .csv/.parquet table (its columns "
                         "taken by the names the run was trained on)"))
ID_COLUMN = ("--id-column", dict(default=None, metavar="NAME", help="a table's column whose values name the rows in the "
                                 "output (default: row numbers)"))
SEED = ("--seed", dict(type=count("seed"), default=0, help="seed of binarization/dequantization and of any sampling (default: 0)"))
BATCH = ("--batch-size", dict(type=count("batch_size"), default=500, help="examples per pass (default: 500)"))
SPLIT = ("--split", dict(choices=SPLITS, default="test", help="the split of the run's dataset (default: test; a run on "
                         "your own data: its validation examples)"))
IW = ("--iw-samples", dict(type=count("iw_samples"), default=1000, metavar="K", help="importance samples for IWAE-K (default: 1000)"))
LLR_K = ("--llr-k", dict(type=integer(0, 100), default=1, metavar="K", help="llr: latent levels next to x drawn from "
                         "their prior in LLR^{>K} (default: 1, Havtorn et al. 2021)"))
REGRET_STEPS = ("--regret-steps", dict(type=count("regret_steps"), default=100, help="regret: Adam steps of each "
                                       "example's refit of q (default: 100)"))
BACKGROUND = ("--background", dict(default=None, metavar="RUN_DIR", help="background: a run trained on perturbed data "
                                   "(elbox train ... --perturb 0.2)"))
REFERENCE = ("--reference", dict(default="validation", metavar="SPLIT|PATH", help="data you trust as normal: they set "
                                 "the p-values and the typicality's entropy (default: the run's validation split)"))
COMMANDS = {  # name: (function, help, options); every command with an output file also takes --overwrite
    "evaluate": (cmd_evaluate, "bounds, NLL, bits/dim and active units on a split", [
        SPLIT, ("--data", dict(default=None, metavar="NAME|PATH", help="other data in the run's data space: a built-in "
                               "dataset (its --split) or a path (default: the run's own test split, or its validation data)")),
        ("--iw-samples", dict(type=count("iw_samples"), nargs="+", default=[1, 10, 100, 1000], metavar="K",
                help="importance samples K, one or several (one stream of max K samples serves all); 5000 compares "
                     "with IWAE/VampPrior tables (default: 1 10 100 1000)")),
        ("--elbo-samples", dict(type=count("elbo_samples"), default=1, help="Monte Carlo samples per example for the ELBO (default: 1)")),
        ("--limit", dict(type=count("limit"), default=None, metavar="N", help="evaluate the first N examples only (default: all)")),
        ("--weights", dict(choices=("last", "best"), default=None, help="the last epoch's weights, or the best on "
                           "validation (best.safetensors) (default: best for a run trained with early stopping, else last)")),
        BATCH, SEED, ("--json", dict(type=output_file, default=None, metavar="FILE", help="where to write the JSON result (default: RUN_DIR/eval-SPLIT.json)"))]),
    "sample": (cmd_sample, "a PNG grid of samples from the prior", [
        ("--n", dict(type=count("n"), default=64, help="how many samples (default: 64)")),
        ("--out", dict(type=output_file, default=None, metavar="FILE.png", help="where to write the grid (default: "
                       "RUN_DIR/samples.png; for a model of a table, the samples as CSV rows: RUN_DIR/samples.csv)")), SEED,
        ("--temperature", dict(type=real(*TEMPERATURE), nargs="+", default=[1.0], metavar="T",
         help="scale of the prior's standard deviation: one value, or one per level z1, z2, ... (hvae) (default: 1)")),
        ("--draw", dict(action="store_true", help="draw x ~ p(x|z) instead of showing its mean")),
        ("--steps", dict(type=count("steps"), default=None, help="diffusion: sampling steps (default: T, or 256 in continuous time)"))]),
    "score": (cmd_score, "per-example log-likelihood estimates of your images or table rows, as CSV", [
        INPUT, ID_COLUMN, BATCH, SEED, ("--out", dict(type=output_file, default=None, metavar="FILE.csv", help="where to write the scores (default: RUN_DIR/scores.csv)")), IW,
        ("--elbo-samples", dict(type=count("elbo_samples"), default=8, help="models scored by their ELBO (diffusion): samples per image (default: 8)")),
        ("--method", dict(choices=ANOMALY_METHODS, nargs="+", action="extend", default=None, metavar="NAME", help="add anomaly scores and "
                          f"their p-values as columns: {', '.join(ANOMALY_METHODS)} (docs/ood.md)")),
        REFERENCE, ("--reference-limit", dict(type=count("limit"), default=1000, metavar="N", help="--method: the "
                    "first N reference examples, scored as your input (default: 1000)")), LLR_K, REGRET_STEPS, BACKGROUND]),
    "encode": (cmd_encode, "posterior means and variances of your images or table rows, as features in an .npz", [
        INPUT, ID_COLUMN, BATCH, SEED, ("--out", dict(type=output_file, required=True, metavar="FILE.npz", help="where to write the features"))]),
    "report": (cmd_report, "an HTML page (and Markdown) with curves, the evaluation and image grids", [
        ("--out", dict(type=report_file, default=None, metavar="FILE.html", help="where to write the page, the .md beside it (default: RUN_DIR/report.html)")), SEED]),
    "reconstruct": (cmd_reconstruct, "a grid of test images and their reconstructions", [
        ("--n", dict(type=count("n"), default=32, help="how many images (default: 32)")), SPLIT,
        ("--out", dict(type=output_file, default=None, metavar="FILE.png", help="where to write the grid (default: RUN_DIR/reconstructions.png)")), SEED]),
    "tighten": (cmd_tighten, "split the inference gap into approximation and amortization parts (Cremer et al. 2018)", [
        SPLIT, ("--limit", dict(type=integer(1, 10_000), default=200, metavar="N", help="examples to optimize (default: 200)")),
        ("--steps", dict(type=count("steps"), default=300, help="Adam steps of the per-example optimization (default: 300)")),
        ("--lr", dict(type=real(0, 10), default=0.05, help="learning rate of the per-example optimization (default: 0.05)")),
        ("--refit-epochs", dict(type=integer(0, 1000), default=3,
         help="epochs to refit the encoder on the training split, 0: skip (default: 3)")), IW,
        ("--elbo-samples", dict(type=count("elbo_samples"), default=100, help="Monte Carlo samples per ELBO estimate (default: 100)")), SEED,
        ("--json", dict(type=output_file, default=None, metavar="FILE", help="where to write the JSON result (default: RUN_DIR/tighten-SPLIT.json)"))]),
    "ood": (cmd_ood, "out-of-distribution detection: AUROC, AUPRC and FPR of every anomaly score, outliers against inliers", [
        ("--outliers", dict(required=True, metavar="PATH", help="the unusual data, as --input of score takes them")),
        ("--inliers", dict(default="test", metavar="SPLIT|PATH", help="normal data to tell them from (default: the run's test split)")),
        REFERENCE, ("--methods", dict(choices=ANOMALY_METHODS, nargs="+", action="extend", default=None, metavar="NAME",
                    help=f"scores to compare, of {', '.join(ANOMALY_METHODS)} (default: every one that applies)")),
        ("--iw-samples", dict(type=count("iw_samples"), default=OOD_IW_SAMPLES, metavar="K", help=f"importance samples of log p(x) and of LLR's bounds (default: {OOD_IW_SAMPLES})")),
        LLR_K, REGRET_STEPS, BACKGROUND,
        ("--binarizations", dict(type=count("binarizations"), default=OOD_BINARIZATIONS, help=f"binary models: binarizations of each grey image (default: {OOD_BINARIZATIONS})")),
        ("--limit", dict(type=count("limit"), default=None, metavar="N", help="the first N examples of each set (default: all)")),
        ("--bootstrap", dict(type=count("bootstrap"), default=200, help="resamples for the standard errors (default: 200)")),
        BATCH, SEED, ("--json", dict(type=output_file, default=None, metavar="FILE.json", help="where to write the result (default: RUN_DIR/ood.json; the histograms beside it as .png)")),
        ("--figure", dict(type=output_file, default=None, metavar="FILE.png", help="where to draw the histograms (default: beside the JSON)"))]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="elbox", description="Generative models trained by maximizing the ELBO.")
    parser.add_argument("--version", action="version", version=f"elbox {elbox.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train a model and write a run directory (elbox train MODEL --help)", add_help=False)
    for name, (func, help_text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("run_dir")
        for flag, kwargs in options:
            p.add_argument(flag, **kwargs)
        p.add_argument("--overwrite", action="store_true", help="replace an output file that elbox did not write")
        add_common(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings():  # restores Python's warning display when done (main may run in a Python process)
        warnings.showwarning = show_warning
        return run_command(argv)


def run_command(argv: list[str]) -> int:
    """main() once warnings print as one line: run the command, and turn its errors into one line and an exit code."""
    try:
        if argv and argv[0] == "train":
            return cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        keep_freed_memory_in_heap()
        set_threads(args.threads)
        return args.func(args)
    except ElboxError as e:  # raised in a DataLoader worker, the message carries the worker's traceback: keep its end
        print(f"elbox: error: {shown(' '.join(str(e).rsplit('ElboxError: ', 1)[-1].split()), 500)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except OSError as e:  # a file the commands did not check (each write is checked): still one line
        print(f"elbox: error: {shown(e.filename) + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted(argv), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
