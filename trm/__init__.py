"""TRM on ARC-AGI: data, model, training loop and evaluation."""
