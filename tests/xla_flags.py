"""XLA flags of the test suite's processes.

The suite compiles hundreds of tiny XLA programs (JAX model tests, jit-compiled train steps) and
runs each a few times, so compilation, not execution, is most of their time. LLVM's -O0 for
XLA:CPU (``--xla_backend_optimization_level=0``) cut the JAX model tests' CPU time by about a
quarter (18.9 against 24.5 CPU-minutes, ``KERAS_BACKEND=jax pytest -m both_backends``, 2 cores).
Numerics are XLA's either way; only the machine code is less optimised. ``tests/conftest.py`` sets
these flags for the pytest process, and subprocesses inherit them; tests that set ``XLA_FLAGS``
of their own (host device counts) build it with :func:`xla_flags`.
"""

import os

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def xla_flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a test process: this process' flags, then ``extra`` (no repeats)."""
    flags = os.environ.get("XLA_FLAGS", "").split() + list(extra)
    return " ".join(dict.fromkeys(flags))
