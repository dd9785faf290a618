"""The encoder tests share the layer tests' fixtures (mixed precision, seeding)."""

from tests.keras_mm.layers.conftest import _seeded, mixed_bfloat16  # noqa: F401
