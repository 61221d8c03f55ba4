"""The recursive core (trm.py), its building blocks (layers.py), its configuration (config.py) and
the conditioning seam (conditioning.py), with the original TRM's conditioner, the learned puzzle
embedding (puzzle_embedding.py). Nothing here imports the data layer or the training loop."""
