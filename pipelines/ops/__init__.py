"""Pure ``dict -> dict`` preprocessing ops, each usable eagerly and inside tf.data."""
