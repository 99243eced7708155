"""`elbox report RUN_DIR`: one self-contained HTML page (images inlined as PNG data URIs) and a Markdown twin.

It leads with the result: the headline bound(s) with units and standard errors (from the evaluation `elbox evaluate`
saved, RUN_DIR/eval-test.json or else RUN_DIR/eval-validation.json (own data are evaluated on their validation
split), or a quick evaluation of the first test images (own data: validation images) when there is none, and it says
which, with K and the number of examples), the model in one line, the training time, the elbox version and the date.
Then: training curves (the bound and the KL on separate panels); the evaluation table; sample and reconstruction grids
(rows labelled); latent interpolations (models with a decoder); for 2-D latents, a scatter of the encodings of those
images, coloured by label where they have labels; and last, folded, the run's settings.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from elbox import __version__
from elbox.atomic import WRITTEN_BY, atomic_write_bytes, check_replaceable
from elbox.checkpoint import METRICS_FILE, load_run
from elbox.data import load_split, space_from_record
from elbox.data.inputs import as_examples, first, run_data
from elbox.data.user_images import one_line
from elbox.evaluation import evaluate
from elbox.evaluation_table import format_table
from elbox.inference import reconstruction_grid
from elbox.models.base import Encoder, Hierarchical, Reconstructs, SingleLatentDecoder
from elbox.options import short_repr
from elbox.figures import curves_png, grid_png_of, interpolations_png, is_number, scatter_png

QUICK_EVAL_EXAMPLES = 1000
QUICK_EVAL_K = [1, 100]
# the evaluations `elbox evaluate` saves, in the order the report prefers them: a built-in dataset's test split; own
# data (no test split) are evaluated on the run's validation examples
SAVED_EVALUATIONS = ("eval-test.json", "eval-validation.json")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def warn(message: str) -> None:
    """One line on stderr: the report goes on without what the message names."""
    print(f"elbox: warning: {message}", file=sys.stderr)


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
    plotted = {"train": ["elbo", "reconstruction"], "epoch": ["val_elbo", *(k for k in record if k.startswith("val_kl"))]}
    if "step" in record:
        for key in ["step", *(plotted.get(kind, []) if isinstance(kind, str) else [])]:
            if not is_number(record.get(key)):
                return None, f"has a bad {key} ({short_repr(record.get(key), 30)})"
    return record, None


def _records(run_dir: Path) -> list[dict]:
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


def _saved_evaluation(path: Path) -> dict | None:
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


def _saved_ood(path: Path) -> tuple[str, bytes] | None:
    """The text and histograms of the detection `elbox ood` saved at `path` (RUN_DIR/ood.json), or None: when there
    is none, or (with a warning) when it is damaged."""
    from elbox.detection import format_ood_table, ood_figure_png

    if not path.exists():
        return None
    try:
        result = json.loads(path.read_bytes())
        sets = result["sets"]
        text = (f"From {path.name} (elbox ood): outliers {sets['outliers']['data']} ({sets['outliers']['n']}) against "
                f"inliers {sets['inliers']['data']} ({sets['inliers']['n']}); p-values and the typicality's entropy "
                f"from {sets['reference']['data']} ({sets['reference']['n']}). Mean ± bootstrap s.e.; higher scores "
                f"are more unusual.\n\n{format_ood_table(result)}")
        return text, ood_figure_png(result)
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError, IndexError) as e:
        warn(f"{path} is damaged or unreadable ({one_line(e, 60)}); the report leaves out the detection")
        return None


def _full_evaluation(run_dir: Path) -> tuple[Path, dict] | tuple[None, None]:
    """(the path, the result) of the first evaluation of SAVED_EVALUATIONS in run_dir that is there and sound."""
    for path in (run_dir / name for name in SAVED_EVALUATIONS):
        result = _saved_evaluation(path)
        if result is not None:
            return path, result
    return None, None


def evaluated_on(data: dict, kind: str) -> str:
    """What the report evaluates and shows when it draws its own examples, e.g. "test images of mnist" (a built-in
    dataset's test split) or "validation images of /data/faces" (own data have no test split: the run's validation
    examples, held out of its data or from the validation path it was given)."""
    if "name" in data:
        return f"test {kind} of {data['name']}"
    return f"validation {kind} of {data['path'] if 'validation_fraction' in data else data.get('validation', data['path'])}"


def _saved_samples(path: Path) -> bytes | None:
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
        best += f"{result['bpd']:.4f} ± {result['bpd_stderr']:.4f} bits/dim" + ("" if best else f" ({result['bpd_source']})")
    detail = []
    if "elbo" in result:
        detail.append(f"ELBO {_nats(result, 'elbo')} (reconstruction {result['reconstruction']:.2f}, KL {result['kl']:.2f})")
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
        return (f"{len(epochs)} epoch{'s' if len(epochs) > 1 else ''}{steps}, "
                f"{_duration(sum(r['epoch_time_s'] for r in epochs))} of optimization (validation not counted)")
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


@dataclasses.dataclass
class Report:
    """What the page shows, in order: the title; the headline bound and its detail line; facts [(label, text)]
    (where the numbers come from, the model, the training, the data, elbox and the date); sections [(heading, text,
    png bytes or b"")]; the run's settings as JSON (folded at the end). result: the evaluation shown."""

    title: str
    headline: str
    detail: str
    facts: list[tuple[str, str]]
    sections: list[tuple[str, str, bytes]]
    settings: str
    result: dict


def build_report(run_dir: str | Path, device: torch.device, seed: int = 0) -> Report:
    run_dir = Path(run_dir)
    model, config = load_run(run_dir, device)
    data = config["data"]
    if "name" in data:
        images, labels = load_split(data["name"], "test", data.get("data_dir"))
    else:  # your own data: the run's validation examples, unlabelled
        _, val, _ = run_data(data, config.get("train", {}).get("seed", 0))
        images, labels = as_examples(first(val, QUICK_EVAL_EXAMPLES), "validation data"), None
    examples = evaluated_on(data, "images" if images.dim() == 4 else "examples")
    space = space_from_record(data)
    num_dims = math.prod(images.shape[1:])
    x = space.eval_data(images[:QUICK_EVAL_EXAMPLES].to(device), seed=seed)
    eval_path, result = _full_evaluation(run_dir)
    if result is not None:
        ks = ", ".join(map(str, result.get("nll_iw_by_k", {})))
        split = result.get("split", eval_path.stem.removeprefix("eval-"))
        source = (f"from {eval_path.name} (elbox evaluate, the {split} split): {result['n_examples']} examples of "
                  f"{result.get('dataset', 'the ' + split + ' split')}" + (f", K = {ks} importance samples" if ks else ""))
    else:
        result = evaluate(model, x, space.log_prob_offset(num_dims), iw_samples=QUICK_EVAL_K, seed=seed)
        ks = ", ".join(map(str, result.get("nll_iw_by_k", {})))
        source = (f"from a quick evaluation made by elbox report: the first {x.shape[0]:,} {examples}"
                  + (f", K = {ks} importance samples" if ks else "") + "; run elbox evaluate for the full protocol")
    records = _records(run_dir)
    trained = datetime.fromtimestamp((run_dir / "config.json").stat().st_mtime, timezone.utc)
    headline, detail = headline_of(result)
    facts = [("result", source), ("model", model_line(model, config)), ("training", training_line(records)),
             ("data", f"{data.get('name', data.get('path', 'your data'))} [{data.get('space', space.name)}], {num_dims:,} dimensions"),
             ("elbox", f"{__version__}; run started {trained:%Y-%m-%d}, report made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")]
    sections = []
    curves = [r for r in records if "step" in r]  # gradient training (closed-form fits have no steps)
    if curves:
        sections.append(("Training curves", "Per logged step (training batches, the β = 1 ELBO) and per epoch (validation).",
                         curves_png(curves, num_dims * math.log(2))))
    sections.append(("Evaluation", f"Numbers {source}.\n\n{format_table(result)}", b""))
    detection = _saved_ood(run_dir / "ood.json")
    if detection is not None:
        sections.append(("Out-of-distribution detection", *detection))
    saved_samples = _saved_samples(run_dir / "samples.png")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if images.dim() == 4:  # pictures of images (none for vectors)
            grid = saved_samples or grid_png_of(model.sample(64))
            sections.append(("Samples", "Draws from the model (means of p(x|z) for latent-variable models).", grid))
            if isinstance(model, Reconstructs):
                pairs = reconstruction_grid(model, x[:32], nrow=8)
                text = f"Rows alternate: input images ({examples}), then their reconstructions (the means of p(x | E[z|x]))."
                sections.append(("Reconstructions", text, grid_png_of(pairs, nrow=8, row_labels=("input", "reconstruction"))))
            if isinstance(model, SingleLatentDecoder) and not isinstance(model, Hierarchical) and x.shape[0] >= 2:
                sections.append(("Latent interpolations", f"Decoded straight lines between the posterior means of pairs of {examples}.",
                                 interpolations_png(model, x)))
            if isinstance(model, Encoder) and result.get("latent_dim") == 2:
                coloured = ", coloured by class label" if labels is not None else " (unlabelled: one colour)"
                sections.append(("Latent space", f"Posterior means of {examples}{coloured}.",
                                 scatter_png(model, x, None if labels is None else labels[: x.shape[0]])))
    settings = json.dumps({"run_dir": str(run_dir), "model": config["model"], "model_config": config["model_config"],
                           "data": data, "train": config.get("train", {})}, indent=1)
    return Report(title_of(config, run_dir), headline, detail, facts, sections, settings, result)


# The page reports, in <body data-images-loaded="n/m">, how many of its images decoded (checked by the tests).
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
</script>"""


# The page fits the window (no sideways scrolling at 1280 px or less): long words (paths of own data) wrap anywhere,
# images shrink to the column, and the evaluation table and the settings (preformatted) scroll inside their own box.
_STYLE = """<style>
*{box-sizing:border-box;}
body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;overflow-wrap:anywhere;}
h1{font-size:1.4em;margin:0 0 .5em;}
#headline{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin-bottom:1.5em;background:#fafafa;}
#headline .bound{font-size:1.5em;font-weight:bold;margin:.2em 0;}
#headline .detail{margin:.2em 0 .6em;}
#headline th{text-align:left;padding-right:1em;vertical-align:top;color:#555;font-weight:normal;white-space:nowrap;}
table{max-width:100%;border-collapse:collapse;}
pre{background:#f6f6f6;padding:1em;max-width:100%;overflow-x:auto;}
img{max-width:100%;height:auto;image-rendering:pixelated;}
</style>"""


def to_html(report: Report) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta name='generator' content='{WRITTEN_BY}'>"
             f"<title>{e(report.title)}</title>", _STYLE, _IMAGE_CHECK,
             "</head><body>", f"<h1>{e(report.title)}</h1>", "<section id='headline'>",
             f"<p class='bound'>{e(report.headline)}</p>", f"<p class='detail'>{e(report.detail)}</p>",
             "<table>" + "".join(f"<tr><th>{e(label)}</th><td>{e(text)}</td></tr>" for label, text in report.facts) + "</table>",
             "</section>"]
    for heading, text, png in report.sections:
        slug = heading.lower().replace(" ", "-")
        parts.append(f"<h2 id='{slug}'>{e(heading)}</h2><pre>{e(text)}</pre>")
        if png:
            parts.append(f"<img alt='{e(heading)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts += ["<h2 id='run-settings'>Run settings</h2>",
              f"<details><summary>model, data and training settings (config.json)</summary><pre>{e(report.settings)}</pre></details>",
              "</body></html>"]
    return "\n".join(parts)


def image_name(heading: str) -> str:
    """The file name of a section's image beside the Markdown (in report/)."""
    return heading.lower().replace(" ", "-") + ".png"


def to_markdown(report: Report) -> str:
    """The Markdown twin, in the same order; its images are linked as report/NAME.png (write_report writes them)."""
    lines = [f"<!-- generator: {WRITTEN_BY} -->", f"# {report.title}", "", f"**{report.headline}**", "", report.detail, ""]
    lines += [f"- {label}: {text}" for label, text in report.facts] + [""]
    for heading, text, png in report.sections:
        lines += [f"## {heading}", "", "```", text, "```", ""]
        if png:
            lines += [f"![{heading}](report/{image_name(heading)})", ""]
    lines += ["## Run settings", "", "<details><summary>model, data and training settings (config.json)</summary>", "",
              "```json", report.settings, "```", "", "</details>", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, device: torch.device, out: str | Path | None = None, seed: int = 0,
                 overwrite: bool = False) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md with its images in RUN_DIR/report/ (beside
    `out` when given). An image file there that elbox did not write is refused before anything is written, unless
    `overwrite` (elbox.atomic.check_replaceable)."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, device, seed)
    html_path = Path(out) if out else run_dir / "report.html"
    md_path = html_path.with_suffix(".md")
    images = {html_path.parent / "report" / image_name(heading): png for heading, _, png in report.sections if png}
    for path in images:
        check_replaceable(path, overwrite)
    atomic_write_bytes(html_path, to_html(report).encode())
    for path, png in images.items():
        atomic_write_bytes(path, png)
    atomic_write_bytes(md_path, to_markdown(report).encode())
    return html_path, md_path
