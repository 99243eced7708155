"""Out-of-distribution benchmark (issue 29): models trained on Fashion-MNIST, every anomaly score elbox has, against
the out-of-distribution sets that can be made on this machine; and a table example with injected outlier rows.

    python benchmarks/ood.py data                  # the OOD sets, as .npy files in RUNS/data
    python benchmarks/ood.py train MODEL           # trains (or resumes) RUNS/MODEL with elbox train
    python benchmarks/ood.py evaluate MODEL        # elbox.ood against every set -> benchmarks/results/ood-MODEL.json
    python benchmarks/ood.py timing MODEL          # seconds per 10,000 images of each score
    python benchmarks/ood.py table-data            # the table example -> benchmarks/results/ood-table.json
    python benchmarks/ood.py table                 # the Markdown table of what has finished
    python benchmarks/ood.py llr MODEL --binarizations B --iw-samples K   # LLR^{>1} against digits with other
                                                   # estimates -> benchmarks/results/ood-llr-MODEL-B-K.json

MODEL: vae, skip (the default HVAE, 2 levels with skip paths), skip-protocol (the same type trained to its early stop
by the reproduced table's protocol, benchmarks/reproduce/hvae.json; a link to that row's run serves), skip3 (3
levels, the default recipe over 75 epochs, as long as the 2-level's 115), hvae (the
2-level Markov HVAE, the default before), mlp-ladder, ppca, mixture, hvae-5 (the Markov HVAE trained on the classes
0-4 only, judged on the classes 5-9), background (the Markov HVAE trained with --perturb 0.2, for the likelihood ratio
of Ren et al. 2019; its evaluation is part of hvae's). Each model is trained by its `elbox train` defaults unless EPOCHS
below says otherwise (the table records the epochs).

Protocol: inliers are the first 2,000 Fashion-MNIST test images (hvae-5: the test images of classes 0-4), the
reference data (p-values, the typicality's entropy) the first 2,000 of the run's validation split; each outlier set
has 2,000 images (the digits: all 1,797; `--n` sets fewer, e.g. for the slow likelihood regret). `elbox ood`'s
estimates: a binary model reads each grey image through 16 binarizations seeded by the image, log p(x) and both bounds
of LLR^{>1} with 25 importance samples each. AUROC with bootstrap standard errors (200 resamples). Outlier sets:

    digits     scikit-learn's 8 x 8 handwritten digits (0..16) made like MNIST: scaled to 0..255, resized to 20 x 20
               (bilinear) and centered in 28 x 28 with 4 blank pixels around; a stand-in for MNIST, which cannot be
               downloaded here (under the default VAE it reproduces the known failure: digits -196.9 nats against
               Fashion-MNIST's -230.7, IWAE-10, 300 images each)
    flipped    Fashion-MNIST test images 2,000..3,999, upside down
    noise      uniform 8-bit noise
    constant   one grey level per image, uniform on 0..255
    classes    (hvae-5 only) Fashion-MNIST test images of the classes 5-9 (sandal, shirt, sneaker, bag, ankle boot)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
N = 2000
SETS = ("digits", "flipped", "noise", "constant")
MODELS = {  # name: elbox train arguments (data: Fashion-MNIST unless a file is named)
    "vae": ["vae"],
    "skip": ["hvae", "--hvae-type", "skip"],
    "skip-protocol": ["--config", str(HERE / "reproduce" / "hvae.json")],
    "skip3": ["hvae", "--levels", "3", "--epochs", "75"],  # benchmarks/hvae_default.py's skip3: a link to it serves
    "hvae": ["hvae", "--hvae-type", "markov"],
    "mlp-ladder": ["hvae", "--hvae-type", "mlp-ladder"],
    "ppca": ["linear"],
    "mixture": ["mixture", "--n-components", "10", "--covariance", "diag"],
    "hvae-5": ["hvae", "--hvae-type", "markov", "--data", "{runs}/data/fashion-classes-0-4.npy"],
    "background": ["hvae", "--hvae-type", "markov", "--perturb", "0.2"],
}
# published AUROC, Fashion-MNIST against MNIST (the table)
PUBLISHED = {
    "likelihood": "0.27 (HVAE)",
    "llr": "0.964 (HVAE, 1 sample), 0.984 (250)",
    "regret": "0.988",
    "complexity": "0.967-0.998",
    "typicality": "0.83",
    "background": "0.924 (VAE)",
}


def elbox(*args: str) -> None:
    command = [sys.executable, "-m", "elbox", *map(str, args)]
    print("$ elbox " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True)


def fashion(split: str):
    from elbox.data import load_split

    images, labels = load_split("fashion-mnist", split)
    return images.numpy(), labels.numpy()


def make_data(runs: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    out = runs / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    digits = load_digits().images  # [1797, 8, 8] in 0..16
    # as MNIST was made (LeCun et al. 1998): size-normalized to a 20 x 20 box, anti-aliased, centered in 28 x 28
    big = [
        np.pad(np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)), 4)
        for d in digits
    ]
    test, test_labels = fashion("test")
    train, train_labels = fashion("train-full")
    sets = {
        "digits": np.stack(big)[:, None],
        "flipped": test[N : 2 * N, :, ::-1, :].copy(),
        "noise": rng.integers(0, 256, (N, 1, 28, 28), dtype=np.uint8),
        "constant": np.broadcast_to(rng.integers(0, 256, (N, 1, 1, 1), dtype=np.uint8), (N, 1, 28, 28)).copy(),
        "fashion-classes-0-4": train[train_labels < 5],
        "test-classes-0-4": test[test_labels < 5][:N],
        "classes": test[test_labels >= 5][:N],
    }
    for name, array in sets.items():
        np.save(out / f"{name}.npy", array)
        print(f"wrote {out / name}.npy {array.shape}")


def train(model: str, runs: Path, threads: int) -> None:
    out = runs / model
    if (out / "config.json").is_file() and not (out / "ood-trained").is_file():
        elbox("train", "--resume", out, "--threads", threads, "--no-progress")
    elif not (out / "config.json").is_file():
        args = [a.format(runs=runs) for a in MODELS[model]]
        seed = [] if args[0] == "--config" else ["--seed", 0]  # a config file brings its own
        elbox("train", *args, "--out", out, "--threads", threads, "--no-progress", *seed)
    (out / "ood-trained").write_text("")


def evaluate(model: str, runs: Path, n: int = N) -> dict:
    """Every score of the run on the reference data and the inliers once, then on each outlier set (what elbox.ood
    does for one set), with each score's time."""
    import torch
    from bench_vae import environment

    from elbox.core.limits import OOD_BINARIZATIONS, OOD_IW_SAMPLES
    from elbox.data.preprocessing import input_space
    from elbox.evaluation.anomaly import UNITS, AnomalyScorer, ScoreSettings, applicable_methods
    from elbox.evaluation.detection import DEFINITIONS, detection_metrics, examples_of
    from elbox.io.checkpoint import load_run

    data, run = runs / "data", runs / model
    m, config = load_run(run)
    background = None
    if model == "hvae" and (runs / "background" / "ood-trained").is_file():
        background = load_run(runs / "background")[0]
    methods = applicable_methods(m, background)
    settings = ScoreSettings(iw_samples=OOD_IW_SAMPLES, llr_k=1, binarizations=OOD_BINARIZATIONS)  # elbox ood's
    scorer = AnomalyScorer(m, input_space(m), methods, settings, background)
    inliers = str(data / "test-classes-0-4.npy") if model == "hvae-5" else "test"
    record = {
        "model": model,
        "train": config.get("train", {}),
        "methods": methods,
        "n": n,
        "environment": environment(torch.device("cpu")),
        "sets": {},
        "seconds": {},
    }
    start = time.perf_counter()
    scorer.fit_reference(examples_of(m, config, "validation", "reference", n, 0)[0])
    inlier_scores = scorer.scores(examples_of(m, config, inliers, "inliers", n, 0)[0])
    record["seconds"]["reference and inliers"] = time.perf_counter() - start
    for name in ("classes",) if model == "hvae-5" else SETS:
        start = time.perf_counter()
        scores = scorer.scores(examples_of(m, config, str(data / f"{name}.npy"), "outliers", n, 0)[0])
        record["seconds"][name] = time.perf_counter() - start
        record["sets"][name] = {
            method: {
                **detection_metrics(inlier_scores[method], scores[method], 200, 0),
                "units": UNITS[method],
                "definition": DEFINITIONS[method],
                "mean_inliers": inlier_scores[method].mean().item(),
                "mean_outliers": scores[method].mean().item(),
            }
            for method in methods
        }
        print(name, {k: round(v["auroc"], 3) for k, v in record["sets"][name].items()}, flush=True)
        (RESULTS / f"ood-{model}.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {RESULTS / f'ood-{model}.json'}")
    return record


def timing(model: str, runs: Path, n: int = 1000) -> None:
    """Seconds per 10,000 images of each score alone (on n test images, scaled), and of the four cheap ones together."""
    import torch
    from bench_vae import environment

    from elbox.core.limits import OOD_BINARIZATIONS, OOD_IW_SAMPLES
    from elbox.data.preprocessing import input_space
    from elbox.evaluation.anomaly import AnomalyScorer, ScoreSettings, applicable_methods
    from elbox.io.checkpoint import load_run

    m, _ = load_run(runs / model)
    x = torch.from_numpy(fashion("test")[0][:n])
    reference = torch.from_numpy(fashion("validation")[0][:n])
    settings = ScoreSettings(iw_samples=OOD_IW_SAMPLES, llr_k=1, binarizations=OOD_BINARIZATIONS)  # elbox ood's
    seconds = {}
    cheap = [k for k in ("likelihood", "complexity", "typicality", "llr") if k in applicable_methods(m)]
    for methods in [[k] for k in applicable_methods(m)] + [cheap]:
        scorer = AnomalyScorer(m, input_space(m), methods, settings)
        scorer.fit_reference(reference[:100])
        start = time.perf_counter()
        scorer.scores(x)
        seconds["+".join(methods)] = (time.perf_counter() - start) * 10_000 / n
        print(f"{'+'.join(methods)}: {seconds['+'.join(methods)]:.0f} s per 10,000 images", flush=True)
    path = RESULTS / f"ood-timing-{model}.json"
    path.write_text(
        json.dumps(
            {
                "model": model,
                "seconds_per_10000": seconds,
                "n_timed": n,
                "threads": torch.get_num_threads(),
                "environment": environment(torch.device("cpu")),
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


def table_data() -> None:
    """A table example: scikit-learn's breast-cancer table (569 rows, 30 columns); a mixture and a VAE fitted on benign
    rows only, the malignant rows the outliers."""
    import tempfile

    import torch
    from sklearn.datasets import load_breast_cancer

    import elbox as lib

    bunch = load_breast_cancer()
    rng = np.random.default_rng(0)
    benign = bunch.data[bunch.target == 1][rng.permutation(int((bunch.target == 1).sum()))]
    malignant = bunch.data[bunch.target == 0]
    train, reference, held = benign[:200], benign[200:270], benign[270:]
    outliers = malignant[rng.permutation(len(malignant))[: len(held)]]
    columns = [name.replace(" ", "_") for name in bunch.feature_names]
    record = {
        "data": f"scikit-learn breast cancer, 30 columns: fitted on {len(train)} benign rows, reference "
        f"{len(reference)} benign, inliers {len(held)} benign, outliers {len(outliers)} malignant",
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, part in (("train", train), ("reference", reference), ("inliers", held), ("outliers", outliers)):
            paths[name] = Path(tmp) / f"{name}.csv"
            paths[name].write_text(
                ",".join(columns) + "\n" + "\n".join(",".join(f"{v:.6g}" for v in r) for r in part) + "\n"
            )
        for model, options in (
            ("mixture", {}),
            ("vae", {"epochs": 200, "latent_dim": 4, "hidden_dims": [64], "likelihood": "gaussian-learned"}),
        ):
            torch.manual_seed(0)
            run = lib.fit(
                model,
                str(paths["train"]),
                out=Path(tmp) / model,
                progress=False,
                verbose=False,
                validation_fraction=0,
                **options,
            )
            result = lib.ood(
                run.directory,
                str(paths["outliers"]),
                inliers=str(paths["inliers"]),
                reference=str(paths["reference"]),
                iw_samples=100,
            )
            result.pop("scores")
            record["models"][model] = result
            print(model, {m: round(v["auroc"], 3) for m, v in result["methods"].items()}, flush=True)
    (RESULTS / "ood-table.json").write_text(json.dumps(record, indent=1))


def table() -> str:
    lines = ["| model | outliers | " + " | ".join(PUBLISHED) + " |", "|---|---|" + "---|" * len(PUBLISHED)]
    for model in MODELS:
        path = RESULTS / f"ood-{model}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        for name, result in record["sets"].items():
            cells = [
                f"{result[m]['auroc']:.3f} ± {result[m]['auroc_stderr']:.3f}" if m in result else "-" for m in PUBLISHED
            ]
            size = f" ({record['n']} per set)" if record.get("n", N) != N else ""
            lines.append(f"| {model}{size} | {name} | " + " | ".join(cells) + " |")
    lines.append("| published (Fashion-MNIST against MNIST) | MNIST | " + " | ".join(PUBLISHED.values()) + " |")
    return "\n".join(lines)


def llr_estimates(model: str, runs: Path, binarizations: int, iw_samples: int, n: int) -> dict:
    """LLR^{>1} of the run against the digits, its inliers and digits as `evaluate` takes them, with `binarizations`
    binarizations and `iw_samples` importance samples instead of elbox ood's 16 and 25: what a finer estimate gains,
    at its cost."""
    import torch
    from bench_vae import environment

    from elbox.data.preprocessing import input_space
    from elbox.evaluation.anomaly import AnomalyScorer, ScoreSettings
    from elbox.evaluation.detection import detection_metrics, examples_of
    from elbox.io.checkpoint import load_run

    m, config = load_run(runs / model)
    settings = ScoreSettings(iw_samples=iw_samples, llr_k=1, binarizations=binarizations)
    scorer = AnomalyScorer(m, input_space(m), ["llr"], settings)
    start = time.perf_counter()
    inliers = scorer.scores(examples_of(m, config, "test", "inliers", n, 0)[0])["llr"]
    outliers = scorer.scores(examples_of(m, config, str(runs / "data" / "digits.npy"), "outliers", n, 0)[0])["llr"]
    record = {
        "model": model,
        "binarizations": binarizations,
        "iw_samples": iw_samples,
        "n_inliers": len(inliers),
        "n_outliers": len(outliers),
        "digits": detection_metrics(inliers, outliers, 200, 0),
        "seconds": time.perf_counter() - start,
        "environment": environment(torch.device("cpu")),
    }
    out = RESULTS / f"ood-llr-{model}-{binarizations}-{iw_samples}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"LLR^>1 AUROC {record['digits']['auroc']:.4f} ± {record['digits']['auroc_stderr']:.4f}; wrote {out}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("data", "train", "evaluate", "timing", "table-data", "table", "llr"))
    parser.add_argument("model", nargs="?", choices=list(MODELS))
    parser.add_argument("--runs", type=Path, default=Path("/root/runs/ood"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=N, help=f"evaluate, llr: examples of each set (default: {N})")
    parser.add_argument("--binarizations", type=int, default=16, help="llr: binarizations of each grey image")
    parser.add_argument("--iw-samples", type=int, default=25, help="llr: importance samples of each bound")
    args = parser.parse_args()
    if args.step in ("train", "evaluate", "timing", "llr") and args.model is None:
        parser.error(f"{args.step} needs a MODEL")
    if args.step == "data":
        make_data(args.runs)
    elif args.step == "train":
        train(args.model, args.runs, args.threads)
    elif args.step == "evaluate":
        evaluate(args.model, args.runs, args.n)
    elif args.step == "timing":
        timing(args.model, args.runs)
    elif args.step == "llr":
        llr_estimates(args.model, args.runs, args.binarizations, args.iw_samples, args.n)
    elif args.step == "table-data":
        table_data()
    else:
        text = table()
        (RESULTS / "ood-table.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
