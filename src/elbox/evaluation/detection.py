"""elbox.ood (and `elbox ood`): how well each anomaly score of a run (elbox.evaluation.anomaly) tells
out-of-distribution data from the run's own.

    result = elbox.ood("runs/vae", outliers="digits.npy")          # inliers: the run's test split
    result["methods"]["llr"]["auroc"]

Every score is computed on three sets: reference data the user trusts (by default the run's validation split: they
set the typicality's entropy estimate and turn scores into p-values), inliers (by default the test split) and
outliers. The outliers are the positive class: AUROC, AUPRC (average precision) and the false-positive rate at 80 %
and 95 % true-positive rate, from scikit-learn's metrics, each with a bootstrap standard error (inliers and outliers
resampled separately, seeded).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from elbox.core.command_options import BINARIZATIONS, OODOptions, ScoreOptions
from elbox.core.errors import ElboxError, shown
from elbox.core.limits import check_count_option
from elbox.core.options import did_you_mean
from elbox.data import SPLITS
from elbox.data.preprocessing import input_space
from elbox.evaluation.anomaly import UNITS, AnomalyScorer, ScoreSettings, applicable_methods, method_list, p_values
from elbox.evaluation.inference import user_examples
from elbox.models.base import LatentVariableModel

TPR_LEVELS = (0.80, 0.95)
DEFINITIONS = {
    "likelihood": "-log p(x)",
    "complexity": "-log2 p(x) - L_PNG(x) (Serra et al. 2020)",
    "typicality": "|-log p(x) - H|, H the reference data's mean -log p (Nalisnick et al. 2019)",
    "llr": "L^{>0}(x) - L^{>k}(x) (Havtorn et al. 2021)",
    "regret": "ELBO(q fitted to x) - ELBO(q_phi(z|x)) (Xiao et al. 2020)",
    "background": "log p_background(x) - log p(x) (Ren et al. 2019)",
}


def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr_level: float) -> float:
    """The false-positive rate of the lowest threshold that flags at least tpr_level of the positives."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, tpr_level, side="left")])


def detection_figures(inliers: np.ndarray, outliers: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC and FPR at 80 % and 95 % TPR of scores (higher = more unusual), the outliers the positives."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.concatenate([np.zeros(len(inliers)), np.ones(len(outliers))])
    scores = np.concatenate([inliers, outliers])
    figures = {"auroc": float(roc_auc_score(labels, scores)), "auprc": float(average_precision_score(labels, scores))}
    for level in TPR_LEVELS:
        figures[f"fpr{round(100 * level)}"] = fpr_at_tpr(labels, scores, level)
    return figures


def detection_metrics(inliers: Tensor, outliers: Tensor, bootstrap: int = OODOptions.bootstrap, seed: int = 0) -> dict:
    """detection_figures, each with its bootstrap standard error (key + "_stderr") over `bootstrap` resamples of the
    inliers and of the outliers (with replacement, each set its own size; seeded); None (JSON null) for a single
    resample, which has no spread."""
    check_count_option(bootstrap, "bootstrap")
    a, b = inliers.double().cpu().numpy(), outliers.double().cpu().numpy()
    if len(a) == 0 or len(b) == 0:
        raise ElboxError(f"detection metrics need inliers and outliers; got {len(a)} inliers and {len(b)} outliers")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ElboxError("an anomaly score is not finite: the model's weights or the input are out of range")
    result = detection_figures(a, b)
    rng = np.random.default_rng(seed)
    draws = [detection_figures(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(bootstrap)]
    for key in list(result):
        values = [d[key] for d in draws]
        result[f"{key}_stderr"] = float(np.std(values, ddof=1)) if bootstrap > 1 else None
    return result


def run_and_config(model: Any, device: str | None, what: str = "model") -> tuple[LatentVariableModel, dict]:
    """The model and its run's config ({} for a bare model) from a Run, a run directory or a model."""
    from elbox.core.system import resolve_device
    from elbox.evaluation.runs import default_weights
    from elbox.io.checkpoint import load_run
    from elbox.training.workflows import Run

    if isinstance(model, (str, os.PathLike)):
        return load_run(model, resolve_device(device or "auto"), weights=default_weights(model))
    if isinstance(model, Run):
        return model.model, model.config
    if isinstance(model, LatentVariableModel):
        return model, {}
    raise ElboxError(f"the {what} must be a Run, a model or a run directory, got {type(model).__name__}")


def background_of(background: Any, device: str | None) -> tuple[LatentVariableModel | None, dict]:
    """The background model of the likelihood ratio and its run's config ((None, {}) if not given)."""
    return run_and_config(background, device, "background") if background is not None else (None, {})


def warn_if_not_perturbed(background: Any, config: dict, methods: list[str]) -> None:
    """A warning if the background ratio is asked for with a run not trained on perturbed data (--perturb): that run
    learns what the model learns, and the ratio tells little."""
    if "background" in methods and config and not config.get("train", {}).get("perturb"):
        where = shown(background) if isinstance(background, (str, os.PathLike)) else "the background run"
        warnings.warn(
            f"--background {where} was not trained on perturbed data (elbox train ... --perturb 0.2): its "
            "likelihood ratio to the model tells little",
            stacklevel=3,
        )


def examples_of(
    model: LatentVariableModel, config: dict, data: Any, what: str, limit: int | None, seed: int
) -> tuple[Tensor, str]:
    """A set of examples as given (uint8 images or vectors) and its name: a split of the run's own data (SPLITS), or
    data (a path, an array, a tensor or a Dataset) read as the run read its data."""
    from elbox.evaluation.runs import own_data, run_examples

    is_path = isinstance(data, (str, os.PathLike))
    if isinstance(data, str) and data in SPLITS:
        if not config:
            raise ElboxError(f"--{what} {data}: a bare model has no record of its data; give the {what} data")
        examples, name = run_examples(config, data, seed, limit), own_data(config, data, seed)[2]
    elif is_path and not os.path.lexists(data):
        raise ElboxError(
            f"--{what} {shown(data)}: no such file or folder, nor a split of the run's data "
            f"({', '.join(SPLITS)}); {did_you_mean(data, SPLITS)}".removesuffix("; ")
        )
    else:
        try:
            examples = user_examples(model, data, input_space(model))[0]
        except ElboxError as e:  # a path names itself in the message; data given in memory need their role
            raise e if is_path else ElboxError(f"the {what}: {e}") from None
        examples = examples[:limit] if limit else examples
        name = str(data) if is_path else "data given in memory"
    if examples.shape[0] == 0:
        raise ElboxError(f"the {what} ({name}) hold no examples")
    return examples, name


def ood(
    model: Any,
    outliers: Any,
    *,
    inliers: Any = OODOptions.inliers,
    reference: Any = OODOptions.reference,
    methods: list[str] | None = None,
    background: Any = None,
    iw_samples: int = OODOptions.iw_samples,
    llr_k: int = OODOptions.llr_k,
    regret_steps: int = OODOptions.regret_steps,
    binarizations: int = OODOptions.binarizations,
    limit: int | None = OODOptions.limit,
    bootstrap: int = OODOptions.bootstrap,
    batch_size: int = OODOptions.batch_size,
    seed: int = OODOptions.seed,
    device: str | None = None,
    progress: bool = False,
) -> dict:
    """Out-of-distribution detection by every anomaly score that applies to the model (or those in `methods`).

    model: a Run, a run directory or a model. outliers, inliers, reference: a split of the run's data ("test",
    "validation", "train") or data as elbox.score takes them (a path, an array, a tensor); limit: the first N of each.
    binarizations: of each grey image, for a binary model, each seeded by the image (elbox.core.limits says why 16 and
    25 importance samples).
    background: a second run (or model) trained on perturbed data, for the background likelihood ratio.
    Returns a JSON-ready dict: {"methods": {name: {auroc, auprc, fpr80, fpr95, each with _stderr; seconds; units;
    definition}}, the sets' names and sizes, and per-example scores and p-values under "scores"}.
    """
    model, config = run_and_config(model, device)
    background_model, background_config = background_of(background, device)
    settings = ScoreSettings(
        iw_samples=iw_samples,
        llr_k=llr_k,
        regret_steps=regret_steps,
        batch_size=batch_size,
        seed=seed,
        binarizations=binarizations,
    )
    if limit is not None:
        check_count_option(limit, "limit")
    check_count_option(bootstrap, "bootstrap")
    methods = method_list(methods) if methods is not None else applicable_methods(model, background_model)
    scorer = AnomalyScorer(model, input_space(model), methods, settings, background_model)
    warn_if_not_perturbed(background, background_config, scorer.methods)
    sets = {
        what: examples_of(model, config, data, what, limit, seed)
        for what, data in (("reference", reference), ("inliers", inliers), ("outliers", outliers))
    }
    if sets["reference"][1] == sets["inliers"][1]:
        warnings.warn(
            f"the reference and the inliers are the same data ({sets['inliers'][1]}): the typicality's "
            "entropy and the p-values are fitted on the inliers themselves; give other --reference data",
            stacklevel=2,
        )
    start = time.perf_counter()
    scores = {"reference": scorer.fit_reference(sets["reference"][0], progress)}
    reference_seconds = time.perf_counter() - start
    seconds = {}
    for what in ("inliers", "outliers"):
        start = time.perf_counter()
        scores[what] = scorer.scores(sets[what][0], progress)
        seconds[what] = time.perf_counter() - start
    n_scored = sum(len(sets[w][0]) for w in sets)
    result: dict = {
        "methods": {},
        "model": model.name,
        "sets": {what: {"data": name, "n": len(examples)} for what, (examples, name) in sets.items()},
        "settings": {
            "iw_samples": iw_samples,
            "llr_k": llr_k,
            "regret_steps": regret_steps,
            "seed": seed,
            "binarizations": binarizations,
            "bootstrap": bootstrap,
        },
        "seconds_scoring": reference_seconds + sum(seconds.values()),
        "examples_scored": n_scored,
        "scores": {},
    }
    for method in methods:
        metrics = detection_metrics(scores["inliers"][method], scores["outliers"][method], bootstrap, seed)
        result["methods"][method] = {**metrics, "units": UNITS[method], "definition": DEFINITIONS[method]}
        result["scores"][method] = {
            what: {
                "score": scores[what][method].tolist(),
                "p_value": p_values(scores[what][method], scores["reference"][method]).tolist(),
            }
            for what in ("inliers", "outliers")
        }
    result["entropy_estimate_nats"] = scorer.entropy  # H of the typicality score: the reference data's mean -log p(x)
    return result


def format_ood_table(result: dict) -> str:
    """The methods' detection figures as an aligned text table, best AUROC first."""
    rows = [("method", "AUROC", "AUPRC", "FPR@80%TPR", "FPR@95%TPR")]
    ordered = sorted(result["methods"].items(), key=lambda kv: -kv[1]["auroc"])
    for name, m in ordered:
        rows.append(
            (
                name,
                *(
                    f"{m[k]:.3f}" + ("" if m[k + "_stderr"] is None else f" ± {m[k + '_stderr']:.3f}")
                    for k in ("auroc", "auprc", "fpr80", "fpr95")
                ),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def ood_figure_png(result: dict) -> bytes:
    """Histograms of each method's scores, inliers against outliers, one panel per method, AUROC in the title."""
    from elbox.io.figures import _png, pyplot

    plt = pyplot()

    methods = list(result["methods"])
    columns = min(3, len(methods))
    rows = math.ceil(len(methods) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    sets = result["sets"]
    for ax, method in zip(axes.flat, methods):
        values = result["scores"][method]
        both = np.concatenate([values["inliers"]["score"], values["outliers"]["score"]])
        bins = np.linspace(both.min(), both.max(), 41) if both.max() > both.min() else 10
        for what, color in (("inliers", "tab:blue"), ("outliers", "tab:red")):
            ax.hist(
                values[what]["score"],
                bins=bins,
                alpha=0.55,
                color=color,
                density=True,
                label=f"{what}: {Path(str(sets[what]['data'])).name} ({sets[what]['n']})",
            )
        ax.set_title(f"{method}: AUROC {result['methods'][method]['auroc']:.3f}", fontsize=10)
        ax.set_xlabel(f"score ({result['methods'][method]['units']}; higher = more unusual)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def anomaly_scores(
    model: Any,
    data: Any,
    methods: list[str],
    *,
    reference: Any = ScoreOptions.reference,
    background: Any = None,
    iw_samples: int = ScoreOptions.iw_samples,
    llr_k: int = ScoreOptions.llr_k,
    regret_steps: int = ScoreOptions.regret_steps,
    batch_size: int = ScoreOptions.batch_size,
    seed: int = ScoreOptions.seed,
    binarizations: int = BINARIZATIONS,
    elbo_samples: int = ScoreOptions.elbo_samples,
    reference_limit: int | None = ScoreOptions.reference_limit,
    device: str | None = None,
    progress: bool = False,
    id_column: str | None = None,
    log_likelihood: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """Each example's anomaly score by each method (higher = more unusual) and its p-value against the first
    reference_limit examples of the reference data (by default the run's validation split), scored with the same
    settings: ({method: [N]}, {method: [N]}, the examples' names). data, reference: as elbox.score and ood take them.
    elbo_samples: ELBO draws of log p(x) of a model scored by its ELBO (diffusion), as elbox.score's.
    log_likelihood: the examples' log p(x) from elbox.score with the same iw_samples, elbo_samples, binarizations and
    seed, if already computed (it is not computed again)."""
    model, config = run_and_config(model, device)
    background_model, background_config = background_of(background, device)
    settings = ScoreSettings(
        iw_samples=iw_samples,
        llr_k=llr_k,
        regret_steps=regret_steps,
        batch_size=batch_size,
        seed=seed,
        binarizations=binarizations,
        elbo_samples=elbo_samples,
    )
    if reference_limit is not None:
        check_count_option(reference_limit, "limit")
    space = input_space(model)
    scorer = AnomalyScorer(model, space, method_list(methods), settings, background_model)
    warn_if_not_perturbed(background, background_config, scorer.methods)
    examples, names = user_examples(model, data, space, id_column)
    if examples.shape[0] == 0:
        raise ElboxError(f"input {shown(data) if isinstance(data, (str, os.PathLike)) else 'array'} holds no examples")
    reference_examples = examples_of(model, config, reference, "reference", reference_limit, seed)[0]
    reference_scores = scorer.fit_reference(reference_examples, progress)
    scores = scorer.scores(examples, progress, nll=None if log_likelihood is None else -log_likelihood.double())
    return scores, {m: p_values(scores[m], reference_scores[m]) for m in scores}, names
