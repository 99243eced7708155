"""The options of the commands that use a trained model (evaluate, sample, score, encode, report, reconstruct,
tighten, ood): each command's function, help and argparse declarations. (No torch here: `elbox --help` reads this.)"""

from __future__ import annotations

from elbox.cli.commands import (
    cmd_encode,
    cmd_evaluate,
    cmd_ood,
    cmd_reconstruct,
    cmd_report,
    cmd_sample,
    cmd_score,
    cmd_tighten,
)
from elbox.cli.types import count, integer, output_file, real, report_file
from elbox.core.limits import ANOMALY_METHODS, OOD_BINARIZATIONS, OOD_IW_SAMPLES, TEMPERATURE

SPLITS = ("train", "validation", "train-full", "test")  # elbox.data.SPLITS, without importing torch (a test compares)

INPUT = (
    "--input",
    dict(
        required=True,
        metavar="FILE|DIR",
        help=".npy, .npz (array 'x', 'images' or the only one), a "
        "folder of images, one image file, or for a model of vectors a .csv/.parquet table (its columns "
        "taken by the names the run was trained on)",
    ),
)
ID_COLUMN = (
    "--id-column",
    dict(
        default=None,
        metavar="NAME",
        help="a table's column whose values name the rows in the output (default: row numbers)",
    ),
)
SEED = (
    "--seed",
    dict(type=count("seed"), default=0, help="seed of binarization/dequantization and of any sampling (default: 0)"),
)
BATCH = ("--batch-size", dict(type=count("batch_size"), default=500, help="examples per pass (default: 500)"))
SPLIT = (
    "--split",
    dict(
        choices=SPLITS,
        default="test",
        help="the split of the run's dataset (default: test; a run on your own data: its validation examples)",
    ),
)
IW = (
    "--iw-samples",
    dict(type=count("iw_samples"), default=1000, metavar="K", help="importance samples for IWAE-K (default: 1000)"),
)
LLR_K = (
    "--llr-k",
    dict(
        type=integer(0, 100),
        default=1,
        metavar="K",
        help="llr: latent levels next to x drawn from their prior in LLR^{>K} (default: 1, Havtorn et al. 2021)",
    ),
)
REGRET_STEPS = (
    "--regret-steps",
    dict(
        type=count("regret_steps"), default=100, help="regret: Adam steps of each example's refit of q (default: 100)"
    ),
)
BACKGROUND = (
    "--background",
    dict(
        default=None,
        metavar="RUN_DIR",
        help="background: a run trained on perturbed data (elbox train ... --perturb 0.2)",
    ),
)
REFERENCE = (
    "--reference",
    dict(
        default="validation",
        metavar="SPLIT|PATH",
        help="data you trust as normal: they set "
        "the p-values and the typicality's entropy (default: the run's validation split)",
    ),
)
COMMANDS = {  # name: (function, help, options); every command with an output file also takes --overwrite
    "evaluate": (
        cmd_evaluate,
        "bounds, NLL, bits/dim and active units on a split",
        [
            SPLIT,
            (
                "--data",
                dict(
                    default=None,
                    metavar="NAME|PATH",
                    help="other data in the run's data space: a built-in "
                    "dataset (its --split) or a path (default: the run's own test split, or its validation data)",
                ),
            ),
            (
                "--iw-samples",
                dict(
                    type=count("iw_samples"),
                    nargs="+",
                    default=[1, 10, 100, 1000],
                    metavar="K",
                    help="importance samples K, one or several (one stream of max K samples serves all); 5000 compares "
                    "with IWAE/VampPrior tables (default: 1 10 100 1000)",
                ),
            ),
            (
                "--elbo-samples",
                dict(
                    type=count("elbo_samples"),
                    default=1,
                    help="Monte Carlo samples per example for the ELBO (default: 1)",
                ),
            ),
            (
                "--limit",
                dict(
                    type=count("limit"),
                    default=None,
                    metavar="N",
                    help="evaluate the first N examples only (default: all)",
                ),
            ),
            (
                "--weights",
                dict(
                    choices=("last", "best"),
                    default=None,
                    help="the last epoch's weights, or the best on "
                    "validation (best.safetensors) (default: best for a run trained with early stopping, else last)",
                ),
            ),
            BATCH,
            SEED,
            (
                "--json",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE",
                    help="where to write the JSON result (default: RUN_DIR/eval-SPLIT.json)",
                ),
            ),
        ],
    ),
    "sample": (
        cmd_sample,
        "a PNG grid of samples from the prior",
        [
            ("--n", dict(type=count("n"), default=64, help="how many samples (default: 64)")),
            (
                "--out",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE.png",
                    help="where to write the grid (default: "
                    "RUN_DIR/samples.png; for a model of a table, the samples as CSV rows: RUN_DIR/samples.csv)",
                ),
            ),
            SEED,
            (
                "--temperature",
                dict(
                    type=real(*TEMPERATURE),
                    nargs="+",
                    default=[1.0],
                    metavar="T",
                    help=(
                        "scale of the prior's standard deviation: one value, or one per level z1, z2, ... (hvae) "
                        "(default: 1)"
                    ),
                ),
            ),
            ("--draw", dict(action="store_true", help="draw x ~ p(x|z) instead of showing its mean")),
            (
                "--steps",
                dict(
                    type=count("steps"),
                    default=None,
                    help="diffusion: sampling steps (default: T, or 256 in continuous time)",
                ),
            ),
        ],
    ),
    "score": (
        cmd_score,
        "per-example log-likelihood estimates of your images or table rows, as CSV",
        [
            INPUT,
            ID_COLUMN,
            BATCH,
            SEED,
            (
                "--out",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE.csv",
                    help="where to write the scores (default: RUN_DIR/scores.csv)",
                ),
            ),
            IW,
            (
                "--elbo-samples",
                dict(
                    type=count("elbo_samples"),
                    default=8,
                    help="models scored by their ELBO (diffusion): samples per image (default: 8)",
                ),
            ),
            (
                "--method",
                dict(
                    choices=ANOMALY_METHODS,
                    nargs="+",
                    action="extend",
                    default=None,
                    metavar="NAME",
                    help="add anomaly scores and "
                    f"their p-values as columns: {', '.join(ANOMALY_METHODS)} (docs/ood.md)",
                ),
            ),
            REFERENCE,
            (
                "--reference-limit",
                dict(
                    type=count("limit"),
                    default=1000,
                    metavar="N",
                    help="--method: the first N reference examples, scored as your input (default: 1000)",
                ),
            ),
            LLR_K,
            REGRET_STEPS,
            BACKGROUND,
        ],
    ),
    "encode": (
        cmd_encode,
        "posterior means and variances of your images or table rows, as features in an .npz",
        [
            INPUT,
            ID_COLUMN,
            BATCH,
            SEED,
            ("--out", dict(type=output_file, required=True, metavar="FILE.npz", help="where to write the features")),
        ],
    ),
    "report": (
        cmd_report,
        "an HTML page (and Markdown) with curves, the evaluation and image grids",
        [
            (
                "--out",
                dict(
                    type=report_file,
                    default=None,
                    metavar="FILE.html",
                    help="where to write the page, the .md beside it (default: RUN_DIR/report.html)",
                ),
            ),
            SEED,
        ],
    ),
    "reconstruct": (
        cmd_reconstruct,
        "a grid of test images and their reconstructions",
        [
            ("--n", dict(type=count("n"), default=32, help="how many images (default: 32)")),
            SPLIT,
            (
                "--out",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE.png",
                    help="where to write the grid (default: RUN_DIR/reconstructions.png)",
                ),
            ),
            SEED,
        ],
    ),
    "tighten": (
        cmd_tighten,
        "split the inference gap into approximation and amortization parts (Cremer et al. 2018)",
        [
            SPLIT,
            (
                "--limit",
                dict(type=integer(1, 10_000), default=200, metavar="N", help="examples to optimize (default: 200)"),
            ),
            (
                "--steps",
                dict(
                    type=count("steps"), default=300, help="Adam steps of the per-example optimization (default: 300)"
                ),
            ),
            (
                "--lr",
                dict(
                    type=real(0, 10), default=0.05, help="learning rate of the per-example optimization (default: 0.05)"
                ),
            ),
            (
                "--refit-epochs",
                dict(
                    type=integer(0, 1000),
                    default=3,
                    help="epochs to refit the encoder on the training split, 0: skip (default: 3)",
                ),
            ),
            IW,
            (
                "--elbo-samples",
                dict(
                    type=count("elbo_samples"), default=100, help="Monte Carlo samples per ELBO estimate (default: 100)"
                ),
            ),
            SEED,
            (
                "--json",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE",
                    help="where to write the JSON result (default: RUN_DIR/tighten-SPLIT.json)",
                ),
            ),
        ],
    ),
    "ood": (
        cmd_ood,
        "out-of-distribution detection: AUROC, AUPRC and FPR of every anomaly score, outliers against inliers",
        [
            (
                "--outliers",
                dict(required=True, metavar="PATH", help="the unusual data, as --input of score takes them"),
            ),
            (
                "--inliers",
                dict(
                    default="test",
                    metavar="SPLIT|PATH",
                    help="normal data to tell them from (default: the run's test split)",
                ),
            ),
            REFERENCE,
            (
                "--methods",
                dict(
                    choices=ANOMALY_METHODS,
                    nargs="+",
                    action="extend",
                    default=None,
                    metavar="NAME",
                    help=f"scores to compare, of {', '.join(ANOMALY_METHODS)} (default: every one that applies)",
                ),
            ),
            (
                "--iw-samples",
                dict(
                    type=count("iw_samples"),
                    default=OOD_IW_SAMPLES,
                    metavar="K",
                    help=f"importance samples of log p(x) and of LLR's bounds (default: {OOD_IW_SAMPLES})",
                ),
            ),
            LLR_K,
            REGRET_STEPS,
            BACKGROUND,
            (
                "--binarizations",
                dict(
                    type=count("binarizations"),
                    default=OOD_BINARIZATIONS,
                    help=f"binary models: binarizations of each grey image (default: {OOD_BINARIZATIONS})",
                ),
            ),
            (
                "--limit",
                dict(
                    type=count("limit"),
                    default=None,
                    metavar="N",
                    help="the first N examples of each set (default: all)",
                ),
            ),
            (
                "--bootstrap",
                dict(type=count("bootstrap"), default=200, help="resamples for the standard errors (default: 200)"),
            ),
            BATCH,
            SEED,
            (
                "--json",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE.json",
                    help="where to write the result (default: RUN_DIR/ood.json; the histograms beside it as .png)",
                ),
            ),
            (
                "--figure",
                dict(
                    type=output_file,
                    default=None,
                    metavar="FILE.png",
                    help="where to draw the histograms (default: beside the JSON)",
                ),
            ),
        ],
    ),
}
