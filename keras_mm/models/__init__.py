"""keras.Model subclasses, one per method (import the modules directly)."""
