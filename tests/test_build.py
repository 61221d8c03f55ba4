import hashlib
import io
import json
import multiprocessing
import os

import numpy as np
import pytest

from trm.data import build
from trm.data.build import BuildOptions, build_dataset, ensure_dataset
from trm.data.families import FamilyOptions
from trm.data.dataset import ArcSplit, EpochSampler
from trm.data.grids import decode_grid, inverse_augment
from trm.data.tasks import ArcDataError, load_source

ARRAYS = ("inputs", "labels", "example_demos", "demo_inputs", "puzzle_identifiers", "puzzle_indices", "group_indices")


def test_build_is_deterministic(tiny_dataset, tmp_path):
    path, options = tiny_dataset
    build_dataset(options, tmp_path / "again", log=lambda *_: None)
    for split in ("train", "test"):
        for name in ARRAYS:
            a = np.load(path / split / f"{name}.npy")
            b = np.load(tmp_path / "again" / split / f"{name}.npy")
            np.testing.assert_array_equal(a, b, err_msg=f"{split}/{name}")


def _hashes(folder):
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("options", [
    BuildOptions(num_train_groups=3, num_eval_groups=2, num_augmentations=5, max_grid_size=8),
    BuildOptions(train_sources=["families/train"], eval_sources=["families/unseen_params", "families/unseen_families"],
                 split="heldout", max_grid_size=8, num_augmentations=4, max_demos=3,
                 families=FamilyOptions(train_tasks=12, eval_tasks=3)),
], ids=["arc-agi-1-trm", "families-heldout"])  # fmt: skip
def test_the_parallel_streaming_build_equals_the_sequential_one(tmp_path, monkeypatch, options):
    """Every file byte for byte, whether one process makes the examples or two, and whether a
    task's versions are written at once or in blocks of two (so blocks end inside tasks, whose
    translations continue across them); every .npy file is what np.save writes for its array."""
    build_dataset(options, tmp_path / "one", log=lambda *_: None, workers=1)
    monkeypatch.setattr(build, "BLOCK", 2)  # the forked workers inherit it
    build_dataset(options, tmp_path / "two", log=lambda *_: None, workers=2)
    one = _hashes(tmp_path / "one")
    assert len(one) == 1 + 2 * 13 and one == _hashes(tmp_path / "two")
    assert json.loads((tmp_path / "one" / "build.json").read_text())["examples"]["test"] > 0
    for f in (tmp_path / "two").rglob("*.npy"):
        saved = io.BytesIO()
        np.save(saved, np.load(f))
        assert saved.getvalue() == f.read_bytes(), f


def test_a_task_failing_in_a_worker_is_named_and_leaves_nothing_behind(tmp_path, monkeypatch):
    src = tmp_path / "tasks"
    for name in ("a", "b", "c"):
        _write(src, f"{name}.json", GOOD)
    augmented = build._augmented

    def planted(task, t, colours):  # a fault inside the worker that makes task b's examples
        if task.name == "tasks:b":
            raise RuntimeError(f"planted in process {os.getpid()}")
        return augmented(task, t, colours)

    monkeypatch.setattr(build, "_augmented", planted)
    options = BuildOptions(train_sources=[str(src)], eval_sources=[], num_augmentations=3, max_grid_size=5)
    out = tmp_path / "out" / "ds"
    with pytest.raises(ArcDataError) as err:
        build_dataset(options, out, log=lambda *_: None, workers=2)
    message = str(err.value)
    assert message.startswith("task tasks:b: RuntimeError: planted in process ") and "\n" not in message
    assert int(message.rsplit(" ", 1)[1]) != os.getpid()  # it failed in a worker
    assert list((tmp_path / "out").iterdir()) == [] and multiprocessing.active_children() == []


def test_layout_metadata_and_demonstrations(tiny_dataset):
    path, options = tiny_dataset
    info = json.loads((path / "build.json").read_text())
    assert info["num_train_tasks"] == 4 and info["num_eval_tasks"] == 2
    train, test = ArcSplit(path, "train"), ArcSplit(path, "test")
    for key in ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "total_puzzles", "sets"):
        assert key in train.meta
    assert train.seq_len == 36 and train.meta["vocab_size"] == 12
    # trm mode: evaluation tasks' demonstrations are training groups too; their ids are shared.
    assert train.num_groups == 6 and test.num_groups == 2
    assert set(test.puzzle_identifiers) <= set(train.puzzle_identifiers)
    assert train.puzzle_identifiers.min() >= 1  # 0 is the blank id
    # Every group's first puzzle is the task itself (identity augmentation).
    assert (train.puzzle_dihedral[train.group_indices[:-1]] == 0).all()
    # An example never lists itself among its demonstrations: a puzzle's demo-pair examples each
    # miss exactly one row of the puzzle's demo pool, their own; its test pairs see them all.
    for p in range(len(train.puzzle_identifiers)):
        rows = [set(train.example_demos[i][train.example_demos[i] >= 0]) for i in range(*train.puzzle_indices[p : p + 2])]
        pool = set().union(*rows)
        for i, demos in zip(range(*train.puzzle_indices[p : p + 2]), rows):
            missing = pool - demos
            assert len(missing) <= 1
            if missing:
                (own,) = missing
                assert _contains(train.inputs[i].reshape(6, 6), decode_grid(train.demo_inputs[own], 6))
                assert _contains(train.labels[i].reshape(6, 6), decode_grid(train.demo_labels[own], 6))
    # Test examples: top-left, answers undo to the original task's answer.
    tasks = {t.name: t for t in load_source("arc-agi-1/evaluation")}
    for i in range(test.num_examples):
        puzzle = test.example_puzzle[i]
        grid = decode_grid(test.labels[i], test.grid_size)
        original = inverse_augment(grid, int(test.puzzle_dihedral[puzzle]), test.puzzle_colours[puzzle])
        task = tasks[test.tasks[test.puzzle_task[puzzle]]]
        np.testing.assert_array_equal(original, task.tests[test.example_pair[i]].output)


def _contains(canvas, grid):
    h, w = grid.shape
    for r in range(canvas.shape[0] - h + 1):
        for c in range(canvas.shape[1] - w + 1):
            if (canvas[r : r + h, c : c + w] == grid + 2).all():
                return True
    return False


def test_heldout_mode_keeps_evaluation_tasks_out_of_training(tmp_path):
    options = BuildOptions(num_train_groups=3, num_eval_groups=2, num_augmentations=1, max_grid_size=6, split="heldout")
    build_dataset(options, tmp_path / "h", log=lambda *_: None)
    train, test = ArcSplit(tmp_path / "h", "train"), ArcSplit(tmp_path / "h", "test")
    assert not set(train.puzzle_task) & set(test.puzzle_task)
    assert not set(train.puzzle_identifiers) & set(test.puzzle_identifiers)
    assert train.num_groups == 3 and test.num_groups == 2
    assert (test.example_demos >= 0).sum(1).min() >= 1  # test inputs see all their task's demos


def test_augmentations_are_distinct_and_counted(tmp_path):
    """Symmetric tasks have fewer distinct versions than asked for, counted by hand: a 1x1 grid
    of colour 1 mapped to itself has 9 (its colour; rotations change nothing); a 1x2 grid has 9
    colours x 2 orientations = 18. Asked for 30 versions each, the builder keeps exactly those,
    every one with different grids, the original first."""
    src = tmp_path / "tasks"
    _write(src, "dot.json", {"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": [[1]], "output": [[1]]}]})
    _write(src, "bar.json", {"train": [{"input": [[1, 1]], "output": [[1, 1]]}],
                             "test": [{"input": [[1, 1]], "output": [[1, 1]]}]})  # fmt: skip
    options = BuildOptions(train_sources=[str(src)], eval_sources=[], num_augmentations=30, max_grid_size=4)
    build_dataset(options, tmp_path / "a", log=lambda *_: None)
    train = ArcSplit(tmp_path / "a", "train")
    counts = {}
    for g in range(train.num_groups):
        puzzles = range(train.group_indices[g], train.group_indices[g + 1])
        name = train.tasks[train.puzzle_task[puzzles[0]]].split(":")[1]
        counts[name] = len(puzzles)
        assert train.puzzle_dihedral[puzzles[0]] == 0 and (train.puzzle_colours[puzzles[0]] == np.arange(10)).all()
        grids = set()  # each version's demonstration pool (top-left grids)
        for p in puzzles:
            pool = sorted(set(train.example_demos[train.puzzle_indices[p] : train.puzzle_indices[p + 1]].ravel()) - {-1})
            grids.add(b"".join(train.demo_inputs[r].tobytes() + train.demo_labels[r].tobytes() for r in pool))
        assert len(grids) == len(puzzles)
    assert counts == {"bar": 18, "dot": 9}


def test_sampler_draws_one_puzzle_per_group_per_epoch(tiny_dataset):
    train = ArcSplit(tiny_dataset[0], "train")
    per_epoch = train.examples_per_epoch
    sampler = EpochSampler(train, per_epoch, seed=3)
    for _ in range(3):
        idx = sampler.next_indices()
        groups = np.searchsorted(train.group_indices, train.example_puzzle[idx], side="right") - 1
        puzzles_per_group = {g: set(train.example_puzzle[idx][groups == g]) for g in set(groups)}
        assert len(puzzles_per_group) == train.num_groups
        assert all(len(p) == 1 for p in puzzles_per_group.values())
    state = sampler.state_dict()
    nxt = sampler.next_indices()
    other = EpochSampler(train, per_epoch, seed=3)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.next_indices(), nxt)


def test_ensure_dataset_refuses_a_folder_built_with_other_options(tiny_dataset):
    path, options = tiny_dataset
    assert ensure_dataset(options, path) == path
    with pytest.raises(ArcDataError, match="other options"):
        ensure_dataset(options.model_copy(update={"num_augmentations": 3}), path)


def _write(folder, name, obj_or_text):
    folder.mkdir(parents=True, exist_ok=True)
    text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
    (folder / name).write_text(text)


GOOD = {"train": [{"input": [[1, 2]], "output": [[2, 1]]}], "test": [{"input": [[3]], "output": [[3]]}]}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"train": [', "malformed JSON"),
        ({"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": GOOD["test"]}, "ragged grid"),
        ({"train": [{"input": [[1, 12]], "output": [[1]]}], "test": GOOD["test"]}, "colour 12 outside 0-9"),
        ({"train": [], "test": GOOD["test"]}, "no demonstration"),
    ],
)
def test_bad_task_files_are_named_and_leave_nothing_behind(tmp_path, content, message):
    src = tmp_path / "tasks"
    _write(src, "good1.json", GOOD)
    _write(src, "broken.json", content)
    options = BuildOptions(train_sources=[str(src)], eval_sources=[], num_augmentations=1, max_grid_size=5)
    out = tmp_path / "out" / "ds"
    with pytest.raises(ArcDataError) as err:
        build_dataset(options, out, log=lambda *_: None)
    assert message in str(err.value) and "broken.json" in str(err.value) and "broken" in str(err.value)
    assert not out.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_kaggle_challenges_file_with_solutions(tmp_path):
    challenges = {"abc": {"train": GOOD["train"], "test": [{"input": [[3]]}]}}
    _write(tmp_path, "my_challenges.json", challenges)
    _write(tmp_path, "my_solutions.json", {"abc": [[[4]]]})
    (task,) = load_source(str(tmp_path / "my_challenges.json"))
    assert task.name.endswith(":abc") and task.tests[0].output.tolist() == [[4]]
    _write(tmp_path, "other_challenges.json", challenges)
    _write(tmp_path, "other_solutions.json", {})
    with pytest.raises(ArcDataError, match="no answers for task abc"):
        load_source(str(tmp_path / "other_challenges.json"))
    _write(tmp_path, "lone_challenges.json", challenges)  # no lone_solutions.json beside it
    with pytest.raises(ArcDataError, match=f"task abc has test inputs without outputs and the solutions file "
                       f"{tmp_path / 'lone_solutions.json'} is missing"):  # fmt: skip
        load_source(str(tmp_path / "lone_challenges.json"))


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(ArcDataError, match="arc-agi-1/training"):
        load_source("arc-agi-3/training")
