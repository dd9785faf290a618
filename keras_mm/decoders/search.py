"""In-graph decoding search for autoregressive text decoders: greedy, sampling (temperature,
top-k) and beam search (GNMT length penalty), on ``keras.ops`` only.

Each search is one ``keras.ops.while_loop`` (no Python loop per token), so the same code runs
eagerly, inside ``tf.function`` (with or without ``jit_compile=True``), inside a SavedModel
and under ``jax.jit``. The model provides a step function

    step_fn(tokens, state, index) -> (logits, new_state)

    tokens  int32 [rows]            the token at position ``index`` (BOS at index 0)
    state   nest (dict) of tensors  leading dim ``rows`` (key / value caches [rows, max_len,
                                    heads, head_dim], cross-attention keys, a context, ...)
    index   int32 scalar tensor     the position of ``tokens``
    logits  [rows, vocab]           the prediction for position ``index + 1`` (any float dtype;
                                    the search works in float32)

``new_state`` must have the structure, dtypes and shapes of ``state`` (a loop carry: TF's
while_loop and ``jax.lax.while_loop`` both require it), so caches are preallocated to their full
length and written in place. On JAX the loop body is traced even eagerly, so build the model
(create its variables) before searching. ``rows`` is ``batch_size`` for greedy search and
sampling, ``batch_size * beam_size`` for beam search (:func:`tile_for_beams`).

Outputs are ``[batch, max_length]`` int32 generated tokens without the BOS, EOS kept, ``pad_id``
after it; the shape is static whatever the stopping step: the loops stop early once every row
has finished (beam search: once no live beam can beat the best finished one) but write into a
buffer allocated up front.
"""

from __future__ import annotations

import keras
from keras import ops

_NEG_INF = float("-inf")
_TINY = 1e-20  # uniform noise in [_TINY, 1): the Gumbel noise -log(-log(u)) stays finite


def decode_lengths(tokens, eos_id):
    """Lengths ``[batch]`` int32 of generated ``tokens [batch, max_length]``: up to and including
    the first EOS, ``max_length`` for a row without EOS."""
    tokens = ops.convert_to_tensor(tokens)
    max_length = ops.shape(tokens)[1]
    is_eos = ops.equal(tokens, eos_id)
    first = ops.cast(ops.argmax(ops.cast(is_eos, "int32"), axis=1), "int32")
    return ops.cast(ops.where(ops.any(is_eos, axis=1), first + 1, max_length), "int32")


def tile_for_beams(state, beam_size):
    """Repeats every row of every tensor of ``state`` ``beam_size`` times: ``[batch, ...]`` ->
    ``[batch * beam_size, ...]`` with row ``b * beam_size + k`` = row ``b`` (the layout
    :func:`beam_search` expects)."""
    return keras.tree.map_structure(lambda x: ops.repeat(x, int(beam_size), axis=0), state)


def _check(max_length, **positive):
    if int(max_length) < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for name, value in positive.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _as_tensors(state):
    return keras.tree.map_structure(ops.convert_to_tensor, state)


def _decode_loop(step_fn, state, batch_size, max_length, bos_id, eos_id, pad_id, choose):
    """The loop shared by greedy search and sampling: ``choose(logits [B, V] float32, index)``
    -> next tokens ``[B]``; a row stops at its first EOS (PAD afterwards); the loop stops when
    every row has stopped or at ``max_length``."""
    _check(max_length)
    max_length = int(max_length)
    positions = ops.arange(max_length, dtype="int32")[None, :]                  # [1, L]

    def cond(index, tokens, state, out, finished):
        return ops.logical_and(ops.less(index, max_length),
                               ops.logical_not(ops.all(finished)))

    def body(index, tokens, state, out, finished):
        logits, state = step_fn(tokens, state, index)                            # [B, V]
        chosen = ops.cast(choose(ops.cast(logits, "float32"), index), "int32")
        chosen = ops.where(finished, ops.cast(pad_id, "int32"), chosen)          # [B]
        out = ops.where(ops.equal(positions, index), chosen[:, None], out)       # [B, L]
        finished = ops.logical_or(finished, ops.equal(chosen, eos_id))
        return index + 1, chosen, state, out, finished

    loop_vars = (ops.convert_to_tensor(0, "int32"),
                 ops.full((batch_size,), bos_id, dtype="int32"),
                 _as_tensors(state),
                 ops.full((batch_size, max_length), pad_id, dtype="int32"),
                 ops.zeros((batch_size,), dtype="bool"))
    return ops.while_loop(cond, body, loop_vars)[3]


def greedy_search(step_fn, state, *, batch_size, max_length, bos_id, eos_id, pad_id=0):
    """Greedy decoding: the argmax token at every step.

    Args:
        step_fn: ``(tokens [B], state, index) -> (logits [B, V], state)`` (module docstring).
        state: the initial decoding state, leading dim ``batch_size``.
        batch_size: ``B``, an int or a scalar tensor (a dynamic batch in a TF graph).
        max_length: tokens to generate at most (the output length).
        bos_id, eos_id, pad_id: special token ids.

    Returns:
        int32 ``[B, max_length]``: generated tokens, EOS kept, ``pad_id`` after it.
    """
    return _decode_loop(step_fn, state, batch_size, max_length, bos_id, eos_id, pad_id,
                        lambda logits, index: ops.argmax(logits, axis=-1))


class _TensorSeed(keras.random.SeedGenerator):
    """A seed tensor dressed as a ``SeedGenerator``: ``keras.random`` takes a seed as an int or
    a ``SeedGenerator`` and draws ``seed.next()``, never a tensor (the TF backend rejects one),
    and a real ``SeedGenerator`` is a variable that cannot be advanced inside a traced JAX loop.
    This one holds a ``[2]`` tensor computed in the loop (the step folded into the seed), so
    each step draws fresh, reproducible noise with TF's stateless ops / ``jax.random``."""

    def __init__(self, seed):  # no super().__init__(): no state variable
        self._seed = seed

    def next(self, ordered=True):
        return self._seed


def _seed_dtype():
    # jax.random wants a raw uint32[2] key; TF's stateless ops an int32 / int64 pair.
    return "uint32" if keras.backend.backend() == "jax" else "int32"


def sample(step_fn, state, *, batch_size, max_length, bos_id, eos_id, pad_id=0, temperature=1.0,
           top_k=0, seed=None):
    """Ancestral sampling from ``softmax(logits / temperature)``, restricted to the ``top_k``
    most likely tokens.

    Each step draws ``argmax(logits / temperature + g)`` with Gumbel noise ``g`` (the Gumbel-max
    trick: a draw from the softmax), the noise from ``keras.random.uniform`` with a seed that
    folds the step index into a base seed, so the loop stays stateless.

    Args:
        step_fn, state, batch_size, max_length, bos_id, eos_id, pad_id: as :func:`greedy_search`.
        temperature: a Python float >= 0; 0 decodes greedily.
        top_k: sample among the ``top_k`` largest logits (ties at the k-th value kept); 0 (or
            >= vocab) the whole distribution; 1 decodes greedily.
        seed: an int (the same tokens every call), a ``keras.random.SeedGenerator`` (advanced
            once a call) or None (Keras' global generator; not available under ``jax.jit``).

    Returns:
        int32 ``[B, max_length]`` as :func:`greedy_search`.
    """
    temperature, top_k = float(temperature), int(top_k)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if temperature == 0 or top_k == 1:
        return greedy_search(step_fn, state, batch_size=batch_size, max_length=max_length,
                             bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    # One random base seed a call; step i uses base + [0, i]. The base is < 2**30 so the sum
    # never overflows int32.
    base_seed = keras.random.randint((2,), 0, 2**30, dtype="int32", seed=seed)

    def choose(logits, index):
        logits = logits / temperature
        vocab = logits.shape[-1]
        if top_k and (vocab is None or top_k < vocab):
            kth = ops.top_k(logits, top_k, sorted=True)[0][:, -1:]               # [B, 1]
            logits = ops.where(ops.less(logits, kth), _NEG_INF, logits)
        step_seed = base_seed + ops.stack([ops.zeros_like(index), index])
        uniform = keras.random.uniform(ops.shape(logits), minval=_TINY, maxval=1.0,
                                       dtype="float32",
                                       seed=_TensorSeed(ops.cast(step_seed, _seed_dtype())))
        gumbel = -ops.log(-ops.log(uniform))
        return ops.argmax(logits + gumbel, axis=-1)

    return _decode_loop(step_fn, state, batch_size, max_length, bos_id, eos_id, pad_id, choose)


def _gather_beams(x, indices):
    """``x [B, M, ...]``, ``indices [B, K]`` in ``[0, M)`` -> ``[B, K, ...]``: a flat row gather."""
    m = x.shape[1]
    k = indices.shape[1]
    rest = tuple(x.shape[2:])
    offsets = ops.arange(ops.shape(indices)[0], dtype="int32")[:, None] * m     # [B, 1]
    flat = ops.reshape(indices + offsets, (-1,))                                  # [B * K]
    rows = ops.take(ops.reshape(x, (-1,) + rest), flat, axis=0)                  # [B * K, ...]
    return ops.reshape(rows, (-1, k) + rest)


def beam_search(step_fn, state, *, batch_size, beam_size, max_length, bos_id, eos_id, pad_id=0,
                length_penalty=0.6):
    """Beam search with the GNMT length penalty (Wu et al. 2016, eq. 14):

        score(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6) ** length_penalty

    ``|Y|`` counts the generated tokens including EOS. As in T5X / flax, live beams and finished
    hypotheses are kept apart: each step extends the ``beam_size`` live beams by every token
    (``beam_size * vocab`` candidates; only beam 0 is live at the start, so no duplicates); the
    EOS extensions of the live beams are scored and merged into the ``beam_size`` best finished
    hypotheses, and the ``beam_size`` best non-EOS extensions (by log-probability) become the
    live beams, their state rows gathered from the beams they extend. The search stops at
    ``max_length`` or once no live beam can beat the best finished hypothesis of its example
    (log-probabilities only fall, so a live beam's best possible score is its log-probability
    over the penalty at its shortest or longest possible length). An example with no finished
    hypothesis returns its best live beam (``max_length`` tokens, no EOS).

    Unlike T5X, which takes the top ``2 * beam_size`` candidates and finishes the EOS ones among
    them, every live beam's EOS extension is considered, so a beam as large as the number of
    non-EOS prefixes makes the search exhaustive.

    Args:
        step_fn: ``(tokens [B*K], state, index) -> (logits [B*K, V], state)``.
        state: the initial state tiled to ``B * beam_size`` rows, row ``b * beam_size + k`` for
            beam ``k`` of example ``b`` (:func:`tile_for_beams`).
        batch_size: ``B``, an int or a scalar tensor.
        beam_size: ``K``, a Python int.
        max_length, bos_id, eos_id, pad_id: as :func:`greedy_search`.
        length_penalty: the exponent ``alpha`` (0: plain log-probability).

    Returns:
        ``(tokens, scores)``: int32 ``[B, max_length]`` best hypothesis per example (EOS kept,
        ``pad_id`` after it) and its float32 score ``[B]``.
    """
    _check(max_length, beam_size=beam_size)
    k, max_length, alpha = int(beam_size), int(max_length), float(length_penalty)
    positions = ops.arange(max_length, dtype="int32")[None, None, :]             # [1, 1, L]

    def penalty(length):
        return ops.power((5.0 + ops.cast(length, "float32")) / 6.0, alpha)

    def best_possible(alive_logp, index):
        # log p <= 0 only falls; lp is monotone in the length, so the best score a live beam
        # can reach is at its shortest (index + 1) or longest (max_length) length.
        best = alive_logp[:, 0]
        return ops.maximum(best / penalty(index + 1), best / penalty(max_length))

    def cond(index, tokens, state, alive_seqs, alive_logp, fin_seqs, fin_scores):
        can_improve = ops.any(ops.greater(best_possible(alive_logp, index), fin_scores[:, 0]))
        return ops.logical_and(ops.less(index, max_length), can_improve)

    def body(index, tokens, state, alive_seqs, alive_logp, fin_seqs, fin_scores):
        logits, state = step_fn(tokens, state, index)                            # [B*K, V]
        vocab = logits.shape[-1]
        if vocab is None:
            raise ValueError("beam_search needs a static vocabulary size (logits [rows, V])")
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        candidates = alive_logp[:, :, None] + ops.reshape(log_probs, (-1, k, vocab))  # [B,K,V]

        # Finished: the EOS extension of every live beam, merged into the K best so far.
        eos_scores = candidates[:, :, eos_id] / penalty(index + 1)               # [B, K]
        write = ops.equal(positions, index)                                       # [1, 1, L]
        eos_seqs = ops.where(write, ops.cast(eos_id, "int32"), alive_seqs)        # [B, K, L]
        fin_scores, top = ops.top_k(ops.concatenate([fin_scores, eos_scores], axis=1), k)
        fin_seqs = _gather_beams(ops.concatenate([fin_seqs, eos_seqs], axis=1), top)

        # Alive: the K best non-EOS extensions.
        not_eos = ops.not_equal(ops.arange(vocab, dtype="int32"), eos_id)         # [V]
        candidates = ops.where(not_eos, candidates, _NEG_INF)
        alive_logp, top = ops.top_k(ops.reshape(candidates, (-1, k * vocab)), k)  # [B, K]
        top = ops.cast(top, "int32")
        origin, tokens = top // vocab, top % vocab                                # [B, K]
        alive_seqs = ops.where(write, tokens[:, :, None], _gather_beams(alive_seqs, origin))
        rows = ops.reshape(origin + ops.arange(ops.shape(origin)[0], dtype="int32")[:, None] * k,
                           (-1,))                                                 # [B*K]
        state = keras.tree.map_structure(lambda x: ops.take(x, rows, axis=0), state)
        return index + 1, ops.reshape(tokens, (-1,)), state, alive_seqs, alive_logp, fin_seqs, \
            fin_scores

    first_live = ops.where(ops.equal(ops.arange(k), 0), 0.0, _NEG_INF)            # [K]
    loop_vars = (
        ops.convert_to_tensor(0, "int32"),
        ops.full((batch_size * k,), bos_id, dtype="int32"),
        _as_tensors(state),
        ops.full((batch_size, k, max_length), pad_id, dtype="int32"),
        ops.cast(ops.broadcast_to(first_live[None], (batch_size, k)), "float32"),
        ops.full((batch_size, k, max_length), pad_id, dtype="int32"),
        ops.full((batch_size, k), _NEG_INF, dtype="float32"),
    )
    index, _, _, alive_seqs, alive_logp, fin_seqs, fin_scores = ops.while_loop(
        cond, body, loop_vars)
    # Nothing finished (score -inf): the best live beam, scored at its length (all the steps).
    has_finished = ops.greater(fin_scores[:, 0], _NEG_INF)                        # [B]
    tokens = ops.where(has_finished[:, None], fin_seqs[:, 0], alive_seqs[:, 0])
    scores = ops.where(has_finished, fin_scores[:, 0], alive_logp[:, 0] / penalty(index))
    return tokens, scores
