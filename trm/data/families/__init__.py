"""Procedural task families: a benchmark where only the demonstrations tell the answer.

Every family is a parameterised program over small grids (``catalog``); an instance is a family,
its parameters, 2-5 demonstration pairs and one test pair, in ARC's own task format, so the
builder, augmentation, encoders and evaluation run on it unchanged. Three parts, chosen as
sources of the builder:

- ``families/train``: the training families at their training parameter combinations;
- ``families/unseen_params``: the training families at held-out parameter combinations;
- ``families/unseen_families``: the held-out families, any parameters.

Generation is deterministic for ``FamilyOptions.seed``; instances whose demonstrations do not pin
down the parameters, whose pairs are degenerate (output = input), or that a held-out program also
explains, are drawn again. ``python -m trm.data.families --out DIR`` exports the tasks as files.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trm.data.families import catalog  # noqa: F401  (registration)
from trm.data.families.base import FAMILIES, DegenerateInstance, Family, Params
from trm.data.tasks import ArcDataError, ArcTask, parse_task

PARTS = ("train", "unseen_params", "unseen_families")
GENERATOR_VERSION = 1  # raise whenever generation changes: dataset folders are named after it
SOURCE_PREFIX = "families/"


class FamilyOptions(BaseModel):
    """What the family benchmark holds (``data.families``)."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] | None = Field(None, description="families generated (None: every registered one)")
    heldout_families: list[str] = Field(default_factory=lambda: ["outline", "mirror"],
                                        description="families only in families/unseen_families")  # fmt: skip
    heldout_params: bool = Field(True, description="keep each family's held-out combinations for evaluation")
    train_tasks: int = Field(2000, ge=1, description="instances in families/train")
    eval_tasks: int = Field(200, ge=0, description="instances in each evaluation part")
    min_grid_size: int = Field(3, ge=1, description="smallest input side")
    max_grid_size: int | None = Field(None, ge=2, le=30, description="largest grid side (None: the canvas)")
    min_demos: int = Field(2, ge=1)
    max_demos: int = Field(5, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        for name in (self.names or []) + self.heldout_families:
            if name not in FAMILIES:
                raise ValueError(f"unknown task family {name!r}; valid: {', '.join(sorted(FAMILIES))}")
        if self.names is not None and not set(self.heldout_families) <= set(self.names):
            raise ValueError(f"heldout_families {self.heldout_families} must be among names {self.names}")
        if not self.training_families():
            raise ValueError("every family is held out: none left for training")
        if self.min_demos > self.max_demos:
            raise ValueError(f"min_demos {self.min_demos} > max_demos {self.max_demos}")
        return self

    def all_families(self) -> list[Family]:
        return [FAMILIES[n]() for n in (self.names if self.names is not None else sorted(FAMILIES))]

    def training_families(self) -> list[Family]:
        return [f for f in self.all_families() if f.name not in self.heldout_families]

    def heldout_family_list(self) -> list[Family]:
        return [f for f in self.all_families() if f.name in self.heldout_families]


def part_programs(part: str, options: FamilyOptions) -> list[tuple[Family, list[Params]]]:
    """The (family, parameter settings) a part draws from; empty pools are left out."""
    if part == "train":
        pool = [(f, [p for p in f.space() if not (options.heldout_params and f.heldout(p))]) for f in options.training_families()]
    elif part == "unseen_params":
        pool = [(f, [p for p in f.space() if f.heldout(p)]) for f in options.training_families()] if options.heldout_params else []
    elif part == "unseen_families":
        pool = [(f, f.space()) for f in options.heldout_family_list()]
    else:
        raise ArcDataError(f"unknown families part {part!r}; valid: {', '.join(SOURCE_PREFIX + p for p in PARTS)}")
    return [(f, params) for f, params in pool if params]


def generate(part: str, options: FamilyOptions, canvas: int) -> list[ArcTask]:
    """The instances of ``part`` (``train``, ``unseen_params``, ``unseen_families``), grids at most
    ``options.max_grid_size`` (default ``canvas``) on a side. Families take turns; parameters and
    the number of demonstrations are drawn per instance."""
    pool = part_programs(part, options)
    count = options.train_tasks if part == "train" else options.eval_tasks
    max_side = options.max_grid_size or canvas
    if max_side > canvas:
        raise ArcDataError(f"data.families.max_grid_size {max_side} exceeds the canvas (data.max_grid_size {canvas})")
    # Training instances that a held-out program also explains are drawn again.
    exclude = [(f, f.space()) for f in options.heldout_family_list()] if part == "train" else []
    tasks = []
    for i in range(count if pool else 0):
        family, settings = pool[i % len(pool)]
        rng = np.random.default_rng([options.seed, PARTS.index(part), i])
        params = settings[int(rng.integers(len(settings)))]
        num_demos = int(rng.integers(options.min_demos, options.max_demos + 1))
        own_heldout = [(family, [p for p in family.space() if family.heldout(p)])] if part == "train" and options.heldout_params else []
        try:
            pairs = family.draw_instance(rng, params, num_demos, min(options.min_grid_size, max_side), max_side,
                                         exclude + own_heldout)  # fmt: skip
        except DegenerateInstance as e:
            raise ArcDataError(f"families/{part} instance {i}: {e} (grids up to {max_side}x{max_side})") from None
        raw = {"train": [_pair(x, y) for x, y in pairs[:-1]], "test": [_pair(*pairs[-1])]}
        name = f"{SOURCE_PREFIX}{part}:{i:05d}.{family.name}.{family.describe(params)}"
        task = parse_task(name, raw, f"{SOURCE_PREFIX}{part}")  # validated like any ARC task
        tasks.append(dataclasses.replace(task, augment_dihedral=family.augment_dihedral,
                                         augment_colours=family.augment_colours))  # fmt: skip
    return tasks


def _pair(x: np.ndarray, y: np.ndarray) -> dict:
    return {"input": x.tolist(), "output": y.tolist()}


def family_of(task_name: str) -> tuple[str, str]:
    """(family, parameters) from a generated task's name, e.g. ``families/train:00042.recolour.3-5``."""
    _, family, params = task_name.split(":", 1)[1].split(".", 2)
    return family, params


def task_family(task_name: str) -> str | None:
    """The family of a generated task, None for any other task."""
    if not task_name.startswith(SOURCE_PREFIX):
        return None
    return family_of(task_name)[0]


__all__ = ["FAMILIES", "GENERATOR_VERSION", "FamilyOptions", "PARTS", "SOURCE_PREFIX", "Family", "family_of", "generate", "part_programs", "task_family"]
