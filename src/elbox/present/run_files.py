"""What `elbox report` reads from a run directory (its metrics, the evaluation and detection elbox saved, the samples
it drew), each checked, with a warning and a fallback where a file is damaged; and the one-line summaries the report
makes of them (the headline bound, the model, the training)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from elbox.core.options import short_repr
from elbox.data.user_images import one_line
from elbox.evaluation.tables import format_table
from elbox.io.checkpoint import METRICS_FILE
from elbox.io.figures import is_number

LOG = logging.getLogger(__name__)  # shown by elbox.core.log's handler

# the evaluations `elbox evaluate` saves, in the order the report prefers them: a built-in dataset's test split; own
# data (no test split) are evaluated on the run's validation examples
SAVED_EVALUATIONS = ("eval-test.json", "eval-validation.json")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def warn(message: str) -> None:
    """A warning (one line on stderr, elbox.core.log): the report goes on without what the message names."""
    LOG.warning(message)


def _record_problem(line: bytes) -> tuple[dict | None, str | None]:
    """(the metrics record on `line`, None), or (None, what is wrong with it): not JSON, not an object, or a value
    the training curves plot that is missing, not a number or not finite."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, a number too long, nesting too deep
        return None, "is damaged"
    if not isinstance(record, dict):
        return None, "is not a JSON object"
    kind = record.get("kind")
    plotted = {
        "train": ["elbo", "reconstruction"],
        "epoch": ["val_elbo", *(k for k in record if k.startswith("val_kl"))],
    }
    if "step" in record:
        for key in ["step", *(plotted.get(kind, []) if isinstance(kind, str) else [])]:
            if not is_number(record.get(key)):
                return None, f"has a bad {key} ({short_repr(record.get(key), 30)})"
    return record, None


def read_records(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; damaged lines (a killed run can leave one) are skipped, with one warning."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        warn(f"cannot read {path} ({e.strerror or e}); the report has no training curves")
        return []
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record, problem = _record_problem(line)
        if problem:
            damaged.append((number, problem))
        else:
            records.append(record)
    if damaged:
        more = f" (and {len(damaged) - 1} more lines)" if len(damaged) > 1 else ""
        warn(f"{path} line {damaged[0][0]} {damaged[0][1]}{more}; skipped")
    return records


def saved_evaluation(path: Path) -> dict | None:
    """The result `elbox evaluate` saved at `path`, or None: when there is none, or (with a warning) when it is
    damaged. Its types are checked by formatting it as the report will."""
    if not path.exists():
        return None
    instead = "the report uses another saved evaluation or makes a quick evaluation instead"
    try:
        text = path.read_bytes()
    except OSError as e:
        warn(f"cannot read {path} ({e.strerror or e}); {instead}")
        return None
    try:
        result = json.loads(text)
        format_table(result)
        headline_of(result)
        return result
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError, IndexError) as e:
        warn(f"{path} is damaged ({one_line(e, 60)}); {instead}")
        return None


def saved_ood(path: Path) -> tuple[str, bytes] | None:
    """The text and histograms of the detection `elbox ood` saved at `path` (RUN_DIR/ood.json), or None: when there
    is none, or (with a warning) when it is damaged."""
    from elbox.evaluation.detection import format_ood_table, ood_figure_png

    if not path.exists():
        return None
    try:
        result = json.loads(path.read_bytes())
        sets = result["sets"]
        text = (
            f"From {path.name} (elbox ood): outliers {sets['outliers']['data']} ({sets['outliers']['n']}) against "
            f"inliers {sets['inliers']['data']} ({sets['inliers']['n']}); p-values and the typicality's entropy "
            f"from {sets['reference']['data']} ({sets['reference']['n']}). Mean ± bootstrap s.e.; higher scores "
            f"are more unusual.\n\n{format_ood_table(result)}"
        )
        return text, ood_figure_png(result)
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError, IndexError) as e:
        warn(f"{path} is damaged or unreadable ({one_line(e, 60)}); the report leaves out the detection")
        return None


def full_evaluation(run_dir: Path) -> tuple[Path, dict] | tuple[None, None]:
    """(the path, the result) of the first evaluation of SAVED_EVALUATIONS in run_dir that is there and sound."""
    for path in (run_dir / name for name in SAVED_EVALUATIONS):
        result = saved_evaluation(path)
        if result is not None:
            return path, result
    return None, None


def evaluated_on(data: dict, kind: str) -> str:
    """What the report evaluates and shows when it draws its own examples, e.g. "test images of mnist" (a built-in
    dataset's test split) or "validation images of /data/faces" (own data have no test split: the run's validation
    examples, held out of its data or from the validation path it was given)."""
    if "name" in data:
        return f"test {kind} of {data['name']}"
    return (
        f"validation {kind} of "
        f"{data['path'] if 'validation_fraction' in data else data.get('validation', data['path'])}"
    )


def saved_samples(path: Path) -> bytes | None:
    """The PNG of samples `elbox train` saved, or None (with a warning where it is there but damaged)."""
    if not path.exists():
        return None
    try:
        png = path.read_bytes()
    except OSError as e:
        warn(f"cannot read {path} ({e.strerror or e}); the report draws new samples")
        return None
    if not png.startswith(PNG_MAGIC):
        warn(f"{path} is not a PNG image; the report draws new samples")
        return None
    return png


def title_of(config: dict, run_dir: Path) -> str:
    data = config["data"]
    return f"elbox report: {config['model']} on {data.get('name', data.get('path', 'your data'))} ({run_dir.name})"


def _nats(result: dict, key: str) -> str:
    return f"{result[key]:.2f} ± {result[key + '_stderr']:.2f} nats"


def headline_of(result: dict) -> tuple[str, str]:
    """(the headline: the best bound on the negative log-likelihood and bits/dim, with standard errors; the next
    line: the ELBO and the gap between the two, with theirs), from an evaluation result."""
    best = ""
    if "nll_exact" in result:
        best = f"NLL = {_nats(result, 'nll_exact')} per example (exact) · "
    elif "nll_iw" in result:
        best = f"NLL ≤ {_nats(result, 'nll_iw')} per example (IWAE bound, K = {result['iw_samples']}) · "
    elif "elbo" in result:
        best = f"NLL ≤ {-result['elbo']:.2f} ± {result['elbo_stderr']:.2f} nats per example (-ELBO) · "
    if "bpd" in result and result.get("data_space") != "real":  # bits/dim: of 8-bit data, not of real vectors
        best += f"{result['bpd']:.4f} ± {result['bpd_stderr']:.4f} bits/dim" + (
            "" if best else f" ({result['bpd_source']})"
        )
    detail = []
    if "elbo" in result:
        detail.append(
            f"ELBO {_nats(result, 'elbo')} (reconstruction {result['reconstruction']:.2f}, KL {result['kl']:.2f})"
        )
    if "gap_elbo" in result:
        detail.append(f"gap -ELBO - NLL {_nats(result, 'gap_elbo')}")
    elif "gap_elbo_iw" in result:
        detail.append(f"gap -ELBO - NLL_K (K = {result['iw_samples']}) {_nats(result, 'gap_elbo_iw')}")
    return best.removesuffix(" · ") or "no bound in this evaluation", "; ".join(detail)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def training_line(records: list[dict]) -> str:
    """e.g. "36 epochs, 15,120 optimizer steps, 5 min 3 s of optimization (validation not counted)", from the
    epoch records; for a closed-form or EM fit, the time of the fit."""
    epochs = [r for r in records if r.get("kind") in ("epoch", "train_epoch") and is_number(r.get("epoch_time_s"))]
    if epochs:
        steps = f", {epochs[-1]['step']:,} optimizer steps" if is_number(epochs[-1].get("step")) else ""
        return (
            f"{len(epochs)} epoch{'s' if len(epochs) > 1 else ''}{steps}, "
            f"{_duration(sum(r['epoch_time_s'] for r in epochs))} of optimization (validation not counted)"
        )
    fits = [r["time_s"] for r in records if r.get("kind") == "fit" and is_number(r.get("time_s"))]
    return f"fitted in {_duration(sum(fits))} (closed form or EM)" if fits else "training time not recorded"


def model_line(model, config: dict) -> str:
    """The model in one line, e.g. "VAE, latent 32, MLP 784-512, Bernoulli likelihood, 407,080 parameters": its
    class, the sizes its config declares, its likelihood, and how many numbers it learned."""
    c = config["model_config"]
    parts = [type(model).__name__]
    if "hvae_type" in c:
        parts.append(f"{c['hvae_type']}, {c['levels']} levels")
    for key, text in (("latent_dim", "latent {}"), ("n_components", "{} components"), ("covariance", "{} covariance")):
        if key in c:
            parts.append(text.format(c[key]))
    if c.get("architecture") == "mlp":
        parts.append("MLP " + "-".join(map(str, [math.prod(c["data_shape"]), *c["hidden_dims"]])))
    elif c.get("architecture") == "conv":
        parts.append("conv " + "-".join(map(str, c["conv_channels"])))
    elif isinstance(c.get("channels"), list):
        parts.append("U-Net " + "-".join(map(str, c["channels"])))
    if "timesteps" in c:
        parts.append(f"T = {c['timesteps']}" if c["timesteps"] else "continuous time")
    if "likelihood" in c:
        parts.append(f"{c['likelihood'][:1].upper()}{c['likelihood'][1:]} likelihood")
    if model.trains_by_gradient:
        parts.append(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    else:
        parts.append(f"{sum(t.numel() for t in model.state_dict().values()):,} fitted numbers")
    return ", ".join(parts)
