"""Export the task-family benchmark as ARC task files, for any model:

    python -m trm.data.families --out DIR [--families recolour swap ...] [--heldout-families outline]
        [--train-tasks 2000] [--eval-tasks 200] [--max-grid-size 10] [--seed 0]
    python -m trm.data.families --list
    python -m trm.data.families --baselines [the same options]

writes DIR/train/, DIR/unseen_params/ and DIR/unseen_families/, one ``<name>.json`` per task
(``{"train": [...], "test": [...]}``), and DIR/manifest.json (the options, and each task's family
and parameters). DIR must not exist; it appears whole or not at all. Each folder is also a source
for the builder (``data.train_sources=[DIR/train]``). ``--baselines`` writes nothing: it prints the
share of each part's test outputs that programs reading only the demonstrations solve
(:mod:`trm.data.families.baselines`), per family.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from trm.data.families import FAMILIES, PARTS, FamilyOptions, family_of, generate
from trm.data.tasks import ArcDataError


def export(options: FamilyOptions, out: Path, canvas: int = 30) -> dict[str, int]:
    """Write the three parts under ``out`` (atomically); returns the number of tasks of each."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = {"options": options.model_dump(), "tasks": {}}
        counts = {}
        for part in PARTS:
            (tmp / part).mkdir()
            tasks = generate(part, options, canvas)
            for task in tasks:
                file_name = task.name.split(":", 1)[1]
                pairs = lambda ps: [{"input": p.input.tolist(), "output": p.output.tolist()} for p in ps]  # noqa: E731
                (tmp / part / f"{file_name}.json").write_text(json.dumps({"train": pairs(task.demos), "test": pairs(task.tests)}))
                family, params = family_of(task.name)
                manifest["tasks"][f"{part}/{file_name}"] = {"family": family, "params": params}
            counts[part] = len(tasks)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def print_baselines(options: FamilyOptions, canvas: int = 30) -> None:
    from trm.data.families.baselines import BASELINES, solved_share

    names = list(BASELINES)
    print(f"{'part':16s} {'family':14s} {'tests':>6s} " + " ".join(f"{n:>10s}" for n in names))
    for part in PARTS:
        for family, by in sorted(solved_share(generate(part, options, canvas)).items()):
            tests = by[names[0]][1]
            print(f"{part:16s} {family:14s} {tests:6d} " + " ".join(f"{100 * by[n][0] / tests:9.1f}%" for n in names))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder to create")
    p.add_argument("--list", action="store_true", help="list the families and exit")
    p.add_argument("--baselines", action="store_true",
                   help="print what programs reading only the demonstrations solve of each part, and exit")
    defaults = FamilyOptions()
    p.add_argument("--families", nargs="+", default=None, help="families to generate (default: all)")
    p.add_argument("--heldout-families", nargs="*", default=defaults.heldout_families)
    p.add_argument("--no-heldout-params", action="store_true", help="train on every parameter combination")
    p.add_argument("--train-tasks", type=int, default=defaults.train_tasks)
    p.add_argument("--eval-tasks", type=int, default=defaults.eval_tasks)
    p.add_argument("--min-grid-size", type=int, default=defaults.min_grid_size)
    p.add_argument("--max-grid-size", type=int, default=10)
    p.add_argument("--min-demos", type=int, default=defaults.min_demos)
    p.add_argument("--max-demos", type=int, default=defaults.max_demos)
    p.add_argument("--seed", type=int, default=defaults.seed)
    a = p.parse_args(argv)
    if a.list:
        for name in sorted(FAMILIES):
            first_sentence = " ".join(FAMILIES[name].__doc__.split()).split(". ")[0]
            print(f"{name:14s} {first_sentence}.")
        return
    if a.out is None and not a.baselines:
        p.error("--out is required")
    try:
        options = FamilyOptions(
            names=a.families, heldout_families=a.heldout_families, heldout_params=not a.no_heldout_params,
            train_tasks=a.train_tasks, eval_tasks=a.eval_tasks, min_grid_size=a.min_grid_size,
            max_grid_size=a.max_grid_size, min_demos=a.min_demos, max_demos=a.max_demos, seed=a.seed,
        )  # fmt: skip
        if a.baselines:
            print_baselines(options)
            return
        counts = export(options, a.out)
    except ValidationError as e:
        sys.exit("error: " + "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors()))
    except (ArcDataError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {a.out}: " + ", ".join(f"{n} {part}" for part, n in counts.items()))


if __name__ == "__main__":
    main()
