"""Model-level tests run on both backends: this process is TensorFlow (Keras' default);
here every test marked ``both_backends`` runs again in a subprocess with KERAS_BACKEND=jax."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_both_backends_tests_pass_on_jax():
    if os.environ.get("KERAS_BACKEND") == "jax":
        pytest.skip("already running on JAX")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["KERAS_BACKEND"] = "jax"
    # Two processes (pytest-xdist, a file each at a time): this is the longest single test.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "both_backends", "-p", "no:cacheprovider",
         "-n", "2", "--dist", "loadfile", "tests/keras_mm"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=1500)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
    # Exit 5 (nothing selected) means no model test is marked yet: that is a failure too.
    assert result.returncode == 0, tail
    assert " passed" in result.stdout and "jax" in subprocess.run(
        [sys.executable, "-c", "import keras; print(keras.backend.backend())"], env=env,
        capture_output=True, text=True).stdout, tail
