"""Suite-wide settings: XLA flags, test ordering, and which cases rerun on JAX."""

import os

from tests.xla_flags import TEST_XLA_FLAGS, xla_flags

os.environ["XLA_FLAGS"] = xla_flags(*TEST_XLA_FLAGS)

# The longest single tests (minutes each). They are collected first, so that with pytest-xdist
# (README: -n 2 --dist loadfile) they start at once and overlap the rest of the suite instead of
# ending the run alone.
LONGEST_FIRST = ("tests/keras_mm/test_jax_backend.py", "tests/e2e/test_video_demo.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 0 if item.nodeid.startswith(LONGEST_FIRST) else 1)
    if os.environ.get("KERAS_BACKEND") == "jax":
        _first_case_only_on_jax(config, items)


def _first_case_only_on_jax(config, items):
    """On JAX (tests/keras_mm/test_jax_backend.py reruns the ``both_backends`` tests there), a
    parametrized test runs its first case only, unless marked ``jax_all_cases``: its cases are
    then different models (the captioner kinds), not different settings of one model. TensorFlow
    runs every case."""
    seen, kept, dropped = set(), [], []
    for item in items:
        if (not hasattr(item, "callspec") or item.get_closest_marker("both_backends") is None
                or item.get_closest_marker("jax_all_cases") is not None):
            kept.append(item)
            continue
        function = item.nodeid.split("[", 1)[0]
        (dropped if function in seen else kept).append(item)
        seen.add(function)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
