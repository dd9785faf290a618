"""Sparse mixture-of-experts MLP (V-MoE, Riquelme et al. 2021; LIMoE, Mustafa et al. 2022).

E experts, each the transformer MLP ``Dense -> GELU -> dropout -> Dense`` of
``keras_mm.layers.mlp.Mlp``, stored as ONE batched weight tensor per parameter so all experts run in
the same einsums and the expert dimension can be sharded (expert parallelism,
``keras_mm.moe.expert_parallel``)::

    experts_kernel_in   [experts, width, hidden]     experts_bias_in   [experts, hidden]
    experts_kernel_out  [experts, hidden, width]     experts_bias_out  [experts, width]

A call, for ``x`` ``[batch, tokens, width]``:

    routing = router(x)                                    (keras_mm.moe.router)
    groups  [groups, group_size, width]                    (keras_mm.moe.dispatch.group_tokens)
    dispatch, combine  [groups, group_size, experts, capacity]
    inputs  = einsum(dispatch, groups)                     [experts, groups, capacity, width]
    outputs = expert MLPs(inputs)                          [experts, groups, capacity, width]
    y       = einsum(combine, outputs)                     [groups, group_size, width]
                                                           -> [batch, tokens, width]

so ``y_t = sum over t's dispatched choices e of gate_e(t) * MLP_e(x_t)`` (V-MoE Eq. (1)); a token
with no slot gets ``y_t = 0``. The gates are *not* renormalised over the top-k (as V-MoE).

Nothing is stored on the layer during a call: the routing information (for the auxiliary losses
and statistics) is returned with ``return_routing=True``, so the layer works under
``tf.function``, ``jax.jit``, ``tf.distribute`` and rematerialisation.

Under a JAX ``keras.distribution`` (``ModelParallel``) the layer asks the distribution for a layout
of its dispatched activations at ``<layer path>/expert_inputs`` and ``<layer path>/expert_outputs``
(``[experts, groups, capacity, width]``) and constrains them to it;
``keras_mm.moe.expert_parallel.expert_layout_map`` fills those entries (experts over the model
axis) so XLA exchanges tokens between devices (all-to-all) instead of gathering expert weights.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.dropout import dropout as _dropout
from keras_mm.moe.dispatch import expert_capacity, group_tokens, top_k_dispatch, ungroup_tokens
from keras_mm.moe.router import Router


@keras.saving.register_keras_serializable(package="keras_mm")
class MoeMlp(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]`` (and the routing, on request).

    Args:
        num_experts: E.
        hidden_dim: hidden width of each expert (the dense model's ``mlp_dim``).
        num_selected: k, experts per token (LIMoE: 1; V-MoE: 1 or 2).
        capacity_factor: ``C = ceil(capacity_factor * k * group_size / E)`` slots per expert and
            group in training.
        eval_capacity_factor: the same at inference (V-MoE evaluates with a larger one);
            default ``capacity_factor``.
        group_size: tokens routed together (V-MoE's group size); the flattened
            ``batch * tokens`` tokens are cut into groups of this size, the last one padded.
        bpr: Batch Priority Routing (V-MoE Sec. 4.1): slots go to tokens by descending top-1
            gate instead of by position. Applied in training and at inference.
        noise_std: relative router noise in training (absolute std ``noise_std / E``, V-MoE);
            0 for none.
        activation: of the experts' hidden layer; ``"gelu_approximate"`` (tanh form, as
            ``Mlp``) or any Keras activation name.
        dropout: rate after the hidden activation (training only).
        kernel_initializer: of the expert kernels, applied *per expert*: a variance-scaling
            initializer (glorot, lecun, he) gets its fans from ``[width, hidden]``, not from the
            whole ``[E, width, hidden]`` tensor.
        bias_initializer: of the expert biases (default normal, stddev 1e-6, as ``Mlp``).
        router_kernel_initializer: of the router kernel ``[width, E]``.

    Call args:
        x: ``[batch, tokens, width]``.
        training: router noise, dropout, ``capacity_factor`` instead of ``eval_capacity_factor``.
        token_mask: optional ``[batch, tokens]`` (1 = real token): masked tokens (padding) claim
            no expert slot and get output 0.
        seed: optional seed tensor ``[2]`` for the noise and the dropout (drawn by a
            rematerialising caller).
        return_routing: also return the routing dict.

    Returns:
        ``y`` ``[batch, tokens, width]``, or ``(y, routing)`` where ``routing`` holds:
        ``"gates"`` ``[batch, tokens, E]`` float32 softmax of the clean router logits;
        ``"logits"``, ``"noisy_logits"`` ``[batch, tokens, E]`` float32 (for the load loss; equal
        at inference); ``"expert_index"`` ``[batch, tokens]`` int32 top-1 expert;
        ``"expert_indices"`` ``[batch, tokens, k]`` int32; ``"dispatched"`` ``[batch, tokens, k]``
        float32 (1 = that choice got a slot); ``"kept"`` ``[batch, tokens]`` float32 (1 = routed
        to at least one expert within capacity).
    """

    def __init__(self, num_experts, hidden_dim, num_selected=1, capacity_factor=1.0,
                 eval_capacity_factor=None, group_size=256, bpr=True, noise_std=0.0,
                 activation="gelu_approximate", dropout=0.0, kernel_initializer="glorot_uniform",
                 bias_initializer=None, router_kernel_initializer="lecun_normal", **kwargs):
        super().__init__(**kwargs)
        self.num_experts = int(num_experts)
        self.hidden_dim = int(hidden_dim)
        self.num_selected = int(num_selected)
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = (None if eval_capacity_factor is None
                                     else float(eval_capacity_factor))
        self.group_size = int(group_size)
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.bpr = bool(bpr)
        self.noise_std = float(noise_std)
        self.activation = activation
        self.dropout = float(dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(
            bias_initializer or keras.initializers.RandomNormal(stddev=1e-6))
        self._activation_fn = (_gelu_approximate if activation == "gelu_approximate"
                               else keras.activations.get(activation))
        self.router = Router(self.num_experts, num_selected=self.num_selected,
                             noise_std=self.noise_std,
                             kernel_initializer=router_kernel_initializer, name="router")
        self.router_kernel_initializer = self.router.kernel_initializer
        self.seed_generator = keras.random.SeedGenerator() if self.dropout else None
        for factor in (self.capacity_factor, self.eval_capacity_factor or 1.0):
            expert_capacity(self.group_size, self.num_experts, self.num_selected, factor)

    def capacity(self, training=False):
        """Slots per expert and group: C for training or inference (python int)."""
        factor = self.capacity_factor
        if not training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return expert_capacity(self.group_size, self.num_experts, self.num_selected, factor)

    def build(self, input_shape):
        width, experts, hidden = int(input_shape[-1]), self.num_experts, self.hidden_dim
        kernel_init = _per_expert(self.kernel_initializer, experts)

        def bias_init():
            return keras.initializers.get(keras.initializers.serialize(self.bias_initializer))

        self.router.build(input_shape)
        self.experts_kernel_in = self.add_weight(
            name="experts_kernel_in", shape=(experts, width, hidden), initializer=kernel_init)
        self.experts_bias_in = self.add_weight(
            name="experts_bias_in", shape=(experts, hidden), initializer=bias_init())
        self.experts_kernel_out = self.add_weight(
            name="experts_kernel_out", shape=(experts, hidden, width), initializer=kernel_init)
        self.experts_bias_out = self.add_weight(
            name="experts_bias_out", shape=(experts, width), initializer=bias_init())

    def call(self, x, training=None, token_mask=None, seed=None, return_routing=False):
        training = bool(training)
        noise_seed = dropout_seed = None
        if seed is not None:   # two streams from one seed tensor
            noise_seed, dropout_seed = seed, seed + ops.ones_like(seed)
        batch_shape = ops.shape(x)[:2]
        routing = self.router(x, training=training, seed=noise_seed)    # [b, n, ...] float32
        capacity = self.capacity(training)

        groups, valid = group_tokens(x, self.group_size)                 # [G, S, w], [G, S]
        expert_index, _ = group_tokens(routing["expert_index"], self.group_size)   # [G, S, k]
        expert_gate, _ = group_tokens(routing["expert_gate"], self.group_size)
        if token_mask is not None:
            mask, _ = group_tokens(ops.cast(token_mask, "float32")[..., None], self.group_size)
            valid = valid * mask[..., 0]
        tensors = top_k_dispatch(expert_index, expert_gate, self.num_experts, capacity,
                                 batch_priority=self.bpr, valid=valid, dtype=x.dtype)

        inputs = ops.einsum("gsec,gsw->egcw", tensors["dispatch"], groups)   # [E, G, C, w]
        inputs = self._constrain(inputs, "expert_inputs")
        h = ops.einsum("egcw,ewh->egch", inputs, self.experts_kernel_in)
        h = self._activation_fn(h + self.experts_bias_in[:, None, None, :])
        if training and self.dropout:
            h = _dropout(h, self.dropout,
                         dropout_seed if dropout_seed is not None else self.seed_generator)
        outputs = ops.einsum("egch,ehw->egcw", h, self.experts_kernel_out)
        outputs = outputs + self.experts_bias_out[:, None, None, :]
        outputs = self._constrain(outputs, "expert_outputs")
        y = ops.einsum("gsec,egcw->gsw", tensors["combine"], outputs)        # [G, S, w]
        y = ungroup_tokens(y, batch_shape)
        if not return_routing:
            return y
        dispatched = ungroup_tokens(tensors["dispatched"], batch_shape)       # [b, n, k]
        return y, {
            "gates": routing["gates"],
            "logits": routing["logits"],
            "noisy_logits": routing["noisy_logits"],
            "expert_index": routing["expert_index"][..., 0],
            "expert_indices": routing["expert_index"],
            "dispatched": dispatched,
            "kept": ops.max(dispatched, axis=-1),
        }

    def _constrain(self, tensor, name):
        """Applies the active ``keras.distribution``'s layout for ``<path>/<name>``, if any."""
        distribution = keras.distribution.distribution()
        if distribution is None:
            return tensor
        layout = distribution.get_tensor_layout(f"{self.path}/{name}")
        if layout is None:
            return tensor
        return keras.distribution.distribute_tensor(tensor, layout)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts, hidden_dim=self.hidden_dim,
            num_selected=self.num_selected, capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor, group_size=self.group_size,
            bpr=self.bpr, noise_std=self.noise_std, activation=self.activation,
            dropout=self.dropout,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            router_kernel_initializer=keras.initializers.serialize(
                self.router_kernel_initializer))
        return config


def _per_expert(initializer, num_experts):
    """``initializer`` for an ``[experts, fan_in, fan_out]`` tensor, scaled as for one expert.

    Keras' variance-scaling initializers take ``prod(shape[:-2]) = experts`` as a receptive field
    and would divide the variance by E; multiplying their ``scale`` by E gives every expert the
    variance of a ``[fan_in, fan_out]`` kernel (in all ``fan_in`` / ``fan_out`` / ``fan_avg``
    modes). Other initializers are used as they are.
    """
    config = keras.initializers.serialize(initializer)
    initializer = keras.initializers.get(config)                # a fresh copy
    if isinstance(initializer, keras.initializers.VarianceScaling):
        initializer.scale = initializer.scale * num_experts
    return initializer


def _gelu_approximate(x):
    return keras.activations.gelu(x, approximate=True)
