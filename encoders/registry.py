"""Registries of the swappable encoder parts: encoders (demonstration pairs -> context) and
poolings (grid cells -> one vector). A new encoder is one file with one ``@register_encoder``."""

from trm.registry import Registry

ENCODERS = Registry("encoder")
POOLINGS = Registry("pooling")
register_encoder = ENCODERS.register
register_pooling = POOLINGS.register
