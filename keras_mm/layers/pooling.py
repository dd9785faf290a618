"""Pooling a token sequence ``[batch, tokens, width]`` into one vector ``[batch, width]``.

Token-id based positions assume the tokenizer's layout ``BOS ... EOS PAD PAD`` (PAD = 0,
EOS = 2 in keras_mm's tokenizer): right padding, at most one EOS kept.
"""

from __future__ import annotations

from keras import ops


def first_token(x):
    """The first token (a ViT ``[CLS]`` token, or BOS): ``x[:, 0]``."""
    return x[:, 0]


def last_token(x):
    """The last position ``x[:, -1]``, whatever it holds."""
    return x[:, -1]


def global_average(x, mask=None):
    """Mean over tokens; with ``mask [batch, tokens]`` (True = real token) only over real ones."""
    if mask is None:
        return ops.mean(x, axis=1)
    m = ops.cast(mask, x.dtype)[:, :, None]
    return ops.sum(x * m, axis=1) / ops.maximum(ops.sum(m, axis=1), ops.cast(1.0, x.dtype))


def last_non_pad_positions(token_ids, pad_id=0):
    """``[batch]`` index of the last token that is not ``pad_id`` (0 for an all-pad row)."""
    not_pad = ops.cast(ops.not_equal(token_ids, pad_id), "int32")
    length = ops.shape(token_ids)[1]
    # argmax returns the first maximum: search the reversed sequence.
    last = length - 1 - ops.argmax(ops.flip(not_pad, axis=1), axis=1)
    return ops.where(ops.any(not_pad > 0, axis=1), last, ops.zeros_like(last))


def eos_positions(token_ids, eos_id=2, pad_id=0):
    """``[batch]`` index of the first ``eos_id``; rows without one (a truncated text) use the
    last non-pad token instead."""
    is_eos = ops.cast(ops.equal(token_ids, eos_id), "int32")
    first_eos = ops.argmax(is_eos, axis=1)
    fallback = last_non_pad_positions(token_ids, pad_id)
    return ops.where(ops.any(is_eos > 0, axis=1), first_eos, ops.cast(fallback, first_eos.dtype))


def gather_tokens(x, positions):
    """``x[b, positions[b]]`` -> ``[batch, width]`` (a one-hot contraction: no gather op, which
    keeps it cheap to differentiate and friendly to XLA and tf.distribute)."""
    one_hot = ops.one_hot(positions, ops.shape(x)[1], dtype=x.dtype)    # [b, tokens]
    return ops.einsum("bt,btd->bd", one_hot, x)
