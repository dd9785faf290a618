"""Model-level tests run on both backends: this process is TensorFlow (Keras' default);
here every test marked ``both_backends`` runs again in a subprocess with KERAS_BACKEND=jax.

On JAX a parametrized test runs its first case only, unless it is marked ``jax_all_cases`` (its
cases are different models, e.g. the four captioners); TensorFlow runs every case
(``tests/conftest.py``)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _env(**extra):
    """This process' environment for a nested pytest: without xdist's worker variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return dict(env, **extra)


@pytest.mark.slow
def test_both_backends_tests_pass_on_jax():
    if os.environ.get("KERAS_BACKEND") == "jax":
        pytest.skip("already running on JAX")
    env = _env(KERAS_BACKEND="jax")
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


def test_jax_reruns_one_case_per_test_unless_its_cases_are_models():
    collected = {}
    for backend in ("tensorflow", "jax"):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "both_backends",
             "-p", "no:cacheprovider", "tests/keras_mm/models/test_captioners.py"],
            cwd=ROOT, env=_env(KERAS_BACKEND=backend), capture_output=True, text=True,
            timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        collected[backend] = [line for line in result.stdout.splitlines() if "::" in line]
    tf_ids, jax_ids = collected["tensorflow"], collected["jax"]
    assert set(jax_ids) < set(tf_ids)
    name = "tests/keras_mm/models/test_captioners.py::"
    # marked jax_all_cases: every captioner on both backends
    fits = [i for i in jax_ids if i.startswith(name + "test_fit_learns_the_batch[")]
    assert len(fits) == 4 == len([i for i in tf_ids if i.startswith(fits[0].split("[")[0])])
    # not marked: the first case only on JAX
    scores = [i for i in tf_ids if i.startswith(name + "test_score_texts_is_the_caption_")]
    assert len(scores) == 2
    assert [i for i in jax_ids if i in scores] == scores[:1]
    # unparametrized tests stay
    plain = [i for i in tf_ids if "[" not in i]
    assert plain and set(plain) <= set(jax_ids)
