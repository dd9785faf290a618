"""The MoE router: a linear gating layer, noisy in training, softmax gates and top-k experts.

V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", Eq. (2)) and
LIMoE (Mustafa et al. 2022) route each token ``x`` with::

    logits   = x W                                  [..., experts]   (no bias)
    noisy    = logits + eps,  eps ~ N(0, sigma^2)   (training only)
    gates    = softmax(noisy)                       [..., experts]
    experts  = top_k(gates)                         [..., k]         (LIMoE: k = 1)

The noise std is ``sigma = noise_std / num_experts`` as in V-MoE's reference code
(``vmoe/nn/routing.py``, ``NoisyTopExpertsPerItemRouter``: ``noise_std = (1 / E) * noise_std``),
so ``noise_std = 1.0`` is V-MoE's default.

The router runs in float32 whatever the model's dtype policy (its own ``dtype="float32"``): the
inputs are cast up, the kernel is kept and used in float32, so routing decisions and the softmax are
not subject to bfloat16 rounding.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.dropout import FixedSeed


@keras.saving.register_keras_serializable(package="keras_mm")
class Router(keras.layers.Layer):
    """``[..., width] -> routing dict`` (float32).

    Args:
        num_experts: E.
        num_selected: k, the experts chosen per token (LIMoE and V-MoE's default: 1).
        noise_std: V-MoE's relative noise std; the logits get Gaussian noise of std
            ``noise_std / num_experts`` in training. 0 disables it.
        kernel_initializer: of the ``[width, experts]`` kernel; default ``"lecun_normal"``
            (flax ``nn.Dense``'s default, which V-MoE's router uses).

    Call args:
        x: ``[..., width]``.
        training: adds the noise.
        seed: optional seed tensor ``[2]`` for the noise (drawn by a rematerialising caller).

    Returns:
        a dict of float32 / int32 tensors:
        ``"logits"`` ``[..., E]`` (clean), ``"noisy_logits"`` ``[..., E]`` (equal to the logits
        without noise), ``"gates"`` ``[..., E]`` softmax of the clean logits, ``"routing_gates"``
        ``[..., E]`` softmax of the noisy logits (these decide and weight the routing),
        ``"expert_index"`` ``[..., k]`` int32 chosen experts (best first) and ``"expert_gate"``
        ``[..., k]`` their routing gates.
    """

    def __init__(self, num_experts, num_selected=1, noise_std=0.0,
                 kernel_initializer="lecun_normal", **kwargs):
        kwargs["dtype"] = "float32"            # routing is always float32 (see the module doc)
        super().__init__(**kwargs)
        self.num_experts = int(num_experts)
        self.num_selected = int(num_selected)
        if not 1 <= self.num_selected <= self.num_experts:
            raise ValueError(f"need 1 <= num_selected <= num_experts, got "
                             f"num_selected={num_selected}, num_experts={num_experts}")
        self.noise_std = float(noise_std)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed_generator = keras.random.SeedGenerator() if self.noise_std else None

    @property
    def absolute_noise_std(self):
        """The std of the noise added to the logits: ``noise_std / num_experts``."""
        return self.noise_std / self.num_experts

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.num_experts),
                                      initializer=self.kernel_initializer)

    def call(self, x, training=None, seed=None):
        logits = ops.matmul(ops.cast(x, "float32"), ops.cast(self.kernel, "float32"))  # [..., E]
        noisy_logits = logits
        if training and self.noise_std:
            seed = FixedSeed(seed) if seed is not None else self.seed_generator
            noise = keras.random.normal(ops.shape(logits), stddev=self.absolute_noise_std,
                                        dtype="float32", seed=seed)
            noisy_logits = logits + noise
        routing_gates = ops.softmax(noisy_logits, axis=-1)
        expert_gate, expert_index = ops.top_k(routing_gates, self.num_selected)   # [..., k]
        return {
            "logits": logits,
            "noisy_logits": noisy_logits,
            "gates": ops.softmax(logits, axis=-1) if noisy_logits is not logits else routing_gates,
            "routing_gates": routing_gates,
            "expert_index": ops.cast(expert_index, "int32"),
            "expert_gate": expert_gate,
        }

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)              # always float32, set in __init__
        config.update(num_experts=self.num_experts, num_selected=self.num_selected,
                      noise_std=self.noise_std,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config
