import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A real ARC-AGI-1 dataset, shrunk: 4 training and 2 evaluation tasks of grids up to 6x6,
    2 versions each, split mode trm."""
    from trm.data.build import BuildOptions, build_dataset

    options = BuildOptions(num_train_groups=4, num_eval_groups=2, num_augmentations=2, max_grid_size=6)
    path = tmp_path_factory.mktemp("data") / "tiny"
    build_dataset(options, path, log=lambda *_: None)
    return path, options
