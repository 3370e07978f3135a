"""EAGLE-3 draft training: data, packing, distribution, checkpoints and the `train` loop.

The model itself lives in `speculators.models`; this package composes it with the rest.
"""
