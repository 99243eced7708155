"""Command-line tool: elbox train | evaluate | score | encode | report | sample | reconstruct | tighten | ood.

It parses, calls the public API (elbox.fit, resume, evaluate, elbox.evaluation.inference, elbox.evaluation.tighten) and
prints. The options of `elbox train` are generated from the config dataclasses (elbox.core.options): `elbox train MODEL
--help` lists exactly that model's. Every error is one line on stderr ("elbox: error: ...") and a non-zero exit code.
Modules that import torch load only when a command runs (elbox.cli.types.lazy): `elbox --help` and `--version` start
at once.
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
from elbox.cli.command_options import COMMANDS
from elbox.cli.session import TRAINING_RUN, given_options, interrupted, replayed_threads, show_warning
from elbox.cli.types import Parser, UsageError, count, lazy, output_file, report_file
from elbox.core.errors import ElboxError, shown
from elbox.core.options import add_options, did_you_mean, option_specs, option_values

# the working parts of train, imported when it runs (they import torch); the other commands are elbox.cli.commands
read_json = lazy("elbox.io.checkpoint", "read_json")
keep_freed_memory_in_heap, set_threads = (
    lazy("elbox.core.system", "keep_freed_memory_in_heap"),
    lazy("elbox.core.system", "set_threads"),
)
run_settings = lazy("elbox.training.workflows", "run_settings")

DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_MODEL = "vae"
# options that --resume may be given with; every other one comes from the run's config.json
RESUME_OPTIONS = {"device", "no_progress", "threads", "resume"}


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to run (default: auto = cuda, mps, else cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.add_argument(
        "--threads",
        type=count("threads"),
        default=None,
        metavar="N",
        help="CPU threads for PyTorch (default: $OMP_NUM_THREADS, else every usable core shared among "
        "the processes on this machine)",
    )


# -- train -------------------------------------------------------------------------------------------------------


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv (--flag VALUE or --flag=VALUE), or None."""
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def train_parser(
    model: str | None, saved: dict, argv: Sequence[str] = ()
) -> tuple[argparse.ArgumentParser, list, list]:
    """The parser of `elbox train [MODEL]`: run, data and training options, and MODEL's own options. The training
    defaults may depend on the model's options (an HVAE's type), read from `argv` and `saved` before parsing."""
    from elbox.io.run_config import DataConfig, TrainConfig, train_defaults
    from elbox.models import MODELS

    name = model or DEFAULT_MODEL
    p = Parser(
        prog=f"elbox train{' ' + model if model else ''}",
        description=f"Train a model{' (' + model + ')' if model else ''}.",
        epilog=None
        if model
        else f"models: {', '.join(sorted(MODELS))}; `elbox train MODEL --help` lists a model's options",
    )
    p.add_argument("model", nargs="?", choices=sorted(MODELS), default=name, help=argparse.SUPPRESS)
    p.add_argument(
        "--model", dest="model_flag", choices=sorted(MODELS), default=None, help=f"the model (default: {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--config", default=None, metavar="FILE", help="start from a run's config.json (options given override it)"
    )
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run directory to create (required for a new run)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its last good checkpoint with the run's own settings (bit-exact on CPU)",
    )
    add_common(p)
    taken: set[str] = set()
    general = add_options(p.add_argument_group("data"), DataConfig, saved, taken)
    model_cls = MODELS[name]
    config_fields = {f.name for c in model_cls.config_classes() for f in dataclasses.fields(c)}
    chosen = {k: saved[k] for k in config_fields if k in saved}
    chosen.update({k: v for k in config_fields if (v := flag_value(argv, "--" + k.replace("_", "-"))) is not None})
    config_class = model_cls.config_class_for(chosen)
    check_variant_flags(model_cls, config_class, argv)
    general += add_options(
        p.add_argument_group("training"), TrainConfig, {**train_defaults(name, chosen), **saved}, taken
    )
    own = add_options(p.add_argument_group(f"{name} model"), config_class, saved, taken) if model else []
    return p, general, own


def check_variant_flags(model_cls: type, config_class: type, argv: Sequence[str]) -> None:
    """ElboxError for an option of another variant of the model (--channels for the markov hvae), which the chosen
    variant's parser would call unrecognized."""
    own = {spec.flag for spec in option_specs(config_class) if spec.cli}
    for token in argv:
        flag = token.split("=", 1)[0]
        name = flag.removeprefix("--").replace("-", "_")
        if flag.startswith("--") and flag not in own and (home := model_cls.variants_with(name)):
            variant_flag = "--" + home.split()[0].replace("_", "-")
            raise ElboxError(
                f"{flag} is an option of {home}, not of this {model_cls.name} ({config_class.__name__}); "
                f"set {variant_flag} or drop {flag}"
            )


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
        raise ElboxError(
            f"unknown model {shown(repr(model), 60)}; {did_you_mean(model, MODELS)}choose one of "
            f"{', '.join(sorted(MODELS))}"
        )
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
        changes = {"epochs", "checkpoint_minutes"} & given_options(parser, argv)  # what a resume may change
        given = sorted(
            k for k, v in vars(args).items() if k not in RESUME_OPTIONS | changes and v != parser.get_default(k)
        )
        if given:
            raise ElboxError(
                f"--resume takes every setting from the run's config.json (only --epochs N extends it, and "
                f"--checkpoint-minutes M may change); drop {', '.join('--' + k.replace('_', '-') for k in given)}"
            )
        run = elbox.resume(
            args.resume,
            device=args.device,
            progress=not args.no_progress,
            **{k: getattr(args, k) for k in changes},
        )
    else:
        if args.out is None:
            raise ElboxError("give --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
        options = {**option_values(args, general), **option_values(args, own)}
        run = elbox.fit(
            args.model,
            options.pop("data"),
            validation=options.pop("validation"),
            out=args.out,
            device=args.device,
            progress=not args.no_progress,
            **options,
        )
    last = next((r for r in reversed(run.history) if r.get("kind") == "epoch"), {})
    value = {k: v for k, v in last.items() if k in ("val_elbo", "val_log_likelihood")}
    if os.environ.get("RANK", "0") == "0":  # torchrun: process 0 speaks
        print(
            f"elbox: trained {run.model.name} for {last.get('epoch', 0)} epoch(s); "
            + "".join(
                f"{k.removeprefix('val_').replace('_', '-')} on validation {v:.2f} nats per example; "
                for k, v in value.items()
            )
            + f"run dir {run.directory}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="elbox", description="Generative models trained by maximizing the ELBO.")
    parser.add_argument("--version", action="version", version=f"elbox {elbox.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("train", help="train a model and write a run directory (elbox train MODEL --help)", add_help=False)
    for name, (func, help_text, options) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("run_dir")
        add_options(p, options, files={"output": output_file, "report": report_file})
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
