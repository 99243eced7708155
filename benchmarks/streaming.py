"""Training from files larger than memory (issue 15): images/s and peak memory of one epoch of the default VAE
streamed from disk, against the same images held in memory. See benchmarks/README.md for what each figure means.

    .venv/bin/python benchmarks/streaming.py [--gb 3] [--pngs 100000] [--steps 4000] [--workers 0 1 2] [--keep]
    .venv/bin/python benchmarks/streaming.py --quick        # tiny sizes, to check the script end to end

(a) A generated .npy of uint8 28x28 images (--gb GiB): one epoch streamed from it (memory-mapped, W DataLoader
    processes) against its first --steps batches in memory, and the DataLoader alone. (b) A folder of --pngs PNG
    files: the same, plus the time to open the folder and to decode one image. Each training run is
    `elbox.fit("vae", DATA, epochs=1, workers=W)` in a fresh process, which reports its own peak memory. Writes
    results/streaming_<cpu>_<date>.json and .md; the data go under --dir and are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import ClassVar

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import DataLoader

import elbox
from elbox.core.system import keep_freed_memory_in_heap, set_threads
from elbox.data import load_split
from elbox.data.user_arrays import ImageArray
from elbox.data.user_images import ImageFolder
from elbox.io.run_config import train_config

RESULTS = Path(__file__).resolve().parent / "results"
SIDE, PER_FOLDER, VALIDATION_IMAGES = 28, 1000, 2000
TARGET_MEMORY_GB, TARGET_RATIO = 1.5, 0.8
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

# -- generating the data ---------------------------------------------------------------------------------------


def augmented(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random images of `base`, each flipped left-right with probability 1/2 and shifted by -2..2 pixels in
    each direction (zeros shifted in)."""
    out = base[rng.integers(0, len(base), n)]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    padded = np.pad(out, ((0, 0), (2, 2), (2, 2)))
    dy, dx = rng.integers(0, 5, (2, n))
    for sy in range(5):
        for sx in range(5):
            moved = (dy == sy) & (dx == sx)
            out[moved] = padded[moved, sy : sy + SIDE, sx : sx + SIDE]
    return out


def write_array(path: Path, n: int, base: np.ndarray, seed: int, chunk: int = 1 << 16) -> float:
    """A .npy file of n uint8 [28, 28] images, written chunk by chunk and synced to disk; returns the seconds."""
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, SIDE, SIDE)})
        f.writelines(augmented(base, min(chunk, n - first), rng).tobytes() for first in range(0, n, chunk))
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def read_first(path: Path, n: int) -> np.ndarray:
    """The first n images of a .npy file written by write_array, read into memory (not mapped)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return np.fromfile(f, np.uint8, n * SIDE * SIDE).reshape(n, SIDE, SIDE)


def write_pngs(folder: Path, images: np.ndarray) -> float:
    """Each image as folder/NNNNN/NNNNNNN.png, 1000 per subfolder, synced to disk; returns the seconds."""
    start = time.perf_counter()
    for i, image in enumerate(images):
        sub = folder / f"{i // PER_FOLDER:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:07d}.png")
    os.sync()
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop the file's (or every file under the folder's) pages from the page cache, so that the next reads come
    from the disk (posix_fadvise DONTNEED: clean pages that no process maps). Directory entries and inodes stay."""
    files = [path] if path.is_file() else [Path(d, f) for d, _, names in os.walk(path) for f in names]
    for file in files:
        os.posix_fadvise(fd := os.open(file, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


# -- measuring ------------------------------------------------------------------------------------------------


def cpu_times() -> tuple[float, float, float]:
    """(wall s, busy CPU s of the whole machine with stolen time, CPU s of this process and its finished children)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    t = os.times()
    return (
        time.perf_counter(),
        (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"),  # not idle, iowait
        t.user + t.system + t.children_user + t.children_system,
    )


def others_share(before: tuple, after: tuple) -> float:
    """Share of all CPUs that other processes (and the hypervisor) used between two cpu_times()."""
    wall, busy, own = (b - a for a, b in zip(before, after))
    return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (DataLoader workers), from /proc/PID/task/TID/children."""
    pids = [pid]
    for p in pids:  # grows while it is walked: breadth first
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += map(int, children.read_text().split())
    return pids


class PeakMemory(threading.Thread):
    """Samples, every `every` s, the PSS (proportional set size: a page shared by k processes counts 1/k in each)
    summed over this process and its descendants; keeps the largest sample with its anonymous, file-backed (the
    memory-mapped data, libraries) and shared-memory (batches from workers) parts, in GiB."""

    KEYS: ClassVar = {
        "Pss": "pss_gb",
        "Pss_Anon": "pss_anon_gb",
        "Pss_File": "pss_file_gb",
        "Pss_Shmem": "pss_shmem_gb",
    }

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.done, self.peak = every, threading.Event(), dict.fromkeys(self.KEYS.values(), 0.0)

    def run(self) -> None:
        while not self.done.wait(self.every):
            sample = dict.fromkeys(self.KEYS.values(), 0.0)
            for pid in process_tree(os.getpid()):
                try:
                    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                except OSError:
                    continue  # a worker that just ended
                for key, _, value in (line.partition(":") for line in lines):
                    if key in self.KEYS:
                        sample[self.KEYS[key]] += int(value.split()[0]) / 2**20
            if sample["pss_gb"] > self.peak["pss_gb"]:
                self.peak = sample


def train_one_epoch(spec: dict) -> dict:
    """One epoch of the default VAE on spec's data (a path streamed by spec["workers"] processes, or its first
    spec["first"] images in memory): images/s, epoch seconds and peak memory. Runs in a fresh process."""
    keep_freed_memory_in_heap()  # as `elbox train` starts
    threads = set_threads(None)
    data = (
        torch.from_numpy(read_first(Path(spec["path"]), spec["first"])).unsqueeze(1) if spec["first"] else spec["path"]
    )
    records: list[dict] = []
    (memory := PeakMemory()).start()
    before = cpu_times()
    run = elbox.fit(
        "vae",
        data,
        validation=spec["validation"],
        epochs=1,
        workers=spec["workers"],
        progress=False,
        verbose=False,
        callback=records.append,
    )
    after = cpu_times()
    memory.done.set()
    memory.join()
    epoch, gb = records[-1], lambda who: resource.getrusage(who).ru_maxrss / 2**20  # KiB on Linux
    return {
        "images_per_s": epoch["images_per_s"],
        "epoch_time_s": epoch["epoch_time_s"],
        "steps": epoch["step"],
        "val_elbo": epoch["val_elbo"],
        "fit_s": after[0] - before[0],
        "threads": threads,
        "device": str(run.model.device),
        "peak_rss_trainer_gb": gb(resource.RUSAGE_SELF),
        "peak_rss_largest_child_gb": gb(resource.RUSAGE_CHILDREN),
        **memory.peak,
        "cpu_others": others_share(before, after),
    }


def in_fresh_process(label: str, **spec) -> dict:
    """train_one_epoch(spec) in a new Python process: its result with the spec, or {"failed": exit code}."""
    print(f"  {label}, {spec['workers']} workers ...", end=" ", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        code = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec), "--json", f.name], check=False
        ).returncode
        result = json.loads(Path(f.name).read_text()) if code == 0 else {"failed": code}
    print(
        f"{result['images_per_s']:,.0f} images/s, peak PSS {result['pss_gb']:.2f} GB"
        if code == 0
        else f"FAILED ({code})",
        flush=True,
    )
    return {"run": label, **spec, **result}


def loader_alone(dataset, workers: int, batch: int, max_steps: int) -> dict:
    """Images/s of the DataLoader alone, no model: shuffled batches as training reads them, for one epoch or
    max_steps batches (worker start-up included)."""
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )
    images, before = 0, cpu_times()
    for step, batch_images in enumerate(loader, 1):
        images += len(batch_images)
        if step >= max_steps:
            break
    after = cpu_times()  # the loop's iterator, and with it the workers, ended with the loop
    return {
        "workers": workers,
        "images": images,
        "images_per_s": images / (after[0] - before[0]),
        "cpu_others": others_share(before, after),
    }


def open_folder_time(folder: Path) -> tuple[ImageFolder, float]:
    """elbox's ImageFolder on the folder and the seconds it took to open it (list it, read every header), from a
    cold page cache."""
    evict(folder)
    start = time.perf_counter()
    return ImageFolder(folder), time.perf_counter() - start


def decode_time(folder: ImageFolder, count: int = 5000) -> dict:
    """Microseconds per image in this process over `count` random files (in the page cache), the faster of two
    rounds: Pillow alone (open, convert to 8-bit gray, to an array) and elbox's ImageFolder item (the same, its
    checks, a tensor)."""
    picked = np.random.default_rng(0).choice(len(folder), min(count, len(folder)), replace=False).tolist()

    def pil(i):
        with Image.open(folder.path / folder.names[i]) as image:
            return np.asarray(image.convert("L"))

    def best_us(decode) -> float:
        return 1e6 * min(timeit.repeat(lambda: [decode(i) for i in picked], number=1, repeat=2)) / len(picked)

    return {"images": len(picked), "pil_us": best_us(pil), "item_us": best_us(folder.__getitem__)}


def measure(
    source: Path, open_dataset, memory_path: Path, memory_images: int, validation: Path, args, batch: int
) -> dict:
    """Training in memory, streamed with each worker count, in memory again (each in a fresh process); then the
    DataLoader alone with each worker count, on a dataset opened afresh (no pages of the file stay mapped here,
    which would keep them in the page cache)."""
    memory = {"path": str(memory_path), "first": memory_images, "workers": 0, "validation": str(validation)}
    runs = [in_fresh_process("in memory", **memory)]
    for w in args.workers:
        evict(source)
        runs.append(in_fresh_process("streamed", path=str(source), first=None, workers=w, validation=str(validation)))
    if not args.quick:
        runs.append(in_fresh_process("in memory, again", **memory))
    reference = max((r["images_per_s"] for r in runs if r["first"] and "failed" not in r), default=float("nan"))
    for r in (r for r in runs if "failed" not in r):  # the memory target: the trainer's RSS or all processes' PSS
        r.update(vs_memory=r["images_per_s"] / reference, peak_memory_gb=max(r["peak_rss_trainer_gb"], r["pss_gb"]))
    loaders = []
    for w in args.workers:
        if source.is_file():  # a folder's files are in the page cache since the scan that opened it, as in training
            evict(source)
        loaders.append(loader_alone(open_dataset(), w, batch, args.steps))
        print(f"  DataLoader alone, {w} workers: {loaders[-1]['images_per_s']:,.0f} images/s", flush=True)
    return {"training": runs, "memory_images_per_s": reference, "loader_alone": loaders}


# -- report ---------------------------------------------------------------------------------------------------


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE) or ["", ""])[1].split())
    cpu, cores = model.group(1).strip() if model else "unknown cpu", len(os.sched_getaffinity(0))
    return {
        "cpu": cpu,
        "cores": cores,
        "slug": re.sub(r"[^a-z0-9]+", "-", f"{cpu}-{cores}c".lower()).strip("-"),
        "flags": [f for f in SPEED_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": sys.version.split()[0],
    }


def run_rows(runs: list[dict]) -> list[str]:
    lines = [
        (
            "| run | workers | steps | images/s | × in memory | epoch (s) | peak RSS, trainer (GB) | peak RSS, largest "
            "worker (GB) | peak PSS, all processes (GB): anon + file + shm | other CPU use |"
        ),
        "|---" * 10 + "|",
    ]
    for r in runs:
        if "failed" in r:
            lines.append(f"| {r['run']} | {r['workers']} | failed (exit code {r['failed']}) |" + " |" * 7)
            continue
        worker = f"{r['peak_rss_largest_child_gb']:.2f}" if r["workers"] else "–"
        lines.append(
            f"| {r['run']} | {r['workers']} | {r['steps']:,} | {r['images_per_s']:,.0f} | {r['vs_memory']:.2f} | "
            f"{r['epoch_time_s']:.1f} | {r['peak_rss_trainer_gb']:.2f} | {worker} | **{r['pss_gb']:.2f}**: "
            f"{r['pss_anon_gb']:.2f} + {r['pss_file_gb']:.2f} + {r['pss_shmem_gb']:.2f} | {r['cpu_others']:.0%} |"
        )
    return lines


def markdown(result: dict) -> str:
    m, p, a, b = result["machine"], result["parameters"], result["array"], result["pngs"]
    streamed = [r for r in a["training"] if not r["first"] and "failed" not in r]
    lines = [
        f"# Streaming from disk (issue 15): {m['cpu']}, {m['cores']} cores, {result['date']}",
        "",
        (
            f"CPU flags: {', '.join(m['flags']) or 'none of ' + ', '.join(SPEED_FLAGS)} (PyTorch CPU capability "
            f"{m['cpu_capability']}); torch {m['torch']}, numpy {m['numpy']}, Pillow {m['pillow']}; "
            f"{result['threads']} "
            f"threads; device {a['training'][0].get('device', '?')}. Command: `{result['command']}`."
        ),
        "",
        (
            f'Each training run: `elbox.fit("vae", DATA, epochs=1, workers=W)` (the default VAE, batch {p["batch"]}; '
            f"validation on {VALIDATION_IMAGES:,} other images, not in images/s) in a fresh process. The data files' "
            "pages are dropped from the page cache before each streamed run. × in memory divides by the faster "
            "in-memory run. Peak PSS: sampled every 0.25 s over the trainer and its workers, shared pages counted "
            "once; its file part is mostly the memory-mapped data (page cache the kernel can reclaim)."
        ),
        "",
        f"## (a) Array file: {a['file_gb']:.2f} GiB, {a['images']:,} images (written in {a['write_s']:.0f} s)",
        "",
        *run_rows(a["training"]),
        "",
        "DataLoader alone (no model; one epoch or --steps batches, cold page cache): "
        + ", ".join(f"workers={x['workers']} {x['images_per_s']:,.0f} images/s" for x in a["loader_alone"])
        + ".",
        "",
    ]
    if streamed:
        worst = max(streamed, key=lambda r: r["peak_memory_gb"])
        best = max(streamed, key=lambda r: r["vs_memory"])
        lines += [
            (
                f"Target: peak memory < {TARGET_MEMORY_GB} GB (the larger of the trainer's RSS and the PSS of all "
                f"processes): worst streamed run {worst['peak_memory_gb']:.2f} GB (workers={worst['workers']}), "
                f"**{'met' if worst['peak_memory_gb'] < TARGET_MEMORY_GB else 'not met'}**. Target: streaming ≥ "
                f"{TARGET_RATIO:.0%} of in-memory images/s: best {best['vs_memory']:.0%} (workers={best['workers']}), "
                f"**{'met' if best['vs_memory'] >= TARGET_RATIO else 'not met'}**."
            ),
            "",
        ]
    d = b["decode"]
    lines += [
        f"## (b) PNG folder: {b['files']:,} files, {PER_FOLDER} per subfolder (written in {b['write_s']:.0f} s)",
        "",
        *run_rows(b["training"]),
        "",
        "Where the time goes:",
        "",
        "| step | time | images/s |",
        "|---|---|---|",
        (
            f"| open the folder (list it, read every header; cold cache) | {b['open_s']:.1f} s, "
            f"{1e6 * b['open_s'] / b['files']:.0f} µs a file | {b['files'] / b['open_s']:,.0f} |"
        ),
        f"| decode one image in one process: Pillow alone | {d['pil_us']:.0f} µs | {1e6 / d['pil_us']:,.0f} |",
        f"| decode one image in one process: ImageFolder item | {d['item_us']:.0f} µs | {1e6 / d['item_us']:,.0f} |",
        *[f"| DataLoader alone, workers={x['workers']} | | {x['images_per_s']:,.0f} |" for x in b["loader_alone"]],
        f"| training alone, in memory | | {b['memory_images_per_s']:,.0f} |",
        *[
            f"| training streamed, workers={r['workers']} | | {r['images_per_s']:,.0f} |"
            for r in b["training"]
            if not r["first"] and "failed" not in r
        ],
        "",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0, help="GiB of images in the array file (default 3)")
    parser.add_argument("--pngs", type=int, default=100_000, help="PNG files in the folder (default 100000)")
    parser.add_argument("--steps", type=int, default=4000, help="most batches of a reference or loader run (4000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader processes to try")
    parser.add_argument("--quick", action="store_true", help="0.01 GiB, 2000 PNGs, 50 steps, no repeated reference")
    parser.add_argument("--dir", default="/tmp", help="where to put the generated data (in a new folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--out", default=None, help="JSON path (default results/streaming_<cpu>_<date>.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.json).write_text(json.dumps(train_one_epoch(json.loads(args.child))))
        return 0
    if args.quick:
        args.gb, args.pngs, args.steps = 0.01, 2000, 50
    batch, n = train_config("vae").batch_size, int(args.gb * 2**30) // (SIDE * SIDE)
    if not batch <= args.pngs <= n:
        parser.error(f"--pngs must be between one batch ({batch}) and the array's {n:,} images")
    keep_freed_memory_in_heap()
    info, threads, date = machine(), set_threads(None), datetime.date.today().isoformat()
    root = Path(tempfile.mkdtemp(prefix="elbox-streaming-", dir=args.dir))
    array, validation, folder = root / "images.npy", root / "validation.npy", root / "pngs"
    try:
        base = load_split("fashion-mnist", "train")[0][:, 0].numpy()
        print(f"writing {n:,} images ({n * SIDE * SIDE / 2**30:.2f} GiB) to {array} ...", flush=True)
        write_s = write_array(array, n, base, seed=0)
        write_array(validation, VALIDATION_IMAGES, base, seed=1)
        print(f"writing {args.pngs:,} PNG files to {folder} ...", flush=True)
        png_write_s = write_pngs(folder, read_first(array, args.pngs))
        print("(a) array file", flush=True)
        a = {
            "images": n,
            "file_gb": array.stat().st_size / 2**30,
            "write_s": write_s,
            **measure(array, lambda: ImageArray(array), array, min(n, args.steps * batch), validation, args, batch),
        }
        print("(b) PNG folder", flush=True)
        opened, open_s = open_folder_time(folder)
        b = {
            "files": args.pngs,
            "write_s": png_write_s,
            "open_s": open_s,
            "decode": decode_time(opened),
            **measure(folder, lambda: opened, array, args.pngs, validation, args, batch),
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result = {
        "date": date,
        "machine": info,
        "threads": threads,
        "command": "python benchmarks/streaming.py " + " ".join(sys.argv[1:]),
        "parameters": {
            "gb": args.gb,
            "pngs": args.pngs,
            "steps": args.steps,
            "workers": args.workers,
            "batch": batch,
            "validation_images": VALIDATION_IMAGES,
            "quick": args.quick,
            "data_dir": str(root),
            "kept": args.keep,
        },
        "array": a,
        "pngs": b,
    }
    out = Path(args.out or RESULTS / f"streaming_{info['slug']}_{date}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table := markdown(result))
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}" + (f"; data kept in {root}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
