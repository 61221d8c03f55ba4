"""Demonstration encoders: compute a task's context from its demonstration pairs instead of a
learned per-puzzle embedding. Importing this package registers every encoder and pooling, and the
``demo_encoder`` conditioner that builds the one named by ``arch.encoder_type``."""

from encoders import lpn, pooling, standard  # noqa: F401  (registration)
from encoders.registry import ENCODERS, POOLINGS
from trm.model.conditioning import register_conditioner


@register_conditioner("demo_encoder")
def build_encoder(arch, metadata: dict):
    encoder = ENCODERS.get_valid(arch.encoder_type)(arch, metadata)
    encoder.finish_init()
    return encoder


__all__ = ["ENCODERS", "POOLINGS", "build_encoder"]
