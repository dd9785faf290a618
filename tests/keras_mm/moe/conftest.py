"""Fixtures of the MoE tests: the layer tests' own (seeded runs, a mixed_bfloat16 policy)."""

from tests.keras_mm.layers.conftest import _seeded, mixed_bfloat16  # noqa: F401
