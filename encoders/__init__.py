"""Demonstration conditioners: compute a task's context from its demonstration pairs instead of a
learned per-puzzle embedding. Importing this package registers every encoder and pooling, and the
``demo_encoder`` conditioner (:class:`encoders.base.DemoEncoder`) that builds the encoder named by
``arch.encoder_type``."""

from encoders import cells, lpn, pooling, standard  # noqa: F401  (registration)
from encoders.registry import ENCODERS, POOLINGS

__all__ = ["ENCODERS", "POOLINGS"]
