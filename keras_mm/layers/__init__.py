"""Backend-agnostic Keras 3 building blocks (keras.ops only): attention, MLP, transformer blocks,
patch and position embeddings, pooling. Import the modules directly."""
