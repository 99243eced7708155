"""The options of the commands that use a trained model, declared once as dataclasses, as `elbox train`'s are: the
command line is generated from them (elbox.cli) and the Python functions take their defaults from them
(`batch_size: int = ScoreOptions.batch_size`), with the ranges of elbox.core.limits. (No torch here: `elbox --help`
reads this.)

    elbox evaluate RUN ...   EvaluateOptions       elbox.evaluate
    elbox sample RUN ...     SampleOptions         elbox.sample
    elbox score RUN ...      ScoreOptions          elbox.score, elbox.anomaly_scores
    elbox encode RUN ...     EncodeOptions         elbox.encode
    elbox report RUN ...     ReportOptions         elbox.present.report.write_report
    elbox reconstruct RUN    ReconstructOptions
    elbox tighten RUN ...    TightenOptions        elbox.evaluation.tighten.tighten_run
    elbox ood RUN ...        OODOptions            elbox.ood
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elbox.core.limits import ANOMALY_METHODS, COUNTS, OOD_BINARIZATIONS, OOD_IW_SAMPLES, TEMPERATURE
from elbox.core.options import option

SPLITS = ("train", "validation", "train-full", "test")  # elbox.data.SPLITS, without importing torch (a test compares)
# Binarizations of a grey image a binary model averages over (elbox score, encode): the standard error of their mean
# is a quarter of the spread between single binarizations, for 16 times the model evaluations of one binary image.
BINARIZATIONS = 16


def counted(name: str, default: Any, help: str, **declaration: Any) -> Any:
    """An option whose whole numbers lie in elbox.core.limits.COUNTS[name] (the range the Python functions check)."""
    low, high = COUNTS[name]
    return option(default, help, minimum=low, maximum=high, **declaration)


# -- what several commands share ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Seeded:
    seed: int = counted("seed", 0, "seed of binarization/dequantization and of any sampling")


@dataclass(kw_only=True)
class Batched(Seeded):
    batch_size: int = counted("batch_size", 500, "examples per pass")


@dataclass(kw_only=True)
class OfSplit:
    split: str = option(
        "test",
        "the split of the run's dataset (default: test; a run on your own data: its validation examples)",
        choices=SPLITS,
    )


@dataclass(kw_only=True)
class UserInput(Batched):
    input: str = option(
        help=".npy, .npz (array 'x', 'images' or the only one), a folder of images, one image file, or for a model of "
        "vectors a .csv/.parquet table (its columns taken by the names the run was trained on)",
        metavar="FILE|DIR",
    )
    id_column: str | None = option(
        None, "a table's column whose values name the rows in the output (default: row numbers)", metavar="NAME"
    )


@dataclass(kw_only=True)
class AnomalySettings:
    reference: str = option(
        "validation",
        "data you trust as normal: they set the p-values and the typicality's entropy (default: the run's validation "
        "split)",
        metavar="SPLIT|PATH",
    )
    llr_k: int = counted(
        "llr_k",
        1,  # Havtorn et al. (2021) use LLR^{>1} for their 3-level HVAE on Fashion-MNIST
        "llr: latent levels next to x drawn from their prior in LLR^{>K} (Havtorn et al. 2021)",
        metavar="K",
    )
    regret_steps: int = counted("regret_steps", 100, "regret: Adam steps of each example's refit of q")
    background: str | None = option(
        None, "background: a run trained on perturbed data (elbox train ... --perturb 0.2)", metavar="RUN_DIR"
    )


# -- the commands ---------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EvaluateOptions(OfSplit, Batched):
    data: str | None = option(
        None,
        "other data in the run's data space: a built-in dataset (its --split) or a path (default: the run's own test "
        "split, or its validation data)",
        metavar="NAME|PATH",
    )
    iw_samples: tuple[int, ...] = counted(
        "iw_samples",
        (1, 10, 100, 1000),
        "importance samples K, one or several (one stream of max K samples serves all); 5000 compares with "
        "IWAE/VampPrior tables",
        metavar="K",
    )
    elbo_samples: int = counted("elbo_samples", 1, "Monte Carlo samples per example for the ELBO")
    limit: int | None = counted("limit", None, "evaluate the first N examples only (default: all)", metavar="N")
    compile: bool = option(
        False,
        "torch.compile the importance-sampling passes: about 1.2x faster IWAE on 2 CPU cores after 15-40 s of "
        "compilation, so worth it for large K (benchmarks/reproduce/README.md); other random draws than eager's",
    )
    weights: str | None = option(
        None,
        "the last epoch's weights, or the best on validation (best.safetensors) (default: best for a run trained with "
        "early stopping, else last)",
        choices=("last", "best"),
    )
    json: str | None = option(
        None, "where to write the JSON result (default: RUN_DIR/eval-SPLIT.json)", metavar="FILE", file="output"
    )


@dataclass(kw_only=True)
class SampleOptions(Seeded):
    n: int = counted("n", 64, "how many samples")
    out: str | None = option(
        None,
        "where to write the grid (default: RUN_DIR/samples.png; for a model of a table, the samples as CSV rows: "
        "RUN_DIR/samples.csv)",
        metavar="FILE.png",
        file="output",
    )
    temperature: tuple[float, ...] = option(
        (1.0,),
        "scale of the prior's standard deviation: one value, or one per level z1, z2, ... (hvae)",
        above=TEMPERATURE[0],
        maximum=TEMPERATURE[1],
        metavar="T",
    )
    draw: bool = option(False, "draw x ~ p(x|z) instead of showing its mean")
    steps: int | None = counted("steps", None, "diffusion: sampling steps (default: T, or 256 in continuous time)")


@dataclass(kw_only=True)
class ScoreOptions(AnomalySettings, UserInput):
    out: str | None = option(
        None, "where to write the scores (default: RUN_DIR/scores.csv)", metavar="FILE.csv", file="output"
    )
    iw_samples: int = counted("iw_samples", 1000, "importance samples for IWAE-K", metavar="K")
    elbo_samples: int = counted("elbo_samples", 8, "models scored by their ELBO (diffusion): samples per image")
    method: list[str] | None = option(
        None,
        f"add anomaly scores and their p-values as columns: {', '.join(ANOMALY_METHODS)} (docs/ood.md)",
        choices=ANOMALY_METHODS,
        metavar="NAME",
    )
    reference_limit: int = counted(
        "limit", 1000, "--method: the first N reference examples, scored as your input", metavar="N"
    )


@dataclass(kw_only=True)
class EncodeOptions(UserInput):
    out: str = option(help="where to write the features", metavar="FILE.npz", file="output")


@dataclass(kw_only=True)
class ReportOptions(Seeded):
    out: str | None = option(
        None,
        "where to write the page, the .md beside it (default: RUN_DIR/report.html)",
        metavar="FILE.html",
        file="report",
    )


@dataclass(kw_only=True)
class ReconstructOptions(OfSplit, Seeded):
    n: int = counted("n", 32, "how many images")
    out: str | None = option(
        None,
        "where to write the grid (default: RUN_DIR/reconstructions.png)",
        metavar="FILE.png",
        file="output",
    )


@dataclass(kw_only=True)
class TightenOptions(OfSplit, Seeded):
    limit: int = option(200, "examples to optimize", minimum=1, maximum=10_000, metavar="N")
    steps: int = counted("steps", 300, "Adam steps of the per-example optimization")
    lr: float = option(0.05, "learning rate of the per-example optimization", above=0, maximum=10)
    refit_epochs: int = option(3, "epochs to refit the encoder on the training split, 0: skip", minimum=0, maximum=1000)
    iw_samples: int = counted("iw_samples", 1000, "importance samples for IWAE-K", metavar="K")
    elbo_samples: int = counted("elbo_samples", 100, "Monte Carlo samples per ELBO estimate")
    json: str | None = option(
        None, "where to write the JSON result (default: RUN_DIR/tighten-SPLIT.json)", metavar="FILE", file="output"
    )


@dataclass(kw_only=True)
class OODOptions(AnomalySettings, Batched):
    outliers: str = option(help="the unusual data, as --input of score takes them", metavar="PATH")
    inliers: str = option("test", "normal data to tell them from (default: the run's test split)", metavar="SPLIT|PATH")
    methods: list[str] | None = option(
        None,
        f"scores to compare, of {', '.join(ANOMALY_METHODS)} (default: every one that applies)",
        choices=ANOMALY_METHODS,
        metavar="NAME",
    )
    iw_samples: int = counted("iw_samples", OOD_IW_SAMPLES, "importance samples of log p(x) and of LLR's bounds")
    binarizations: int = counted("binarizations", OOD_BINARIZATIONS, "binary models: binarizations of each grey image")
    limit: int | None = counted("limit", None, "the first N examples of each set (default: all)", metavar="N")
    bootstrap: int = counted("bootstrap", 200, "resamples for the standard errors")
    json: str | None = option(
        None,
        "where to write the result (default: RUN_DIR/ood.json; the histograms beside it as .png)",
        metavar="FILE.json",
        file="output",
    )
    figure: str | None = option(
        None, "where to draw the histograms (default: beside the JSON)", metavar="FILE.png", file="output"
    )
