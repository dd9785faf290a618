"""Image, text (and later video / one-tower) encoders built from keras_mm.layers, with presets."""
