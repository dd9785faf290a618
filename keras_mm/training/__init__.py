"""Training utilities: cross-replica gather, strategies, optimizers, callbacks, checkpoints."""
