"""The task-family benchmark: every family's instances are valid, pinned down by their
demonstrations, open from the test input alone, and deterministic; held-out combinations and
families never reach the training split, augmented puzzles included; export round trip."""

import json
import subprocess
import sys

import numpy as np
import pytest

from trm.data.build import BuildOptions, build_dataset
from trm.data.dataset import ArcSplit
from trm.data.families import FAMILIES, PARTS, FamilyOptions, family_of, generate
from trm.data.grids import decode_grid
from trm.data.tasks import load_source

CANVAS = 8


def params_of(family, described: str):
    (params,) = [p for p in family.space() if family.describe(p) == described]
    return params


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("canvas, min_side, demos", [(CANVAS, 3, (2, 5)), (4, 2, (2, 2))])
def test_every_family_generates_valid_pinned_open_instances_deterministically(name, canvas, min_side, demos):
    """Also on tiny grids with two demonstrations, where ambiguous instances are common."""
    options = FamilyOptions(names=[name], heldout_families=[], heldout_params=False, train_tasks=24, eval_tasks=0,
                            min_grid_size=min_side, min_demos=demos[0], max_demos=demos[1])  # fmt: skip
    tasks = generate("train", options, canvas)
    again = generate("train", options, canvas)
    other_seed = generate("train", options.model_copy(update={"seed": 1}), canvas)
    family = FAMILIES[name]()
    assert len(tasks) == 24
    drawn = set()
    for task, twin, other in zip(tasks, again, other_seed):
        assert task.name == twin.name
        pairs = [(p.input, p.output) for p in task.demos + task.tests]
        assert all(np.array_equal(a.input, b.input) and np.array_equal(a.output, b.output)
                   for a, b in zip(task.demos + task.tests, twin.demos + twin.tests))  # fmt: skip
        assert not all(np.array_equal(a.input, b.input) for a, b in zip(task.demos, other.demos))
        assert 2 <= len(task.demos) <= 5 and len(task.tests) == 1
        assert (task.augment_dihedral, task.augment_colours) == (family.augment_dihedral, family.augment_colours)
        fam, described = family_of(task.name)
        params = params_of(family, described)
        drawn.add(params)
        for x, y in pairs:
            assert max(x.shape + y.shape) <= canvas and x.dtype == y.dtype == np.uint8 and y.max() <= 9
            assert x.shape != y.shape or not np.array_equal(x, y)  # not degenerate
        assert family.consistent(params, pairs)
        demos = pairs[:-1]
        assert [q for q in family.space() if family.consistent(q, demos)] == [params]  # pinned down
        test_input, test_output = pairs[-1]
        outputs = {family.apply(test_input, q).tobytes() for q in family.space() if family.apply(test_input, q) is not None}
        assert len(outputs) >= 2  # the test input alone does not tell the answer
    assert len(drawn) > 1  # parameters vary across instances


@pytest.fixture(scope="module")
def family_dataset(tmp_path_factory):
    """Every family, the default held-out families and combinations, 8 augmentations per task."""
    families = FamilyOptions(train_tasks=260, eval_tasks=40)
    options = BuildOptions(train_sources=["families/train"], eval_sources=["families/unseen_params", "families/unseen_families"],
                           split="heldout", max_grid_size=CANVAS, num_augmentations=8, max_demos=5, families=families)  # fmt: skip
    path = tmp_path_factory.mktemp("families") / "data"
    build_dataset(options, path, log=lambda *_: None)
    return path, families


def puzzle_demos(split, puzzle):
    """The demonstration pairs of an (augmented) puzzle, as grids."""
    rows = split.example_demos[split.puzzle_indices[puzzle] : split.puzzle_indices[puzzle + 1]].ravel()
    pool = sorted(set(rows.tolist()) - {-1})
    return [(decode_grid(split.demo_inputs[r], split.grid_size), decode_grid(split.demo_labels[r], split.grid_size)) for r in pool]


def test_heldout_combinations_and_families_never_reach_training(family_dataset):
    path, options = family_dataset
    train, test = ArcSplit(path, "train"), ArcSplit(path, "test")
    assert len(train.puzzle_identifiers) > 3 * train.num_groups  # augmented versions are in the check
    heldout_families = options.heldout_family_list()
    augmented = 0
    for puzzle in range(len(train.puzzle_identifiers)):
        name = train.tasks[train.puzzle_task[puzzle]]
        assert name.startswith("families/train:")
        family_name, _ = family_of(name)
        assert family_name not in options.heldout_families
        family = FAMILIES[family_name]()
        demos = puzzle_demos(train, puzzle)
        # Neither a held-out combination of its family nor any held-out family explains it.
        assert not any(family.consistent(q, demos) for q in family.space() if family.heldout(q)), name
        assert not any(f.consistent(q, demos) for f in heldout_families for q in f.space()), name
        # It is still an instance of its own family, at a training combination.
        explaining = [q for q in family.space() if family.consistent(q, demos)]
        assert len(explaining) == 1 and not family.heldout(explaining[0]), name
        augmented += train.puzzle_dihedral[puzzle] != 0 or (train.puzzle_colours[puzzle] != np.arange(10)).any()
    assert augmented > len(train.puzzle_identifiers) // 2
    # The evaluation parts hold what they are named after, and nothing of training.
    sources = dict(zip(test.tasks, test.task_sources))
    for task in set(test.puzzle_task.tolist()):
        name = test.tasks[task]
        family_name, described = family_of(name)
        family = FAMILIES[family_name]()
        if sources[name] == "families/unseen_params":
            assert family_name not in options.heldout_families and family.heldout(params_of(family, described))
        else:
            assert sources[name] == "families/unseen_families" and family_name in options.heldout_families


def test_training_instances_that_a_heldout_family_explains_are_drawn_again():
    """A swap of colours a and b whose demonstrations hold no b looks exactly like recolouring a to
    b: with swap held out, no recolour instance may be such a swap."""
    options = FamilyOptions(names=["recolour", "swap"], heldout_families=["swap"], train_tasks=60, eval_tasks=0,
                            min_grid_size=2, max_grid_size=4, min_demos=2, max_demos=2)  # fmt: skip
    swap = FAMILIES["swap"]()
    for task in generate("train", options, 4):
        demos = [(p.input, p.output) for p in task.demos]
        assert not any(swap.consistent(q, demos) for q in swap.space()), task.name


def test_export_writes_arc_task_files_that_load_as_a_source(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "trm.data.families", "--out", str(out), "--families", "recolour", "translate", "outline",
           "--heldout-families", "outline", "--train-tasks", "12", "--eval-tasks", "4", "--max-grid-size", "6"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    options = FamilyOptions(**manifest["options"])
    for part in PARTS:
        generated = generate(part, options, 30)
        loaded = load_source(str(out / part))
        assert [t.name.split(":")[1] for t in loaded] == [t.name.split(":")[1] for t in generated]
        for a, b in zip(loaded, generated):
            for p, q in zip(a.demos + a.tests, b.demos + b.tests):
                assert np.array_equal(p.input, q.input) and np.array_equal(p.output, q.output)
            key = f"{part}/{a.name.split(':')[1]}"
            assert (manifest["tasks"][key]["family"], manifest["tasks"][key]["params"]) == family_of(b.name)
    assert len(list((out / "unseen_families").glob("*.json"))) == 4
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "already exists" in again.stderr and again.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(names=["recolour", "bogus"]), "unknown task family 'bogus'; valid: crop, dihedral"),
        (dict(names=["recolour"], heldout_families=["swap"]), "must be among names"),
        (dict(names=["recolour"], heldout_families=["recolour"]), "none left for training"),
        (dict(min_demos=4, max_demos=3), "min_demos 4 > max_demos 3"),
    ],
)
def test_bad_family_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        FamilyOptions(**options)


def test_families_source_needs_its_options_and_fits_the_canvas(tmp_path):
    from trm.data.tasks import ArcDataError

    with pytest.raises(ArcDataError, match="needs the family options"):
        build_dataset(BuildOptions(train_sources=["families/train"], eval_sources=[]), tmp_path / "a", log=lambda *_: None)
    with pytest.raises(ArcDataError, match="exceeds the canvas"):
        build_dataset(BuildOptions(train_sources=["families/train"], eval_sources=[], max_grid_size=6,
                                   families=FamilyOptions(max_grid_size=8)), tmp_path / "b", log=lambda *_: None)  # fmt: skip
    with pytest.raises(ArcDataError, match="unknown families part 'tran'"):
        build_dataset(BuildOptions(train_sources=["families/tran"], eval_sources=[], families=FamilyOptions()),
                      tmp_path / "c", log=lambda *_: None)  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_colour_map_baseline_reads_the_demonstrations_and_refuses_what_no_map_explains():
    from trm.data.families.baselines import colour_map, empty
    from trm.data.tasks import ArcTask, Pair

    g = lambda rows: np.array(rows, dtype=np.uint8)  # noqa: E731
    demos = (Pair(g([[1, 3], [0, 1]]), g([[2, 3], [0, 2]])), Pair(g([[1, 1, 1]]), g([[4]])))  # the second: another shape, skipped
    task = ArcTask("t:0", demos, (Pair(g([[1, 5], [3, 0]]), g([[2, 5], [3, 0]])),))
    # 1 -> 2 and 3 -> 3 as shown, 0 -> 0, 5 shown nowhere: stays
    assert np.array_equal(colour_map(task, task.tests[0].input), g([[2, 5], [3, 0]]))
    assert np.array_equal(empty(task, g([[1, 5], [3, 0]])), np.zeros((2, 2), np.uint8))
    conflicting = ArcTask("t:1", demos[:1] + (Pair(g([[1]]), g([[7]])),), task.tests)  # 1 -> 2 and 1 -> 7
    assert colour_map(conflicting, task.tests[0].input) is None


def test_baselines_on_the_one_family_preset_match_a_plain_count():
    """recolour's held-out pairs are colour maps the demonstrations pin down (all solved); a
    shift_colours task is solved exactly when every colour of its test input appears in a
    demonstration's input (its cycle moves every colour, so none may stay)."""
    from trm.data.families.baselines import solved_share

    options = FamilyOptions(names=["recolour", "shift_colours"], heldout_families=["shift_colours"], train_tasks=20, eval_tasks=60)
    assert solved_share(generate("unseen_params", options, 6))["recolour"]["colour_map"] == (60, 60)
    tasks = generate("unseen_families", options, 6)
    shown = sum(set(np.unique(t.tests[0].input)) <= set().union(*(np.unique(p.input) for p in t.demos)) for t in tasks)
    assert 0 < shown < 60
    assert solved_share(tasks)["shift_colours"] == {"empty": (0, 60), "colour_map": (shown, 60)}


def test_baselines_command_prints_each_part_and_family_and_writes_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trm.data.families", "--baselines", "--families", "recolour", "translate",
                          "shift_colours", "--heldout-families", "shift_colours", "--max-grid-size", "6",
                          "--train-tasks", "200", "--eval-tasks", "40"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()[1:]}
    assert set(rows) == {("train", "recolour"), ("train", "translate"), ("unseen_params", "recolour"),
                         ("unseen_params", "translate"), ("unseen_families", "shift_colours")}  # fmt: skip
    assert rows[("unseen_params", "recolour")] == ["20", "0.0%", "100.0%"]
    assert float(rows[("train", "translate")][1].rstrip("%")) > 0  # shifts that carry every cell off the grid
    assert list(tmp_path.iterdir()) == []
