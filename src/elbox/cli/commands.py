"""The commands of elbox that use a trained model: evaluate, sample, score, encode, report, reconstruct, tighten, ood.
Each parses nothing (elbox.cli builds their options), checks its output file before any work, calls the public API and
prints. Their working parts are imported when a command runs (they import torch)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import elbox
from elbox.cli.types import lazy
from elbox.core.errors import ElboxError, shown
from elbox.io.atomic import WRITTEN_BY, atomic_write_bytes, atomic_write_json, check_replaceable

load_run, read_run_config = lazy("elbox.io.checkpoint", "load_run"), lazy("elbox.io.checkpoint", "read_run_config")
format_table = lazy("elbox.evaluation.tables", "format_table")
encode, sample, score_with_stderr, reconstruction_grid, save_features, write_scores_csv, write_samples_csv = (
    lazy("elbox.evaluation.inference", name)
    for name in (
        "encode",
        "sample",
        "score_with_stderr",
        "reconstruction_grid",
        "save_features",
        "write_scores_csv",
        "write_samples_csv",
    )
)
save_image_grid = lazy("elbox.io.plots", "save_image_grid")
write_report = lazy("elbox.present.report", "write_report")
resolve_device = lazy("elbox.core.system", "resolve_device")
format_gap_table, tighten_run = (
    lazy("elbox.evaluation.tighten", "format_gap_table"),
    lazy("elbox.evaluation.tighten", "tighten_run"),
)
ood, anomaly_scores, format_ood_table, ood_figure_png = (
    lazy("elbox.evaluation.detection", name) for name in ("ood", "anomaly_scores", "format_ood_table", "ood_figure_png")
)
data_in_space, evaluation_split, own_data = (
    lazy("elbox.evaluation.runs", name) for name in ("data_in_space", "evaluation_split", "own_data")
)


def output(given: Path | None, default: Path, args: argparse.Namespace) -> Path:
    """A command's output file: the one named (--out, --json), else `default` in the run directory. Checked before any
    work: it must end like the default (elbox writes that format, and knows its own files by it), and a file elbox
    did not write is refused unless --overwrite is given."""
    path = Path(given or default)
    if path.suffix.lower() != default.suffix:
        raise ElboxError(
            f"cannot write {shown(path)}: this output is a {default.suffix} file; name it FILE{default.suffix}"
        )
    return check_replaceable(path, args.overwrite)


def print_and_save(title: str, table: str, result: dict, json_path: Path) -> int:
    """Print a result table and write the result as JSON (atomically), marked as elbox's (elbox.io.atomic)."""
    print(title)
    print(table)
    atomic_write_json(json_path, {**result, "written_by": WRITTEN_BY})
    print(f"wrote {json_path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    split = evaluation_split(read_run_config(args.run_dir)["data"], args.data, args.split)
    suffix = "-best" if args.weights == "best" else "-last" if args.weights == "last" else ""  # default: no suffix
    json_path = output(args.json, Path(args.run_dir) / f"eval-{split}{suffix}.json", args)
    result = elbox.evaluate(
        args.run_dir,
        args.data,
        split=args.split,
        iw_samples=args.iw_samples,
        elbo_samples=args.elbo_samples,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        weights=args.weights,
        compile=args.compile,
    )
    title = f"{result['model']} on {result['dataset']} ({result['split']}) [{result['data_space']}]"
    return print_and_save(title, format_table(result), result, json_path)


def cmd_sample(args: argparse.Namespace) -> int:
    vectors = read_run_config(args.run_dir)["data"]["space"] == "real"  # samples of a table: CSV rows in its units
    out = output(args.out, Path(args.run_dir) / ("samples.csv" if vectors else "samples.png"), args)
    model, _ = load_run(args.run_dir, resolve_device(args.device))
    samples = sample(
        model,
        args.n,
        temperature=args.temperature,
        draw=args.draw,
        steps=args.steps,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if vectors:
        write_samples_csv(out, samples, model.preprocessing.column_names)
    else:
        save_image_grid(samples, out)
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    out = output(args.out, Path(args.run_dir) / "scores.csv", args)
    model, _ = load_run(args.run_dir, resolve_device(args.device))
    values, stderr, names, estimate = score_with_stderr(
        model,
        args.input,
        iw_samples=args.iw_samples,
        elbo_samples=args.elbo_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        id_column=args.id_column,
    )
    num_dims = (
        None if model.preprocessing.space.name == "real" else math.prod(model.config.data_shape)
    )  # bits: 8-bit data
    extra, flagged = {}, ""
    if args.method:
        methods = list(dict.fromkeys(args.method))  # each once, in the order given
        scores, p_values, _ = anomaly_scores(
            args.run_dir,
            args.input,
            methods,
            reference=args.reference,
            background=args.background,
            iw_samples=args.iw_samples,
            elbo_samples=args.elbo_samples,
            llr_k=args.llr_k,
            regret_steps=args.regret_steps,
            batch_size=args.batch_size,
            reference_limit=args.reference_limit,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
            id_column=args.id_column,
            log_likelihood=values,
        )
        for method in methods:
            extra[f"anomaly_{method}"], extra[f"p_value_{method}"] = scores[method], p_values[method]
        flagged = "; p-value < 0.01: " + ", ".join(f"{m} {int((p_values[m] < 0.01).sum())}" for m in methods)
    write_scores_csv(out, names, values, num_dims, estimate, stderr, extra)
    mean = values.mean().item()
    bits = f" ({-mean / (num_dims * math.log(2)):.4f} bits/dim)" if num_dims else ""
    print(f"scored {len(names)} examples: mean log-likelihood {mean:.3f} nats{bits}, {estimate}{flagged}; wrote {out}")
    return 0


def cmd_ood(args: argparse.Namespace) -> int:
    json_path = output(args.json, Path(args.run_dir) / "ood.json", args)
    figure_path = output(args.figure, json_path.with_suffix(".png"), args)
    result = ood(
        args.run_dir,
        args.outliers,
        inliers=args.inliers,
        reference=args.reference,
        methods=args.methods,
        background=args.background,
        iw_samples=args.iw_samples,
        llr_k=args.llr_k,
        regret_steps=args.regret_steps,
        binarizations=args.binarizations,
        limit=args.limit,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    atomic_write_bytes(figure_path, ood_figure_png(result))
    sets = result["sets"]
    title = (
        f"{result['model']}: out-of-distribution detection, outliers {sets['outliers']['data']} "
        f"({sets['outliers']['n']}) against inliers {sets['inliers']['data']} ({sets['inliers']['n']}); "
        f"reference {sets['reference']['data']} ({sets['reference']['n']}); mean ± bootstrap s.e."
    )
    print(f"wrote {figure_path}")
    return print_and_save(title, format_ood_table(result), result, json_path)


def cmd_encode(args: argparse.Namespace) -> int:
    out = output(args.out, Path("features.npz"), args)
    model, _ = load_run(args.run_dir, resolve_device(args.device))
    features, names = encode(model, args.input, batch_size=args.batch_size, seed=args.seed, id_column=args.id_column)
    save_features(out, features, names)
    print(f"encoded {len(names)} examples: {', '.join(f'{k} {v.shape}' for k, v in features.items())}; wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    html_path = output(args.out, Path(args.run_dir) / "report.html", args)
    output(html_path.with_suffix(".md"), html_path.with_suffix(".md"), args)
    html_path, md_path = write_report(args.run_dir, resolve_device(args.device), html_path, args.seed, args.overwrite)
    print(f"wrote {html_path} and {md_path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out = output(args.out, Path(args.run_dir) / "reconstructions.png", args)
    model, config = load_run(args.run_dir, resolve_device(args.device))
    data, data_dir, _ = own_data(config, args.split, args.seed)
    x, _, _ = data_in_space(model, data, args.split, data_dir, args.seed, args.n)
    if x.dim() != 4:
        raise ElboxError(f"the {model.name} model's run holds vectors, not images: a reconstruction grid shows images")
    grid = reconstruction_grid(model, x)  # rows alternate: inputs, reconstructions
    print(f"wrote {save_image_grid(grid, out, nrow=8, row_labels=('input', 'reconstruction'))}")
    return 0


def cmd_tighten(args: argparse.Namespace) -> int:
    split = evaluation_split(read_run_config(args.run_dir)["data"], None, args.split)
    json_path = output(args.json, Path(args.run_dir) / f"tighten-{split}.json", args)
    result = tighten_run(
        args.run_dir,
        resolve_device(args.device),
        split=args.split,
        limit=args.limit,
        steps=args.steps,
        lr=args.lr,
        refit_epochs=args.refit_epochs,
        iw_samples=args.iw_samples,
        elbo_samples=args.elbo_samples,
        seed=args.seed,
        progress=not args.no_progress,
    )
    title = f"{result['model']} on {result['dataset']} {args.split}: where the gap log p(x) - ELBO comes from"
    return print_and_save(title, format_gap_table(result), result, json_path)
