"""Speed on a busy machine (issue 17): images/s of the default VAE alone, beside other elbox training runs, and
streaming from disk with DataLoader workers, under each thread and wait policy.

    .venv/bin/python benchmarks/contention.py [--policies before elbox] [--others 0 1 2 4] [--seconds 20]
    .venv/bin/python benchmarks/contention.py --quick      # 5 s windows, fewer runs: checks the script end to end

(a)+(b) For each policy and each number of other runs N: 1 + N training processes start, build the default VAE
    on Fashion-MNIST in memory (as `elbox train` does: keep_freed_memory_in_heap, set_threads(--threads)), take
    three warm-up steps, wait for one another, then all train for --seconds at once. Each reports its images/s
    over that common window (Trainer.training_step with the per-step logging sync); the total is their sum.
(c) For each policy: one `elbox.fit("vae", FILE.npy, epochs=1, workers=W)` epoch streamed from a generated .npy
    (cold page cache) against the same images in memory, W = 0, 1, 2.

Policies are environments for the child processes, set before they import torch:
    before   the defaults elbox had before issue 17: libgomp's own spin-wait (GOMP_SPINCOUNT=300000, which is
             what libgomp uses when OMP_WAIT_POLICY is unset) and one thread per core (--threads CORES);
    elbox    nothing set: what elbox chooses when it is imported (elbox.core.threads: GOMP_SPINCOUNT=1000);
    passive  OMP_WAIT_POLICY=PASSIVE, one thread per core;  one-thread  --threads 1, libgomp's default wait;
    spin-N   GOMP_SPINCOUNT=N (a waiting thread spins N times, then sleeps), one thread per core.
Writes results/contention_<cpu>-<cores>c_<date>.json and .md.
"""

# ruff: noqa: I001  (elbox is imported before torch on purpose)
from __future__ import annotations

import elbox  # first: elbox's thread policy must reach the environment before torch loads

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from elbox.data import load_split
from elbox.core.system import keep_freed_memory_in_heap, set_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import batches, build_trainer, step  # noqa: E402  (the suite's training-step timing)
from streaming import cpu_times, evict, machine, others_share, read_first, write_array  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CORES = len(os.sched_getaffinity(0))
POLICIES = {  # name: (environment for the child, --threads)
    "before": ({"GOMP_SPINCOUNT": "300000"}, CORES),
    "elbox": ({}, None),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, CORES),
    "one-thread": ({"GOMP_SPINCOUNT": "300000"}, 1),
    **{f"spin-{n}": ({"GOMP_SPINCOUNT": str(n)}, CORES) for n in (1000, 10000, 30000, 100000)},
}
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "ELBOX_THREAD_POLICY")
STREAM_IMAGES = 300_000


# -- children -------------------------------------------------------------------------------------------------


def train_together(spec: dict) -> dict:
    """One training process of a concurrent group: build, warm up, say ready, wait for the go file, train for
    spec["seconds"]; images/s over that window."""
    keep_freed_memory_in_heap()
    threads = set_threads(spec["threads"])
    images = load_split("fashion-mnist", "train")[0]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer("vae", images, images[:1000], torch.device("cpu"), run_dir)
        data = batches(trainer)
        for _ in range(3):
            step(trainer, next(data))
        Path(spec["ready"]).touch()
        while not Path(spec["go"]).exists():
            time.sleep(0.01)
        steps, before = 0, cpu_times()
        while steps < 3 or time.perf_counter() - before[0] < spec["seconds"]:
            step(trainer, next(data))
            steps += 1
        after = cpu_times()
    seconds = after[0] - before[0]
    return {
        "threads": threads,
        "steps": steps,
        "seconds": seconds,
        "images_per_s": steps * trainer.config.batch_size / seconds,
        "cpu_s": after[2] - before[2],
    }


def stream_epoch(spec: dict) -> dict:
    """One epoch of elbox.fit on the .npy (streamed by spec["workers"] processes) or its images in memory."""
    keep_freed_memory_in_heap()
    threads = set_threads(spec["threads"])
    data = (
        torch.from_numpy(read_first(Path(spec["path"]), spec["images"])).unsqueeze(1)
        if spec["in_memory"]
        else spec["path"]
    )
    records: list[dict] = []
    before = cpu_times()
    elbox.fit(
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
    return {"threads": threads, "images_per_s": records[-1]["images_per_s"], "cpu_others": others_share(before, after)}


# -- the parent -----------------------------------------------------------------------------------------------


def child_environment(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    return {**env, **POLICIES[policy][0]}


def start_child(kind: str, spec: dict, policy: str, out: Path) -> subprocess.Popen:
    spec = {**spec, "threads": POLICIES[policy][1]}
    return subprocess.Popen(
        [sys.executable, __file__, "--child", kind, json.dumps(spec), str(out)], env=child_environment(policy)
    )


def finished(process: subprocess.Popen, out: Path) -> dict:
    code = process.wait()
    return json.loads(out.read_text()) if code == 0 else {"failed": code}


def concurrent_runs(policy: str, others: int, seconds: float, work: Path) -> dict:
    """1 + others training processes over one common window: each one's images/s, and the total."""
    go = work / "go"
    go.unlink(missing_ok=True)
    runs = []
    for i in range(1 + others):
        ready = work / f"ready-{i}"
        ready.unlink(missing_ok=True)
        spec = {"ready": str(ready), "go": str(go), "seconds": seconds}
        runs.append((start_child("together", spec, policy, work / f"out-{i}.json"), ready, work / f"out-{i}.json"))
    while not all(ready.exists() for _, ready, _ in runs) and all(p.poll() is None for p, _, _ in runs):
        time.sleep(0.05)
    before = cpu_times()
    go.touch()
    results = [finished(p, out) for p, _, out in runs]
    rates = [r.get("images_per_s", 0.0) for r in results]
    total = sum(rates)
    print(
        f"  {policy:>10}, {1 + others} run(s): {total:8,.0f} images/s in total, per run "
        + " ".join(f"{r:,.0f}" for r in rates),
        flush=True,
    )
    return {
        "policy": policy,
        "others": others,
        "runs": results,
        "total_images_per_s": total,
        "wall_s": cpu_times()[0] - before[0],
    }


def streaming_runs(
    policy: str, workers: list[int], path: Path, validation: Path, images: int, work: Path
) -> list[dict]:
    out = []
    for w in [None, *workers]:
        if w is not None:
            evict(path)
        spec = {
            "path": str(path),
            "validation": str(validation),
            "images": images,
            "in_memory": w is None,
            "workers": w or 0,
        }
        result = finished(start_child("stream", spec, policy, work / "stream.json"), work / "stream.json")
        out.append({"policy": policy, "workers": w, **result})
        label = "in memory" if w is None else f"streamed, {w} workers"
        print(f"  {policy:>10}, {label}: {result.get('images_per_s', float('nan')):,.0f} images/s", flush=True)
    memory = out[0].get("images_per_s", float("nan"))
    for r in out:
        r["vs_memory"] = r.get("images_per_s", float("nan")) / memory
    return out


def markdown(result: dict) -> str:
    m, p = result["machine"], result["parameters"]
    alone = {r["policy"]: r["total_images_per_s"] for r in result["concurrent"] if r["others"] == 0}
    lines = [
        f"# Training on a busy machine (issue 17): {m['cpu']}, {m['cores']} cores, {result['date']}",
        "",
        f"CPU flags: {', '.join(m['flags']) or 'none listed'}; torch {m['torch']}. Command: `{result['command']}`.",
        "",
        f"(a)+(b) The default VAE (Fashion-MNIST in memory, batch 128), 1 + N processes training at once for "
        f"{p['seconds']:g} s after a common start. Images/s per run and in total; × alone divides the total by the "
        "same policy's single run, × before by the `before` policy's single run.",
        "",
        "| policy | runs | total images/s | × alone | × before alone | per run |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["concurrent"]:
        rates = [x.get("images_per_s", 0.0) for x in r["runs"]]
        lines.append(
            f"| {r['policy']} | {1 + r['others']} | {r['total_images_per_s']:,.0f} | "
            f"{r['total_images_per_s'] / alone[r['policy']]:.2f} | "
            f"{r['total_images_per_s'] / alone.get('before', float('nan')):.2f} | "
            + ", ".join(f"{x:,.0f}" for x in rates)
            + " |"
        )
    lines += [
        "",
        f"(c) One epoch streamed from a .npy of {p['stream_images']:,} images (cold page cache) against the same "
        "images in memory; `elbox.fit(..., workers=W)`.",
        "",
        "| policy | data | images/s | × in memory | other CPU use |",
        "|---|---|---|---|---|",
    ]
    for r in result["streaming"]:
        data = "in memory" if r["workers"] is None else f"streamed, {r['workers']} workers"
        lines.append(
            f"| {r['policy']} | {data} | {r.get('images_per_s', float('nan')):,.0f} | {r['vs_memory']:.2f} | "
            f"{r.get('cpu_others', float('nan')):.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES), default=["before", "elbox"])
    parser.add_argument("--others", type=int, nargs="+", default=[0, 1, 2, 4], help="other runs beside one (0 1 2 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="common training window (default 20)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader processes for (c)")
    parser.add_argument("--no-streaming", action="store_true", help="skip (c)")
    parser.add_argument("--quick", action="store_true", help="5 s windows, 0 and 2 others, 40,000 streamed images")
    parser.add_argument("--out", default=None, help="JSON path (default results/contention_<cpu>_<date>.json)")
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec, out = args.child
        Path(out).write_text(json.dumps((train_together if kind == "together" else stream_epoch)(json.loads(spec))))
        return 0
    if args.quick:
        args.seconds, args.others = 5.0, [0, 2]
    stream_images = 40_000 if args.quick else STREAM_IMAGES
    info, date = machine(), datetime.date.today().isoformat()
    result = {
        "date": date,
        "machine": info,
        "command": "python benchmarks/contention.py " + " ".join(sys.argv[1:]),
        "parameters": {
            "policies": args.policies,
            "others": args.others,
            "seconds": args.seconds,
            "workers": args.workers,
            "stream_images": stream_images,
            "policy_environments": {k: POLICIES[k][0] for k in args.policies},
            "policy_threads": {k: POLICIES[k][1] for k in args.policies},
        },
        "concurrent": [],
        "streaming": [],
    }
    with tempfile.TemporaryDirectory(prefix="elbox-contention-") as work:
        work = Path(work)
        print("(a)+(b) concurrent training runs", flush=True)
        for policy in args.policies:
            for others in args.others:
                result["concurrent"].append(concurrent_runs(policy, others, args.seconds, work))
        if not args.no_streaming:
            print("(c) streaming from disk", flush=True)
            base = load_split("fashion-mnist", "train")[0][:, 0].numpy()
            path, validation = work / "images.npy", work / "validation.npy"
            write_array(path, stream_images, base, seed=0)
            write_array(validation, 2000, base, seed=1)
            for policy in args.policies:
                result["streaming"] += streaming_runs(policy, args.workers, path, validation, stream_images, work)
    out = Path(args.out or RESULTS / f"contention_{info['slug']}_{date}{'_quick' if args.quick else ''}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table := markdown(result))
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
