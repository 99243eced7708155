"""The commands that use a trained model: each one's function, help, and the dataclass that declares its options
(elbox.core.command_options). (No torch here: `elbox --help` reads this.)"""

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
from elbox.core.command_options import (
    EncodeOptions,
    EvaluateOptions,
    OODOptions,
    ReconstructOptions,
    ReportOptions,
    SampleOptions,
    ScoreOptions,
    TightenOptions,
)

COMMANDS = {  # name: (function, help, options); every command with an output file also takes --overwrite
    "evaluate": (cmd_evaluate, "bounds, NLL, bits/dim and active units on a split", EvaluateOptions),
    "sample": (cmd_sample, "a PNG grid of samples from the prior", SampleOptions),
    "score": (
        cmd_score,
        "per-example log-likelihood estimates of your images or table rows, as CSV",
        ScoreOptions,
    ),
    "encode": (
        cmd_encode,
        "posterior means and variances of your images or table rows, as features in an .npz",
        EncodeOptions,
    ),
    "report": (cmd_report, "an HTML page (and Markdown) with curves, the evaluation and image grids", ReportOptions),
    "reconstruct": (cmd_reconstruct, "a grid of test images and their reconstructions", ReconstructOptions),
    "tighten": (
        cmd_tighten,
        "split the inference gap into approximation and amortization parts (Cremer et al. 2018)",
        TightenOptions,
    ),
    "ood": (
        cmd_ood,
        "out-of-distribution detection: AUROC, AUPRC and FPR of every anomaly score, outliers against inliers",
        OODOptions,
    ),
}
