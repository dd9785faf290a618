"""LastValue: a Keras metric that reports the most recent value (for t and b in the logs)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mm")
class LastValue(keras.metrics.Metric):
    """Reports the last value given to ``update_state`` (a scalar), e.g. a learnable temperature.

    Under tf.distribute every replica sees the same mirrored scalar, so the value is the same
    whichever replica's update is read.
    """

    def __init__(self, name="last_value", dtype="float32"):
        super().__init__(name=name, dtype=dtype)
        self.value = self.add_variable(shape=(), initializer="zeros", name="value",
                                       aggregation="only_first_replica")

    def update_state(self, value, sample_weight=None):
        self.value.assign(ops.cast(ops.reshape(value, ()), self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)

    def reset_state(self):
        self.value.assign(0.0)
