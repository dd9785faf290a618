"""Mixed precision: the global Keras dtype policy and the loss scaling float16 needs.

==================  ==================  ===============  ===========================================
precision           compute dtype       variable dtype   optimizer
==================  ==================  ===============  ===========================================
``float32``         float32             float32          as is
``mixed_bfloat16``  bfloat16            float32          as is (bfloat16 has float32's range)
``mixed_float16``   float16             float32          wrapped in ``keras.optimizers.
                                                         LossScaleOptimizer`` (dynamic loss scale)
==================  ==================  ===============  ===========================================

Set the policy before building the model: layers read the global policy when they are created. Logits and
losses stay float32 (DESIGN.md): layers that need it pass ``dtype="float32"`` (e.g. ContrastiveLogits).
Under ``mixed_float16`` a custom ``train_step`` must differentiate ``self.optimizer.scale_loss(loss)``
(Keras' own train_step does; the LossScaleOptimizer unscales the gradients and skips non-finite steps).
"""

import keras

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def set_precision(precision):
    """Sets the global dtype policy (``keras.config.set_dtype_policy``) and returns it.

    Raises:
      ValueError: unknown precision.
    """
    keras.config.set_dtype_policy(check_precision(precision))
    return keras.config.dtype_policy()


def current_precision():
    """The name of the global dtype policy ("float32", "mixed_bfloat16", ...)."""
    return keras.config.dtype_policy().name


def wrap_optimizer(optimizer, precision=None):
    """``optimizer`` wrapped in a ``LossScaleOptimizer`` under ``mixed_float16`` (``precision`` or the
    global policy), else unchanged. Idempotent."""
    precision = check_precision(precision) if precision is not None else current_precision()
    if precision == "mixed_float16" and not isinstance(optimizer,
                                                        keras.optimizers.LossScaleOptimizer):
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
