"""Independent NumPy implementations (written from the papers' formulas, float64) that the layer
and encoder tests compare against. Weights are copied out of the Keras layers by name."""

from __future__ import annotations

import math

import numpy as np


def w(variable):
    """A Keras variable as float64 NumPy."""
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable, np.float64)


def layer_norm(x, gamma, beta, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


def ln_of(layer, x):
    return layer_norm(x, w(layer.gamma), w(layer.beta), layer.epsilon)


def rms_norm(x, scale, eps=1e-6):
    """RMSNorm (Zhang & Sennrich 2019): no mean subtraction, no bias."""
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def norm_of(layer, x):
    """A Keras LayerNormalization (gamma, beta) or RMSNormalization (scale only) on ``x``."""
    if hasattr(layer, "gamma"):
        return ln_of(layer, x)
    return rms_norm(x, w(layer.scale), layer.epsilon)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def dense(layer, x):
    y = x @ w(layer.kernel)
    return y + w(layer.bias) if layer.bias is not None else y


def mlp(layer, x):
    return dense(layer.fc2, gelu_tanh(dense(layer.fc1, x)))


def attention_weights(layer):
    """q/k/v kernels ``[d, h, k]`` and biases ``[h, k]`` (zeros when absent) of a
    keras_mm MultiHeadAttention, whatever its fused / separate layout."""
    if hasattr(layer, "qkv_kernel"):
        kern = w(layer.qkv_kernel)
        bias = w(layer.qkv_bias) if layer.qkv_bias is not None else np.zeros(kern.shape[1:])
        kernels, biases = [kern[:, i] for i in range(3)], [bias[i] for i in range(3)]
    else:
        kernels = [w(layer.query_kernel)]
        biases = [w(layer.query_bias) if layer.query_bias is not None
                  else np.zeros(kernels[0].shape[1:])]
        if hasattr(layer, "kv_kernel"):
            kv = w(layer.kv_kernel)
            kvb = w(layer.kv_bias) if layer.kv_bias is not None else np.zeros(kv.shape[1:])
            kernels += [kv[:, 0], kv[:, 1]]
            biases += [kvb[0], kvb[1]]
        else:
            for name in ("key", "value"):
                kern = w(getattr(layer, f"{name}_kernel"))
                bias = getattr(layer, f"{name}_bias")
                kernels.append(kern)
                biases.append(w(bias) if bias is not None else np.zeros(kern.shape[1:]))
    return kernels, biases


def mha(layer, query, value=None, mask=None, causal=False):
    """softmax(q k^T / sqrt(d_head) + mask) v, heads concatenated, output projection.

    mask: bool broadcastable to ``[batch, heads, q, kv]`` (True = attend), or ``[batch, kv]``.
    """
    value = query if value is None else value
    (wq, wk, wv), (bq, bk, bv) = attention_weights(layer)
    q = np.einsum("bnd,dhk->bnhk", query, wq) + bq
    k = np.einsum("bnd,dhk->bnhk", value, wk) + bk
    v = np.einsum("bnd,dhk->bnhk", value, wv) + bv
    if layer.qk_norm:
        q = norm_of(layer.query_norm, q)
        k = norm_of(layer.key_norm, k)
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.ndim == 2:
            mask = mask[:, None, None, :]
        allowed &= mask
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(allowed, logits, -np.inf)
    probs = softmax(logits)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    y = np.einsum("bqhk,hko->bqo", out, w(layer.output_kernel))
    return y + w(layer.output_bias) if layer.output_bias is not None else y


def block(layer, x, mask=None, causal=False):
    """Pre-LN transformer block: x + attn(LN(x)); x + mlp(LN(x))."""
    x = x + mha(layer.attention, ln_of(layer.norm1, x), mask=mask, causal=causal)
    return x + mlp(layer.mlp, ln_of(layer.norm2, x))


def parallel_block(layer, x, mask=None, causal=False):
    """ViT-22B parallel block: x + attn(N(x)) + mlp(N(x)), one norm N for both branches."""
    h = norm_of(layer.norm, x)
    return x + mha(layer.attention, h, mask=mask, causal=causal) + mlp(layer.mlp, h)


def encoder(layer, x, mask=None, causal=False):
    for b in layer.blocks:
        step = parallel_block if hasattr(b, "norm") and not hasattr(b, "norm1") else block
        x = step(b, x, mask, causal)
    return norm_of(layer.norm, x) if layer.norm is not None else x


def map_head(layer, x, mask=None):
    probe = np.broadcast_to(w(layer.probe), (x.shape[0], 1, x.shape[-1]))
    z = mha(layer.attention, probe, x, mask=mask)
    z = z + mlp(layer.mlp, ln_of(layer.norm, z))
    return z[:, 0]


def patchify(images, p):
    """``[b, H, W, c]`` -> ``[b, (H//p)*(W//p), p*p*c]``: patches row-major, each patch's
    pixels flattened in (row, col, channel) order."""
    b, hh, ww, c = images.shape
    gh, gw = hh // p, ww // p
    out = np.zeros((b, gh * gw, p * p * c))
    for i in range(gh):
        for j in range(gw):
            out[:, i * gw + j] = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
    return out


def sincos2d(h, w_, dim, temperature=10_000.0):
    """big_vision posemb_sincos_2d written out per position."""
    quarter = dim // 4
    table = np.zeros((h * w_, dim))
    for y in range(h):
        for x in range(w_):
            row = []
            for fn, coord in ((np.sin, x), (np.cos, x), (np.sin, y), (np.cos, y)):
                row += [fn(coord / temperature ** (i / (quarter - 1))) for i in range(quarter)]
            table[y * w_ + x] = row
    return table


def bilinear_resize_tf(images, size):
    """``tf.image.resize(images, size, "bilinear", antialias=False)`` as NumPy (the peer
    implementation the resize-based references use; TF resizes in float32)."""
    import tensorflow as tf

    return tf.image.resize(np.asarray(images, np.float64), size, method="bilinear",
                           antialias=False).numpy()


def bilinear_matrix_tf(old, new):
    """``B [new*new, old*old]``: column k = the k-th ``old x old`` basis image resized to
    ``new x new`` by ``tf.image.resize`` (row-major pixels)."""
    n = old * old
    basis = np.eye(n).reshape(n, old, old, 1)
    return bilinear_resize_tf(basis, (new, new)).reshape(n, new * new).T


def pi_resize_kernel_tf(kernel, new):
    """FlexiViT's PI-resize ``pinv(B^T) w`` of ``kernel [p, p, c, d]`` with B from
    ``tf.image.resize`` and NumPy's pinv."""
    p, _, c, d = kernel.shape
    resize = np.linalg.pinv(bilinear_matrix_tf(p, new).T)              # [new*new, p*p]
    return (resize @ np.asarray(kernel, np.float64).reshape(p * p, c * d)).reshape(new, new, c, d)



def tube_conv(video, kernel, bias, stride, offset):
    """TubeViT's tube: the strided valid 3-D convolution of ``video [b, T, H, W, C]`` from
    ``offset`` with ``kernel [t, h, w, C, D]`` (+ bias), one explicit loop over the output
    positions in (t, y, x) row-major order -> ``[b, n_tokens, D]``."""
    kt, kh, kw, _, d = kernel.shape
    _, frames, height, width, _ = video.shape
    tokens = []
    for t0 in range(offset[0], frames - kt + 1, stride[0]):
        for y0 in range(offset[1], height - kh + 1, stride[1]):
            for x0 in range(offset[2], width - kw + 1, stride[2]):
                block = video[:, t0:t0 + kt, y0:y0 + kh, x0:x0 + kw]       # [b, t, h, w, C]
                tokens.append(np.einsum("bthwc,thwcd->bd", block, kernel) + bias)
    if not tokens:
        return np.zeros((video.shape[0], 0, d))
    return np.stack(tokens, axis=1)


def sincos3d(centres, dim, temperature=10_000.0):
    """TubeViT's fixed position embedding (Eqs. 3-7) element by element, blocks of ``dim // 6``
    channels ``[sin t, cos t, sin y, cos y, sin x, cos x]`` (frequency ``temperature ** (-j /
    (k - 1))``), the ``dim % 6`` last channels zero."""
    k = dim // 6
    table = np.zeros((len(centres), dim))
    for n, coords in enumerate(centres):
        for axis, value in enumerate(coords):                  # t, y, x
            for j in range(k):
                angle = value / temperature ** (j / max(k - 1, 1))
                table[n, 2 * axis * k + j] = math.sin(angle)
                table[n, (2 * axis + 1) * k + j] = math.cos(angle)
    return table
