"""`elbox report RUN_DIR`: one self-contained HTML page (images inlined as PNG data URIs) and a Markdown twin.

Contents: the run's model and settings; training curves (ELBO terms per logged step, the validation bound per
epoch); the evaluation table (from RUN_DIR/eval-test.json, or a quick evaluation of the first test images when
there is none, said so on the page); sample and reconstruction grids; latent interpolations (models with a
decoder); and, for 2-D latents, a scatter of test encodings coloured by label.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path

import torch

from elbox.atomic import atomic_write_bytes
from elbox.checkpoint import METRICS_FILE, load_run
from elbox.data import load_split, space_from_record
from elbox.data.inputs import as_examples, first, run_data
from elbox.data.user_images import one_line
from elbox.evaluation import evaluate, format_table
from elbox.models.base import Encoder, Hierarchical, Reconstructs, SingleLatentDecoder
from elbox.options import short_repr
from elbox.plots import image_grid

QUICK_EVAL_EXAMPLES = 1000
QUICK_EVAL_K = [1, 100]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _grid_png(images: torch.Tensor, nrow: int | None = None) -> bytes:
    buffer = io.BytesIO()
    image_grid(images.clamp(0, 1).cpu(), nrow=nrow).save(buffer, format="PNG")
    return buffer.getvalue()


def curves_png(records: list[dict], bits: float) -> bytes:
    """Training ELBO terms per logged step and the validation ELBO per epoch, in nats and bits/dim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [-r["elbo"] for r in train], label="-ELBO (training batches)", alpha=0.7)
        ax.plot(steps, [-r["reconstruction"] for r in train], label="-reconstruction", alpha=0.7)
    ax.plot([r["step"] for r in epochs], [-r["val_elbo"] for r in epochs], "o-", label="-ELBO (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per example")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key in sorted({k for r in epochs for k in r if k.startswith("val_kl")}):
        ax.plot([r["step"] for r in epochs], [r.get(key, math.nan) / bits for r in epochs], "o-", label=key[4:])
    ax.plot([r["step"] for r in epochs], [-r["val_elbo"] / bits for r in epochs], "o-", label="-ELBO")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per dimension (validation)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


@torch.no_grad()
def interpolations_png(model, x: torch.Tensor, pairs: int = 4, steps: int = 8) -> bytes:
    """Decodings of z = (1 - a) E[z|x_i] + a E[z|x_j] for a in [0, 1], one row per pair of test images."""
    z = model.encode(x[: 2 * pairs])
    a = torch.linspace(0, 1, steps, device=z.device)[None, :, None]
    path = (1 - a) * z[0::2, None] + a * z[1::2, None]  # [pairs, steps, d]
    images = model.likelihood.mean(model.decode(path.reshape(-1, z.shape[-1])))
    return _grid_png(images, nrow=steps)


@torch.no_grad()
def scatter_png(model, x: torch.Tensor, labels: torch.Tensor) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = model.encode(x).cpu()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    points = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu(), cmap="tab10", s=4, alpha=0.7)
    fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel("E[z_1 | x]")
    ax.set_ylabel("E[z_2 | x]")
    ax.set_title("test encodings (posterior means)")
    fig.tight_layout()
    return _png(fig)


def warn(message: str) -> None:
    """One line on stderr: the report goes on without what the message names."""
    print(f"elbox: warning: {message}", file=sys.stderr)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
            if not _is_number(record.get(key)):
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
    instead = "the report makes a quick evaluation instead"
    try:
        text = path.read_bytes()
    except OSError as e:
        warn(f"cannot read {path} ({e.strerror or e}); {instead}")
        return None
    try:
        result = json.loads(text)
        format_table(result)
        return result
    except (ValueError, RecursionError, TypeError, KeyError, AttributeError, IndexError) as e:
        warn(f"{path} is damaged ({one_line(e, 60)}); {instead}")
        return None


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


def build_report(run_dir: str | Path, device: torch.device, seed: int = 0) -> tuple[str, list[tuple[str, str, bytes]], dict]:
    """(title, sections [(heading, text, png bytes or b"")], evaluation result) for a run."""
    run_dir = Path(run_dir)
    model, config = load_run(run_dir, device)
    data = config["data"]
    if "name" in data:
        images, labels = load_split(data["name"], "test", data.get("data_dir"))
    else:  # your own data: the run's validation examples, unlabelled
        _, val, _ = run_data(data, config.get("train", {}).get("seed", 0))
        images = as_examples(first(val, QUICK_EVAL_EXAMPLES), "validation data")
        labels = torch.zeros(images.shape[0], dtype=torch.long)
    space = space_from_record(data)
    num_dims = math.prod(images.shape[1:])
    x = space.eval_data(images[:QUICK_EVAL_EXAMPLES].to(device), seed=seed)
    eval_path = run_dir / "eval-test.json"
    result = _saved_evaluation(eval_path)
    if result is not None:
        source = f"from {eval_path.name} (elbox evaluate)"
    else:
        result = evaluate(model, x, space.log_prob_offset(num_dims), iw_samples=QUICK_EVAL_K, seed=seed)
        source = (f"a quick evaluation of the first {x.shape[0]} test images with K = {QUICK_EVAL_K} made by elbox report; "
                  "run elbox evaluate for the full protocol")
    sections = []
    records = [r for r in _records(run_dir) if "step" in r]  # gradient training (closed-form fits have no steps)
    if records:
        sections.append(("Training curves", "Per logged step (training batches, the β = 1 ELBO) and per epoch (validation).",
                         curves_png(records, num_dims * math.log(2))))
    sections.append(("Evaluation", f"{source}\n\n{format_table(result)}", b""))
    saved_samples = _saved_samples(run_dir / "samples.png")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if images.dim() == 4:  # pictures of images (none for vectors)
            grid = saved_samples or _grid_png(model.sample(64))
            sections.append(("Samples", "Draws from the model (means of p(x|z) for latent-variable models).", grid))
            if isinstance(model, Reconstructs):
                pairs = torch.cat([t for i in range(0, 32, 8) for t in (x[i : i + 8], model.reconstruct(x[i : i + 8]))])
                sections.append(("Reconstructions", "Rows alternate: test images, then the means of p(x | E[z|x]).", _grid_png(pairs, nrow=8)))
            if isinstance(model, SingleLatentDecoder) and not isinstance(model, Hierarchical):  # one latent
                sections.append(("Latent interpolations", "Decoded straight lines between the posterior means of pairs of test images.",
                                 interpolations_png(model, x)))
            if isinstance(model, Encoder) and result.get("latent_dim") == 2:
                sections.append(("Latent space", "Posterior means of test images, coloured by class label.",
                                 scatter_png(model, x, labels[: x.shape[0]])))
    title = title_of(config, run_dir)
    settings = json.dumps({"model": config["model"], "model_config": config["model_config"], "train": config.get("train", {})}, indent=1)
    sections.insert(0, ("Run", f"Run directory: {run_dir}\n\n{settings}", b""))
    return title, sections, result


# The page reports, in <body data-images-loaded="n/m">, how many of its images decoded (checked by the tests).
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const ok = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
</script>"""


def to_html(title: str, sections: list[tuple[str, str, bytes]]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;} pre{background:#f6f6f6;padding:1em;"
             "overflow-x:auto;} img{max-width:100%;image-rendering:pixelated;}</style>", _IMAGE_CHECK, "</head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, text, png in sections:
        slug = heading.lower().replace(" ", "-")
        parts.append(f"<h2 id='{slug}'>{html.escape(heading)}</h2><pre>{html.escape(text)}</pre>")
        if png:
            parts.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, device: torch.device, out: str | Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md with its images in RUN_DIR/report/."""
    run_dir = Path(run_dir)
    title, sections, _ = build_report(run_dir, device, seed)
    html_path = Path(out) if out else run_dir / "report.html"
    atomic_write_bytes(html_path, to_html(title, sections).encode())
    image_dir = html_path.parent / "report"
    lines = [f"# {title}", ""]
    for heading, text, png in sections:
        lines += [f"## {heading}", "", "```", text, "```", ""]
        if png:
            name = heading.lower().replace(" ", "-") + ".png"
            atomic_write_bytes(image_dir / name, png)
            lines += [f"![{heading}](report/{name})", ""]
    md_path = html_path.with_suffix(".md")
    atomic_write_bytes(md_path, "\n".join(lines).encode())
    return html_path, md_path
