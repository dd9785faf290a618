"""Suite-wide test ordering."""

# The longest single tests (minutes each). They are collected first, so that with pytest-xdist
# (README: -n 2 --dist loadfile) they start at once and overlap the rest of the suite instead of
# ending the run alone.
LONGEST_FIRST = ("tests/keras_mm/test_jax_backend.py", "tests/e2e/test_video_demo.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: 0 if item.nodeid.startswith(LONGEST_FIRST) else 1)
