"""Multi-head dot-product attention (Vaswani et al. 2017) on keras.ops, with the options the
methods here need: fused q/k/v projection, QK LayerNorm (ViT-22B, Dehghani et al. 2023), no qkv
bias (ViT-22B), padding / causal masks, cross-attention (MAP pooling, captioning decoders).

    q = x W_q, k = y W_k, v = y W_v                     [batch, tokens, heads, head_dim]
    A = softmax(q k^T / sqrt(head_dim) + mask)          [batch, heads, q_tokens, kv_tokens]
    out = concat_heads(A v) W_o                         [batch, q_tokens, output_dim]

The softmax is computed in float32 whatever the compute dtype (mixed precision).
"""

from __future__ import annotations

import functools
import math

import keras
from keras import ops

from keras_mm.layers.dropout import dropout as _dropout

ATTENTION_IMPLS = ("auto", "einsum", "dot_product")
# Measured on the TensorFlow backend on 2 CPU cores, forward + backward of one layer (min of 15
# runs, CPU ms): tiny sizes [64, 64, 192], 3 heads: einsum 27.2, dot_product 31.7, keras'
# MultiHeadAttention 37.4; B/16 sizes [8, 197, 768], 12 heads: einsum 129.5, dot_product 143.9,
# keras 149.7. (TF's dot_product_attention is an einsum-softmax-einsum too, with transposes.)
# On JAX CPU the two are within noise. On a JAX GPU, dot_product_attention runs cuDNN's fused
# (flash) attention: `kmm bench two-tower --preset b16 --batch_size 256 --precision
# mixed_bfloat16` on one H200 gave 2030 examples/s with einsum against keras-hub's 2477 with
# the fused kernel. "auto" therefore takes dot_product on the JAX backend when the default
# device is a GPU or TPU (and the query has more than one token: cuDNN rejects a single query,
# as in MAP pooling), einsum everywhere else.
DEFAULT_ATTENTION_IMPL = "auto"
_MASK_VALUE = -1e9  # finite: a fully masked row gives a uniform softmax, not NaN


def attention_mask(padding_mask=None, causal=False, query_length=None, key_length=None):
    """A boolean mask broadcastable to ``[batch, heads, q_tokens, kv_tokens]`` (True = attend).

    Args:
        padding_mask: ``[batch, kv_tokens]`` (keys to keep), ``[batch, q_tokens, kv_tokens]`` or
            ``[batch, heads|1, q_tokens, kv_tokens]``, bool or 0/1; None for no padding.
        causal: also forbid query ``i`` to see keys ``j > i``.
        query_length, key_length: token counts (needed for ``causal``).
    Returns:
        bool tensor of rank 4, or None when there is nothing to mask.
    """
    mask = None
    if padding_mask is not None:
        mask = ops.cast(padding_mask, "bool")
        if len(mask.shape) == 2:
            mask = mask[:, None, None, :]
        elif len(mask.shape) == 3:
            mask = mask[:, None, :, :]
        elif len(mask.shape) != 4:
            raise ValueError(f"attention mask must have rank 2, 3 or 4, got shape {mask.shape}")
    if causal:
        if query_length is None or key_length is None:
            raise ValueError("a causal mask needs query_length and key_length")
        rows = ops.arange(query_length)[:, None]
        cols = ops.arange(key_length)[None, :]
        future_ok = ops.greater_equal(rows, cols)[None, None]           # [1, 1, q, kv]
        mask = future_ok if mask is None else ops.logical_and(mask, future_ok)
    return mask


@keras.saving.register_keras_serializable(package="keras_mm")
class MultiHeadAttention(keras.layers.Layer):
    """Multi-head attention.

    Call ``layer(query)`` for self-attention, ``layer(query, value)`` for cross-attention (keys
    and values both come from ``value``).

    Args:
        num_heads: number of heads.
        head_dim: size of each head; default ``query width // num_heads``.
        output_dim: width of the output; default the query width.
        fused_qkv: one projection ``[width, 3, heads, head_dim]`` for q, k and v (self-attention)
            or one ``[width, 2, heads, head_dim]`` for k and v (cross-attention): fewer, larger
            matmuls. False: separate q, k and v kernels.
        use_qkv_bias: biases on the q/k/v projections (ViT-22B drops them).
        use_output_bias: bias on the output projection.
        qk_norm: LayerNorm over ``head_dim`` on queries and keys before the dot product (ViT-22B).
        dropout: dropout rate on the attention probabilities (training only).
        attention_impl: ``"einsum"`` (own softmax(q k^T) v), ``"dot_product"``
            (``keras.ops.dot_product_attention``: fused kernels on accelerators) or ``"auto"``
            (the default: dot_product on a JAX GPU / TPU, else einsum); see
            ``DEFAULT_ATTENTION_IMPL``. Dropout on the probabilities always uses the einsum form.
        layer_norm_epsilon: epsilon of the QK LayerNorms.
        kernel_initializer, bias_initializer: for all projections.

    Call args:
        query: ``[batch, q_tokens, width]``.
        value: ``[batch, kv_tokens, value_width]`` or None (self-attention).
        attention_mask: see ``attention_mask()``; True = may attend.
        use_causal_mask: forbid attending to later tokens.
        training: enables dropout.
        seed: optional seed tensor ``[2]`` for the dropout (drawn by a rematerialising caller).
    Returns:
        ``[batch, q_tokens, output_dim]``.
    """

    def __init__(self, num_heads, head_dim=None, output_dim=None, fused_qkv=True,
                 use_qkv_bias=True, use_output_bias=True, qk_norm=False, dropout=0.0,
                 attention_impl=None, layer_norm_epsilon=1e-6,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        attention_impl = attention_impl or DEFAULT_ATTENTION_IMPL
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {attention_impl!r}")
        self.num_heads = int(num_heads)
        self.head_dim = None if head_dim is None else int(head_dim)
        self.output_dim = None if output_dim is None else int(output_dim)
        self.fused_qkv = bool(fused_qkv)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.use_output_bias = bool(use_output_bias)
        self.qk_norm = bool(qk_norm)
        self.dropout = float(dropout)
        self.attention_impl = attention_impl
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed_generator = keras.random.SeedGenerator() if self.dropout else None
        if self.qk_norm:
            self.query_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="query_norm")
            self.key_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="key_norm")

    # -- weights -----------------------------------------------------------------------------
    def _kernel(self, name, shape):
        return self.add_weight(name=name, shape=shape, initializer=self.kernel_initializer)

    def _bias(self, name, shape):
        return self.add_weight(name=name, shape=shape, initializer=self.bias_initializer)

    def build(self, query_shape, value_shape=None):
        width = int(query_shape[-1])
        self.is_cross_attention = value_shape is not None
        value_width = int(value_shape[-1]) if self.is_cross_attention else width
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}; "
                             "give head_dim")
        heads, dim = self.num_heads, self.head_dim or width // self.num_heads
        self._dim = dim
        self._out = self.output_dim or width
        if self.fused_qkv and not self.is_cross_attention:
            self.qkv_kernel = self._kernel("qkv_kernel", (width, 3, heads, dim))
            self.qkv_bias = self._bias("qkv_bias", (3, heads, dim)) if self.use_qkv_bias else None
        else:
            self.query_kernel = self._kernel("query_kernel", (width, heads, dim))
            self.query_bias = self._bias("query_bias", (heads, dim)) if self.use_qkv_bias else None
            if self.fused_qkv:
                self.kv_kernel = self._kernel("kv_kernel", (value_width, 2, heads, dim))
                self.kv_bias = self._bias("kv_bias", (2, heads, dim)) if self.use_qkv_bias else None
            else:
                self.key_kernel = self._kernel("key_kernel", (value_width, heads, dim))
                self.value_kernel = self._kernel("value_kernel", (value_width, heads, dim))
                self.key_bias = self._bias("key_bias", (heads, dim)) if self.use_qkv_bias else None
                self.value_bias = (self._bias("value_bias", (heads, dim))
                                   if self.use_qkv_bias else None)
        self.output_kernel = self._kernel("output_kernel", (heads, dim, self._out))
        self.output_bias = self._bias("output_bias", (self._out,)) if self.use_output_bias else None
        if self.qk_norm:
            self.query_norm.build((None, None, heads, dim))
            self.key_norm.build((None, None, heads, dim))

    # -- projections -------------------------------------------------------------------------
    def _project(self, x, kernel, bias, parts):
        """``x [b, n, d] @ kernel [d, (parts,) h, k]`` -> ``parts`` tensors ``[b, n, h, k]``.

        One matmul for all parts; they are separated with ``split`` (whose gradient is a
        concatenation, where slicing would add zero-padded copies in the backward pass).
        """
        # Explicit casts: the incremental-decoding methods run outside ``__call__``, where Keras'
        # mixed-precision autocast of the variables does not apply (a no-op inside it).
        flat = ops.matmul(x, ops.cast(ops.reshape(kernel, (kernel.shape[0], -1)), x.dtype))
        if bias is not None:
            flat = flat + ops.cast(ops.reshape(bias, (-1,)), x.dtype)
        shape = tuple(ops.shape(x)[:-1]) + (self.num_heads, self._dim)
        chunks = ops.split(flat, parts, axis=-1) if parts > 1 else [flat]
        return [ops.reshape(c, shape) for c in chunks]

    def _qkv(self, query, value):
        """q, k, v as ``[batch, tokens, heads, head_dim]``."""
        if self.fused_qkv and not self.is_cross_attention:
            return self._project(query, self.qkv_kernel, self.qkv_bias, 3)
        value = query if value is None else value
        (q,) = self._project(query, self.query_kernel, self.query_bias, 1)
        if self.fused_qkv:
            k, v = self._project(value, self.kv_kernel, self.kv_bias, 2)
            return q, k, v
        (k,) = self._project(value, self.key_kernel, self.key_bias, 1)
        (v,) = self._project(value, self.value_kernel, self.value_bias, 1)
        return q, k, v

    # -- call --------------------------------------------------------------------------------
    def call(self, query, value=None, attention_mask=None, use_causal_mask=False, training=None,
             seed=None):
        if (value is not None) != self.is_cross_attention:
            raise ValueError("this layer was built for "
                             + ("cross" if self.is_cross_attention else "self")
                             + "-attention; call it the same way every time")
        q, k, v = self._qkv(query, value)                               # [b, n, h, k]
        if self.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        use_dropout = bool(training) and self.dropout > 0.0
        if _use_dot_product(self.attention_impl, q) and not use_dropout:
            mask = None
            if attention_mask is not None:
                mask = _mask_for(attention_mask, use_causal_mask, q, k)
            out = fused_attention(q, k, v, mask, 1.0 / math.sqrt(self._dim),
                                  is_causal=bool(use_causal_mask) and mask is None)
        else:
            out = self._attend(q, k, v, _mask_for(attention_mask, use_causal_mask, q, k),
                               seed if use_dropout else None, use_dropout)
        return self._output(out)                                        # [b, q, output_dim]

    def _attend(self, q, k, v, mask, seed, use_dropout):
        """softmax(q k^T / sqrt(d) + mask) v with a float32 softmax -> ``[b, q, h, k]``."""
        q = q * ops.cast(1.0 / math.sqrt(self._dim), q.dtype)
        logits = ops.cast(ops.einsum("bqhk,bshk->bhqs", q, k), "float32")  # [b, h, q, s]
        if mask is not None:
            # An additive bias built on the (small, broadcast) mask shape: cheaper than a select
            # over all logits, and its gradient is the identity.
            logits = logits + ops.where(mask, 0.0, _MASK_VALUE)
        probs = ops.cast(ops.softmax(logits, axis=-1), v.dtype)
        if use_dropout:
            probs = _dropout(probs, self.dropout,
                             seed if seed is not None else self.seed_generator)
        return ops.einsum("bhqs,bshk->bqhk", probs, v)

    # -- incremental decoding ----------------------------------------------------------------
    # A decoder generating one token at a time keeps the keys / values of the tokens so far in a
    # cache ``[batch, max_len, heads, head_dim]`` and computes those of a cross-attention
    # context once per sequence. The results equal ``call`` on the whole prefix.

    def context_key_values(self, value):
        """Cross-attention keys and values of ``value [b, s, value_width]``: two
        ``[b, s, heads, head_dim]`` tensors (QK-normed keys), for :meth:`attend_key_values`."""
        if self.fused_qkv:
            k, v = self._project(value, self.kv_kernel, self.kv_bias, 2)
        else:
            (k,) = self._project(value, self.key_kernel, self.key_bias, 1)
            (v,) = self._project(value, self.value_kernel, self.value_bias, 1)
        if self.qk_norm:
            k = self.key_norm(k)
        return k, v

    def attend_key_values(self, query, keys, values, padding_mask=None):
        """Cross-attention of ``query [b, q, width]`` to precomputed ``keys, values
        [b, s, heads, head_dim]`` (:meth:`context_key_values`) -> ``[b, q, output_dim]``.
        ``padding_mask``: ``[b, s]`` (True = attend) or None."""
        (q,) = self._project(query, self.query_kernel, self.query_bias, 1)
        if self.qk_norm:
            q = self.query_norm(q)
        mask = attention_mask(padding_mask)
        return self._output(self._attend(q, keys, values, mask, None, False))

    def self_attention_step(self, query, key_cache, value_cache, index):
        """Self-attention of the token at position ``index`` (int scalar tensor) over positions
        ``0..index``.

        Args:
            query: ``[b, 1, width]``, the new token.
            key_cache, value_cache: ``[b, max_len, heads, head_dim]``; positions ``< index``
                hold the earlier tokens' keys / values.
        Returns:
            ``(out [b, 1, output_dim], key_cache, value_cache)`` with this token's key and value
            written at ``index``.
        """
        q, k, v = self._qkv(query, None)                                # [b, 1, h, k]
        if self.qk_norm:
            q, k = self.query_norm(q), self.key_norm(k)
        index = ops.cast(index, "int32")
        start = (0, index, 0, 0)
        key_cache = ops.slice_update(key_cache, start, ops.cast(k, key_cache.dtype))
        value_cache = ops.slice_update(value_cache, start, ops.cast(v, value_cache.dtype))
        visible = ops.less_equal(ops.arange(ops.shape(key_cache)[1]), index)
        out = self._attend(q, key_cache, value_cache, visible[None, None, None, :], None, False)
        return self._output(out), key_cache, value_cache

    def _output(self, out):
        """``[b, q, heads, head_dim] -> [b, q, output_dim]`` (the output projection)."""
        flat = ops.reshape(out, tuple(ops.shape(out)[:2]) + (-1,))
        y = ops.matmul(flat, ops.cast(ops.reshape(self.output_kernel, (-1, self._out)),
                                      flat.dtype))
        if self.output_bias is not None:
            y = y + ops.cast(self.output_bias, y.dtype)
        return y

    def compute_output_shape(self, query_shape, value_shape=None):
        return tuple(query_shape[:-1]) + (self.output_dim or query_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, head_dim=self.head_dim, output_dim=self.output_dim,
            fused_qkv=self.fused_qkv, use_qkv_bias=self.use_qkv_bias,
            use_output_bias=self.use_output_bias, qk_norm=self.qk_norm, dropout=self.dropout,
            attention_impl=self.attention_impl, layer_norm_epsilon=self.layer_norm_epsilon,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config


_JAX_GPUS = ("gpu", "cuda", "rocm")


@functools.lru_cache(maxsize=None)
def _jax_platform(backend):
    """JAX's default platform ("cpu", "gpu", "tpu"...) when ``backend`` is JAX, else None."""
    if backend != "jax":
        return None
    import jax

    return jax.default_backend()


def _accelerated_jax(backend):
    """True when ``backend`` is JAX and its default device is a GPU or TPU."""
    return _jax_platform(backend) in _JAX_GPUS + ("tpu",)


def _use_dot_product(impl, q):
    """Whether ``impl`` means ``ops.dot_product_attention`` for queries ``q [b, n, h, k]``."""
    if impl == "auto":
        return (_accelerated_jax(keras.backend.backend())
                and (q.shape[1] is None or q.shape[1] > 1))
    return impl == "dot_product"


def fused_attention(q, k, v, mask, scale, is_causal=False, pad_to_even=None):
    """``ops.dot_product_attention`` of ``q [b, n, h, d]``, ``k, v [b, s, h, d]`` (softmax in
    float32), with odd token counts padded to even when ``pad_to_even`` (default: on a JAX GPU).

    cuDNN's fused attention trains only on even query / key lengths (JAX 0.11 on an H100 refused
    TubeViT-B's 539 tokens, "Unsupported sequence length Q 539, KV 539", and Keras then fell
    back to XLA's unfused attention). Padding adds one query, whose output is dropped, and one
    zero key / value that a key mask hides (a causal mask already hides a last key from every
    real query), so the result equals the unpadded attention. With ``pad_to_even`` a mask is
    also broadcast to its full ``[b, ., n, s]`` (cuDNN's only mask shape)."""
    n, s = q.shape[1], k.shape[1]
    if pad_to_even is None:
        pad_to_even = _jax_platform(keras.backend.backend()) in _JAX_GPUS
    pad_q = bool(pad_to_even) and n is not None and n % 2 == 1
    pad_k = bool(pad_to_even) and s is not None and s % 2 == 1
    if pad_q:
        q = ops.pad(q, [(0, 0), (0, 1), (0, 0), (0, 0)])
    if pad_k:
        k = ops.pad(k, [(0, 0), (0, 1), (0, 0), (0, 0)])
        v = ops.pad(v, [(0, 0), (0, 1), (0, 0), (0, 0)])
    if mask is not None and (pad_q or pad_k or pad_to_even):
        # cuDNN takes a mask of [., ., q, kv] only (a key-padding mask [b, 1, 1, s] made JAX
        # 0.11 on an H100 refuse it, "Bias must have same seq length as QKV, got 1 and 228",
        # and fall back to XLA's attention for PaLI's encoder)
        mask = ops.broadcast_to(mask, tuple(ops.shape(mask)[:2]) + (n, s))
        if pad_q:                        # the extra query attends to every real key
            mask = ops.concatenate([mask, ops.ones_like(mask[:, :, :1])], axis=2)
        if pad_k:
            mask = ops.pad(mask, [(0, 0), (0, 0), (0, 0), (0, 1)], constant_values=False)
    elif pad_k and not is_causal:                # cuDNN takes a mask of [., ., q, kv] only
        mask = ops.broadcast_to(ops.arange(s + 1)[None, None, None, :] < s,
                                (1, 1, n + int(pad_q), s + 1))
    out = ops.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal)
    return out[:, :n] if pad_q else out


def _mask_for(mask, causal, q, k):
    """``attention_mask`` for projected ``q [b, q, h, k]`` and ``k [b, s, h, k]``."""
    if mask is None and not causal:
        return None
    return attention_mask(mask, causal, ops.shape(q)[1], ops.shape(k)[1])
