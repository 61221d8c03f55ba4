"""The recursive core (trm.py), its building blocks (layers.py) and the conditioning seam."""
