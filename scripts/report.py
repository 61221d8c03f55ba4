"""Summarise finished runs as a Markdown table and walk the plan's decision tree.

    python scripts/report.py                 # every run under runs/
    python scripts/report.py runs/E0v2 runs/E1v2 runs/E_diag1

For each run: its experiment, the memorisation figure (eval/train/exact_accuracy) beside the same
with another task's context and with the empty task's, the context reliance (right minus wrong),
held-out exact accuracy and pass@1/pass@2 (per set on the family benchmark), the test-time
adaptation it was evaluated with (an evaluation of a run's weights with ``eval.adapt``, e.g. the
Phase 4 lines of jobs.txt, is a row of its own: compare it with the run's row) and its objective
before and after, and the encoder diagnostics.
The decision tree (experiment-plan.md) reads the runs named by experiment: E0v2, then E1v2, then
E_diag1, then Phase 3 (E4, E5, E6, E7), then Phase 2 (E2, E3), leaving adapted evaluations out; it
flags a success whose context reliance is near zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

COLUMNS = [
    ("train exact", "eval/train/exact_accuracy", "{:.1%}"),
    ("train exact, wrong context", "eval/train/exact_accuracy_wrong_context", "{:.1%}"),
    ("train exact, null context", "eval/train/exact_accuracy_null_context", "{:.1%}"),
    ("train reliance", "eval/train/context_reliance", "{:+.2f}"),
    ("held-out exact", "eval/test/exact_accuracy", "{:.1%}"),
    ("held-out reliance", "eval/test/context_reliance", "{:+.2f}"),
    ("held-out pass@1", "ARC/pass@1", "{:.1%}"),
    ("held-out pass@2", "ARC/pass@2", "{:.1%}"),
    ("adaptation", "adaptation", "{}"),
    ("objective before", "eval/test/adapt_objective_before", "{:.3f}"),
    ("objective after", "eval/test/adapt_objective_after", "{:.3f}"),
    ("adaptation ms per task", "eval/test/adapt_ms_per_task", "{:.0f}"),
    ("context norm", "encoder/output_norm", "{:.3g}"),
    ("cross-task cosine", "encoder/cross_puzzle_cosine", "{:.3f}"),
    ("grad/encoder_norm", "grad/encoder_norm", "{:.3g}"),
    ("steps", "step", "{:.0f}"),
]
SUCCESS, GOOD, PARTIAL = 0.9, 0.8, 0.5  # the plan's "what success looks like"
RELIANCE_FLOOR = 0.1  # below: the model scores about as well with another task's context


def load(run_dir: Path) -> dict | None:
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not summary.is_file() or not config.is_file():
        return None
    cfg = yaml.safe_load(config.read_text())
    adapt = (cfg.get("eval") or {}).get("adapt") or {}
    adapted = adapt.get("target", "none") != "none"
    return {"name": run_dir.name, "experiment": cfg.get("experiment") or "-", "seed": cfg.get("seed"),
            "preset": cfg.get("preset") or "-", **json.loads(summary.read_text()),
            **({"adaptation": describe(adapt)} if adapted else {})}  # fmt: skip


def describe(adapt: dict) -> str:
    """``eval.adapt`` in a few words: 'all, 10 steps, lr 0.001, 4 copies'."""
    copies = adapt.get("augmentations") or 1
    return (f"{adapt['target']}, {adapt.get('steps')} steps, lr {adapt.get('lr')}"
            + (f", {copies} copies" if adapt["target"] in ("encoder", "all") and copies > 1 else ""))  # fmt: skip


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


def set_columns(runs: list[dict]) -> list[tuple[str, str, str]]:
    """Columns of the test sets a run's summary names (the family benchmark's unseen_params and
    unseen_families): each set's exact accuracy, reliance, pass@2 and adaptation objective."""
    sets = sorted({k.split("/")[1] for r in runs for k in r if k.startswith("ARC/") and k.count("/") == 2})
    return [col for name in sets for col in (
        (f"{name} exact", f"eval/{name}/exact_accuracy", "{:.1%}"),
        (f"{name} reliance", f"eval/{name}/context_reliance", "{:+.2f}"),
        (f"{name} pass@2", f"ARC/{name}/pass@2", "{:.1%}"),
        (f"{name} objective after", f"eval/{name}/adapt_objective_after", "{:.3f}"),
        (f"{name} adaptation ms per task", f"eval/{name}/adapt_ms_per_task", "{:.0f}"),
    )]  # fmt: skip


def table(runs: list[dict]) -> str:
    columns = COLUMNS[:-4] + set_columns(runs) + COLUMNS[-4:]
    columns = [c for c in columns if any(c[1] in r for r in runs)]  # no column that no run has
    head = "| run | experiment | preset | seed | " + " | ".join(c for c, _, _ in columns) + " |"
    lines = [head, "|" + " --- |" * (4 + len(columns))]
    for r in runs:
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in columns]
        lines.append(f"| {r['name']} | {r['experiment']} | {r['preset']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decide(runs: list[dict]) -> list[str]:
    """The plan's decision tree over the best run of each experiment. Where E1v2's or E_diag1's
    success comes with a training-set context reliance under RELIANCE_FLOOR, the verdict says so:
    the core then recognises each task from its test input and ignores the context, so the run
    does not answer whether the encoder (or the interface) carries task information."""
    best: dict[str, dict] = {}
    for r in runs:
        if "adaptation" in r:  # an evaluation of a run's weights with test-time adaptation
            continue
        acc = r.get("eval/train/exact_accuracy")
        if acc is not None and acc >= best.get(r["experiment"], {}).get("eval/train/exact_accuracy", -1.0):
            best[r["experiment"]] = r
    accuracy = {e: r["eval/train/exact_accuracy"] for e, r in best.items()}

    def say(e: str) -> str:
        line = f"{e}: {grade(accuracy.get(e))}" + (f" ({accuracy[e]:.1%})" if e in accuracy else "")
        reliance = best.get(e, {}).get("eval/train/context_reliance")
        return line + (f", context reliance {reliance:+.2f}" if reliance is not None else "")

    def ignored(e: str) -> str:
        reliance = best[e].get("eval/train/context_reliance")
        if reliance is None or reliance >= RELIANCE_FLOOR:
            return ""
        return (f"; but {e}'s context reliance is {reliance:+.2f}: the core scores as well with another task's "
                f"context, so {e} does not show that the context carries the task (see the held-out sets)")

    out = [say("E0v2")]
    if "E0v2" not in accuracy:
        return out + ["-> run E0v2, E1v2 and E_diag1 first"]
    if accuracy["E0v2"] < SUCCESS:
        return out + ["-> DEBUG BASELINE: the original TRM does not memorise; stop the encoder experiments"]
    out.append(say("E1v2"))
    if accuracy.get("E1v2", 0) >= SUCCESS:
        return out + ["-> SUCCESS: the encoder memorises like the baseline; go to Phase 4 (full data)" + ignored("E1v2")]
    out.append(say("E_diag1"))
    if accuracy.get("E_diag1", 0) < SUCCESS * accuracy["E0v2"]:
        return out + ["-> FIX THE ENCODER-TRM INTERFACE: the TRM cannot use a fixed encoder output "
                      "(compare encoder/output_norm with E0v2's puzzle-embedding context)"]
    caveat = ignored("E_diag1") if "E_diag1" in best else ""
    phase3 = [e for e in ("E4_lower_lr", "E5_grad_clip", "E6_combined", "E7_attention") if e in accuracy]
    out += [say(e) for e in phase3]
    if any(accuracy[e] >= SUCCESS for e in phase3):
        return out + ["-> SUCCESS in Phase 3; go to Phase 4" + caveat]
    phase2 = [e for e in ("E2_lpn", "E3_lpn_var") if e in accuracy]
    out += [say(e) for e in phase2]
    if any(accuracy[e] >= SUCCESS for e in phase2):
        return out + ["-> SUCCESS in Phase 2; go to Phase 4" + caveat]
    if len(phase3) < 4 or len(phase2) < 2:
        return out + ["-> run the remaining Phase 3 (E4, E5, E6, E7) and Phase 2 (E2, E3) experiments" + caveat]
    return out + ["-> REDESIGN THE ENCODER" + caveat]


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
