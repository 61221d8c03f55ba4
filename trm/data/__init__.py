"""ARC data: task files, grids and augmentations, the dataset builder and reader."""
