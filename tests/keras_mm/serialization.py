"""Shared test helper: serialization round trips of keras_mm layers and models.

``assert_serialization_round_trip(obj, inputs)`` checks, for a layer or a model:

1. ``type(obj).from_config(obj.get_config())`` has the same config, and - given the original
   weights - computes the same outputs (so the config holds everything but the weights);
2. ``model.save("x.keras")`` + ``keras.saving.load_model`` gives the same class and identical
   outputs (a layer is wrapped in a functional model for this step).

``inputs``: one array, or a tuple / list of arrays passed positionally. ``call_kwargs``: keyword
arguments of the call; arrays among them become model inputs, other values are passed as is.
Everything runs in inference mode (no ``training=True``).
"""

from __future__ import annotations

import os
import tempfile

import keras
import numpy as np


def _as_args(inputs):
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def _call(obj, inputs, call_kwargs):
    return obj(*_as_args(inputs), **(call_kwargs or {}))


def _numpy(outputs):
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def _assert_same(expected, actual, atol, what):
    assert len(expected) == len(actual), what
    for e, a in zip(expected, actual):
        assert e.shape == a.shape, f"{what}: shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), atol=atol,
                                   rtol=0, err_msg=what)


def _functional_wrapper(layer, inputs, call_kwargs):
    """A functional model calling ``layer``; returns (model, model inputs as a list)."""
    model_inputs, arrays = [], []

    def make_input(array, name):
        array = np.asarray(array)
        tensor = keras.Input(shape=array.shape[1:], dtype=str(array.dtype), name=name)
        model_inputs.append(tensor)
        arrays.append(array)
        return tensor

    args = [make_input(a, f"arg{i}") for i, a in enumerate(_as_args(inputs))]
    kwargs = {}
    for key, value in (call_kwargs or {}).items():
        is_array = isinstance(value, np.ndarray) or hasattr(value, "shape")
        kwargs[key] = make_input(value, f"kw_{key}") if is_array else value
    outputs = layer(*args, **kwargs)
    return keras.Model(model_inputs, outputs), arrays


def assert_serialization_round_trip(layer_or_model, inputs, call_kwargs=None, atol=1e-6,
                                    directory=None):
    """See the module docstring. Returns the object loaded from the ``.keras`` file."""
    obj = layer_or_model
    expected = _numpy(_call(obj, inputs, call_kwargs))

    # 1. get_config / from_config.
    config = obj.get_config()
    revived = type(obj).from_config(config)
    assert revived.get_config() == config, "from_config(get_config()) changed the config"
    _call(revived, inputs, call_kwargs)                       # builds it
    assert len(revived.weights) == len(obj.weights), "revived object has other weights"
    revived.set_weights(obj.get_weights())
    _assert_same(expected, _numpy(_call(revived, inputs, call_kwargs)), atol,
                 "outputs after from_config + set_weights")

    # 2. .keras file.
    if isinstance(obj, keras.Model):
        model, model_args, model_kwargs = obj, _as_args(inputs), call_kwargs or {}
    else:
        model, arrays = _functional_wrapper(obj, inputs, call_kwargs)
        model_args, model_kwargs = (arrays,), {}
    owned = directory is None
    directory = directory or tempfile.mkdtemp(prefix="kmm_serialization_")
    path = os.path.join(directory, "round_trip.keras")
    try:
        model.save(path)
        loaded = keras.saving.load_model(path)
    finally:
        if owned and os.path.exists(path):
            os.remove(path)
            os.rmdir(directory)
    assert type(loaded) is type(model)
    if not isinstance(obj, keras.Model):
        assert any(type(layer) is type(obj) for layer in loaded.layers), \
            f"the loaded model holds no {type(obj).__name__}"
    actual = _numpy(loaded(*model_args, **model_kwargs))
    _assert_same(expected, actual, atol, "outputs after model.save + keras.saving.load_model")
    return loaded
