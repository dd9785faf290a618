"""Fixtures of the MoE tests."""

import keras
import pytest


@pytest.fixture
def mixed_bfloat16():
    """Runs a test under the ``mixed_bfloat16`` policy and restores the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(1234)
