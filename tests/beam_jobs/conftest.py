"""Fixtures for the Beam job tests (helpers live in image_samples.py and image_server.py)."""

from __future__ import annotations

import pytest

from tests.beam_jobs.image_samples import Images
from tests.beam_jobs.image_server import ImageServer


@pytest.fixture(scope="session")
def images() -> Images:
    return Images()


@pytest.fixture(scope="module")
def http_server():
    """A fresh server per test module; tests add routes with ``server.routes[path] = Route()``."""
    with ImageServer({}) as server:
        yield server
