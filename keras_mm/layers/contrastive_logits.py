"""The learnable scalars of a contrastive head and the logits they give.

CLIP (Radford et al. 2021, Sec. 2.5): logits = s * cos(x, y), s = exp(log_scale), log_scale initialised at
log(1 / 0.07) and s clipped at 100. SigLIP (Zhai et al. 2023, Eq. (1)): logits = t * cos(x, y) + b,
t = exp(t'), initialised t' = log 10 and b = -10. The losses in keras_mm.losses take these variables
(``log_scale`` as t' or CLIP's log-scale, ``bias`` as b) directly.
"""

import math

import keras
from keras import ops

_DEFAULTS = {
    # loss_type: (log_scale_init, bias_init, max_scale)
    "softmax": (math.log(1.0 / 0.07), None, 100.0),
    "sigmoid": (math.log(10.0), -10.0, None),
}


@keras.saving.register_keras_serializable(package="keras_mm")
class ContrastiveLogits(keras.layers.Layer):
    """Learnable logit scale (and bias) of a two-tower contrastive model.

    Args:
        loss_type: "sigmoid" (SigLIP: scale and bias) or "softmax" (CLIP: scale only; a bias cancels in a
            softmax).
        log_scale_init: initial log of the scale; default log 10 (sigmoid) or log(1 / 0.07) (softmax).
        bias_init: initial bias; default -10 (sigmoid). Must be None for softmax.
        max_scale: the scale is clipped at this value; default 100 for softmax (CLIP), None (no clip) for
            sigmoid.
        **kwargs: Layer arguments. ``dtype`` defaults to "float32": the scalars and the logits stay float32
            under a mixed-precision global policy.

    Attributes:
        log_scale: scalar variable, CLIP's log-scale or SigLIP's t'.
        bias: scalar variable b (sigmoid) or None (softmax).
        scale: s = min(exp(log_scale), max_scale), a float32 scalar tensor (SigLIP's t, CLIP's 1 / tau).
        temperature: 1 / scale, CLIP's tau (init 0.07).

    Call arguments:
        image_emb: [N, D] L2-normalised image embeddings.
        text_emb: [M, D] L2-normalised text embeddings.

    Returns:
        [N, M] float32 logits, scale * image_emb @ text_emb.T (+ bias).
    """

    def __init__(self, loss_type="sigmoid", log_scale_init=None, bias_init=None, max_scale="default",
                 **kwargs):
        if loss_type not in _DEFAULTS:
            raise ValueError(
                f"ContrastiveLogits: loss_type must be one of {sorted(_DEFAULTS)}, got {loss_type!r}")
        default_log_scale, default_bias, default_max_scale = _DEFAULTS[loss_type]
        if loss_type == "softmax" and bias_init is not None:
            raise ValueError(
                "ContrastiveLogits: a softmax head has no bias (it cancels); pass bias_init=None.")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.loss_type = loss_type
        self.log_scale_init = float(default_log_scale if log_scale_init is None else log_scale_init)
        self.bias_init = None
        if loss_type == "sigmoid":
            self.bias_init = float(default_bias if bias_init is None else bias_init)
        self.max_scale = default_max_scale if max_scale == "default" else (
            None if max_scale is None else float(max_scale))
        self.build()

    def build(self, input_shape=None):
        # The scalars do not depend on the input shape: they exist as soon as the layer does, so a
        # train_step can hand them to a loss before the layer is ever called.
        self.log_scale = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.log_scale_init), name="log_scale")
        self.bias = None
        if self.bias_init is not None:
            self.bias = self.add_weight(
                shape=(), initializer=keras.initializers.Constant(self.bias_init), name="bias")

    @property
    def scale(self):
        log_scale = ops.cast(self.log_scale, "float32")
        if self.max_scale is not None:
            log_scale = ops.minimum(log_scale, math.log(self.max_scale))
        return ops.exp(log_scale)

    @property
    def temperature(self):
        return 1.0 / self.scale

    def call(self, image_emb, text_emb):
        image_emb = ops.cast(image_emb, "float32")  # [N, D]
        text_emb = ops.cast(text_emb, "float32")  # [M, D]
        logits = self.scale * ops.matmul(image_emb, ops.transpose(text_emb))  # [N, M]
        if self.bias is not None:
            logits = logits + ops.cast(self.bias, "float32")
        return logits

    def probabilities(self, logits):
        """[N, M] logits -> sigmoid(logits) (sigmoid head) or softmax over the M texts (softmax head)."""
        if self.loss_type == "sigmoid":
            return ops.sigmoid(logits)
        return ops.softmax(logits, axis=-1)

    def compute_output_shape(self, image_emb_shape, text_emb_shape):
        return (image_emb_shape[0], text_emb_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(loss_type=self.loss_type, log_scale_init=self.log_scale_init, bias_init=self.bias_init,
                      max_scale=self.max_scale)
        return config
