"""Time and peak memory of building an experiment's dataset, with 1 and more worker processes.

    python scripts/bench_build.py experiment=E0v2 --workers 1 2 --out /tmp/bench-data
    python scripts/bench_build.py experiment=P4_embedding_reference --workers 1 2
    python scripts/bench_build.py experiment=P4_encoder_arc12 --entry encoder --workers 1 2

For each worker count the experiment's dataset (its composed ``data`` options) is built from scratch
into ``--out`` by ``python -m trm.data.build`` in a process of its own, and removed afterwards
(``--keep`` keeps the last). Reported: wall time; peak resident memory of the whole process tree
(the builder and its workers, summed, sampled every 0.1 s from /proc: what the machine must hold);
the folder's size on disk. One markdown row per build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run_jobs import below, processes  # noqa: E402  (this folder: the queue runner's process table)
from trm.cli import compose  # noqa: E402

ENTRIES = {"pretrain": "cfg_pretrain", "encoder": "cfg_pretrain_encoder"}


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and every process below it (Linux /proc)."""
    total = 0
    for pid in [root, *below(root, processes())]:
        try:  # statm: size, resident, ... in pages
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
    return total


def build_args(options) -> list[str]:
    o = options
    args = ["--train-sources", *o.train_sources, "--eval-sources", *o.eval_sources, "--num-augmentations",
            str(o.num_augmentations), "--max-grid-size", str(o.max_grid_size), "--split", o.split, "--max-demos",
            str(o.max_demos), "--seed", str(o.seed)]  # fmt: skip
    if o.num_train_groups is not None:
        args += ["--num-train-groups", str(o.num_train_groups)]
    if o.num_eval_groups is not None:
        args += ["--num-eval-groups", str(o.num_eval_groups)]
    return args


def measure(options, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "trm.data.build", "--out", str(out), "--workers", str(workers), *build_args(options)]
    began, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"the build failed (exit {proc.returncode}): {' '.join(cmd)}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"workers": workers, "seconds": seconds, "peak_gib": peak / 2**30, "disk_gib": size / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="+", help="Hydra overrides choosing the dataset, e.g. experiment=E0v2")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-build"))
    p.add_argument("--keep", action="store_true", help="keep the last build")
    a = p.parse_args()
    cfg, _ = compose(ENTRIES[a.entry], a.overrides)
    options = cfg.data.build_options()
    print(f"{' '.join(a.overrides)}: {options.num_augmentations} versions, split {options.split}, "
          f"sources {options.train_sources} / {options.eval_sources}")  # fmt: skip
    print("| dataset | workers | build time (s) | peak RSS, builder and workers (GiB) | size on disk (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for workers in a.workers:
        r = measure(options, a.out, workers)
        print(f"| {' '.join(a.overrides)} | {r['workers']} | {r['seconds']:.0f} | {r['peak_gib']:.2f} | {r['disk_gib']:.2f} |",
              flush=True)  # fmt: skip
    if not a.keep:
        shutil.rmtree(a.out, ignore_errors=True)


if __name__ == "__main__":
    main()
