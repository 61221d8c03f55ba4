"""Summarise finished runs as a Markdown table and walk the plan's decision tree.

    python scripts/report.py                 # every run under runs/
    python scripts/report.py runs/E0v2 runs/E1v2 runs/E_diag1

For each run: its experiment, the memorisation figure (eval/train/exact_accuracy), held-out
pass@2, and the encoder diagnostics. The decision tree (experiment-plan.md) reads the runs named
by experiment: E0v2, then E1v2, then E_diag1, then Phase 3 (E4, E5, E6, E7), then Phase 2 (E2, E3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

COLUMNS = [
    ("train exact", "eval/train/exact_accuracy", "{:.1%}"),
    ("held-out pass@2", "ARC/pass@2", "{:.1%}"),
    ("context norm", "encoder/output_norm", "{:.3g}"),
    ("cross-task cosine", "encoder/cross_puzzle_cosine", "{:.3f}"),
    ("grad/encoder_norm", "grad/encoder_norm", "{:.3g}"),
    ("steps", "step", "{:.0f}"),
]
SUCCESS, GOOD, PARTIAL = 0.9, 0.8, 0.5  # the plan's "what success looks like"


def load(run_dir: Path) -> dict | None:
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary.is_file() or not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text())
    return {"name": run_dir.name, "experiment": cfg.get("experiment") or "-", "seed": cfg.get("seed"),
            "preset": cfg.get("preset") or "-", **json.loads(summary.read_text())}  # fmt: skip


def grade(accuracy: float | None) -> str:
    if accuracy is None:
        return "no result"
    if accuracy >= SUCCESS:
        return "success"
    if accuracy >= GOOD:
        return "good"
    if accuracy >= PARTIAL:
        return "partial"
    return "failure"


def table(runs: list[dict]) -> str:
    head = "| run | experiment | preset | seed | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (4 + len(COLUMNS))]
    for r in runs:
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS]
        lines.append(f"| {r['name']} | {r['experiment']} | {r['preset']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decide(runs: list[dict]) -> list[str]:
    """The plan's decision tree over the best run of each experiment."""
    best: dict[str, float] = {}
    for r in runs:
        acc = r.get("eval/train/exact_accuracy")
        if acc is not None:
            best[r["experiment"]] = max(best.get(r["experiment"], 0.0), acc)
    say = lambda e: f"{e}: {grade(best.get(e))}" + (f" ({best[e]:.1%})" if e in best else "")  # noqa: E731
    out = [say("E0v2")]
    if "E0v2" not in best:
        return out + ["-> run E0v2, E1v2 and E_diag1 first"]
    if best["E0v2"] < SUCCESS:
        return out + ["-> DEBUG BASELINE: the original TRM does not memorise; stop the encoder experiments"]
    out.append(say("E1v2"))
    if best.get("E1v2", 0) >= SUCCESS:
        return out + ["-> SUCCESS: the encoder memorises like the baseline; go to Phase 4 (full data)"]
    out.append(say("E_diag1"))
    if best.get("E_diag1", 0) < SUCCESS * best["E0v2"]:
        return out + ["-> FIX THE ENCODER-TRM INTERFACE: the TRM cannot use a fixed encoder output "
                      "(compare encoder/output_norm with E0v2's puzzle-embedding context)"]
    phase3 = [e for e in ("E4_lower_lr", "E5_grad_clip", "E6_combined", "E7_attention") if e in best]
    out += [say(e) for e in phase3]
    if any(best[e] >= SUCCESS for e in phase3):
        return out + ["-> SUCCESS in Phase 3; go to Phase 4"]
    phase2 = [e for e in ("E2_lpn", "E3_lpn_var") if e in best]
    out += [say(e) for e in phase2]
    if any(best[e] >= SUCCESS for e in phase2):
        return out + ["-> SUCCESS in Phase 2; go to Phase 4"]
    if len(phase3) < 4 or len(phase2) < 2:
        return out + ["-> run the remaining Phase 3 (E4, E5, E6, E7) and Phase 2 (E2, E3) experiments"]
    return out + ["-> REDESIGN THE ENCODER"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories (default: every one under runs/)")
    args = p.parse_args()
    dirs = args.runs or sorted(Path("runs").glob("*"))
    runs = [r for r in (load(d) for d in dirs) if r is not None]
    if not runs:
        sys.exit("no finished run (summary.json) found")
    print(table(runs))
    print()
    print("\n".join(f"- {line}" for line in decide(runs)))


if __name__ == "__main__":
    main()
