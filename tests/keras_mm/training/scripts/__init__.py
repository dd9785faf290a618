"""Helper programs of the training tests, run in subprocesses (devices, kills, several workers)."""
