"""In-graph decoding search (keras_mm.decoders.search) against NumPy references on a toy model.

The toy "model" needs no weights: logits for the token after position ``index`` are

    logits[row] = trigram[prev, token] + bias[row] + position[counter[row]]

with ``token`` the token fed at ``index``, ``prev`` the one fed at ``index - 1`` read back from a
``history`` state tensor the step function itself writes (BOS at index 0), ``bias`` a per-row
state tensor (rows differ) and ``counter`` a state tensor incremented every step. Getting the
right logits thus needs the state threaded through the loop (the counter) and, in beam search,
the state rows gathered along with the beams (the history). The references (greedy loop,
exhaustive search over every sequence, beam-1 walk, softmax frequencies) are plain NumPy.
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.decoders.search import (beam_search, decode_lengths, greedy_search, sample,
                                      tile_for_beams)

pytestmark = pytest.mark.both_backends

BACKEND = keras.backend.backend()
tf_only = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow-only check")
jax_only = pytest.mark.skipif(BACKEND != "jax", reason="JAX-only check")

PAD, BOS, EOS = 0, 1, 2


class Toy:
    """The toy decoder of the module docstring, ``vocab`` tokens, ``max_length`` steps."""

    def __init__(self, vocab=6, max_length=4, seed=0, scale=1.5, logits_dtype="float32"):
        rng = np.random.default_rng(seed)
        self.vocab, self.max_length, self.logits_dtype = vocab, max_length, logits_dtype
        self.trigram = (scale * rng.normal(size=(vocab, vocab, vocab))).astype("float32")
        self.position = (scale * rng.normal(size=(max_length, vocab))).astype("float32")
        self.calls = []  # (index, tokens fed, history) per eager TF call

    def state(self, bias):
        bias = ops.convert_to_tensor(bias, "float32")                             # [rows, V]
        rows = ops.shape(bias)[0]
        return {"bias": bias, "counter": ops.zeros((rows,), "int32"),
                "history": ops.zeros((rows, self.max_length + 1), "int32")}

    def step(self, tokens, state, index):
        v, length = self.vocab, self.max_length + 1
        history = ops.where(ops.equal(ops.arange(length, dtype="int32")[None], index),
                            tokens[:, None], state["history"])                  # [rows, L+1]
        prev = ops.take(history, ops.maximum(index - 1, 0), axis=1)               # [rows]
        table = ops.reshape(ops.convert_to_tensor(self.trigram), (v * v, v))
        logits = (ops.take(table, prev * v + tokens, axis=0) + state["bias"]
                  + ops.take(ops.convert_to_tensor(self.position), state["counter"], axis=0))
        if BACKEND == "tensorflow":
            import tensorflow as tf

            if tf.executing_eagerly():  # eager TF runs the loop body once a step: record it
                self.calls.append((int(index), np.asarray(tokens), np.asarray(history)))
        new_state = {"bias": state["bias"], "counter": state["counter"] + 1, "history": history}
        return ops.cast(logits, self.logits_dtype), new_state

    # -- NumPy side -----------------------------------------------------------------------
    def np_logits(self, prefix, bias_row):
        """Logits after ``prefix`` (BOS first), float32 as the step computes them, then rounded
        to the step's logits dtype, as float64."""
        index = len(prefix) - 1
        prev = prefix[index - 1] if index >= 1 else prefix[0]
        logits = self.trigram[prev, prefix[-1]] + bias_row + self.position[index]
        if self.logits_dtype == "float16":
            logits = logits.astype(np.float16)
        return logits.astype(np.float64)


def log_softmax(x):
    finite_max = np.max(x[np.isfinite(x)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return x - finite_max - np.log(np.sum(np.exp(x - finite_max)))


def penalty(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


def pad(tokens, length):
    return list(tokens) + [PAD] * (length - len(tokens))


def np_greedy(toy, bias_row, max_length):
    prefix = [BOS]
    for _ in range(max_length):
        token = int(np.argmax(toy.np_logits(prefix, bias_row)))
        prefix.append(token)
        if token == EOS:
            break
    return pad(prefix[1:], max_length)


def np_exhaustive(toy, bias_row, max_length, alpha):
    """Best (score, tokens) over every sequence: those ending at their first EOS within
    ``max_length`` tokens; when none has a finite score, the best ``max_length`` tokens without
    EOS (scored at length ``max_length``)."""
    best = {"finished": (-np.inf, None), "truncated": (-np.inf, None)}

    def visit(prefix, logp):
        lsm = log_softmax(toy.np_logits(prefix, bias_row))
        n = len(prefix)  # generated tokens once one more is appended
        for token in range(toy.vocab):
            total = logp + lsm[token]
            if not np.isfinite(total):
                continue
            if token == EOS:
                kind = "finished"
            elif n == max_length:
                kind = "truncated"
            else:
                visit(prefix + [token], total)
                continue
            score = total / penalty(n, alpha)
            if score > best[kind][0]:
                best[kind] = (score, prefix[1:] + [token])

    visit([BOS], 0.0)
    score, tokens = best["finished"] if best["finished"][1] is not None else best["truncated"]
    return score, pad(tokens, max_length)


def np_beam_one(toy, bias_row, max_length, alpha):
    """Beam size 1: walk the best non-EOS token each step; the answer is the best-scoring EOS
    exit along that walk (the walk itself, scored at max_length, when none is finite)."""
    prefix, logp, best = [BOS], 0.0, (-np.inf, None)
    for i in range(max_length):
        lsm = log_softmax(toy.np_logits(prefix, bias_row))
        score = (logp + lsm[EOS]) / penalty(i + 1, alpha)
        if score > best[0]:
            best = (score, prefix[1:] + [EOS])
        masked = lsm.copy()
        masked[EOS] = -np.inf
        token = int(np.argmax(masked))
        logp += lsm[token]
        prefix.append(token)
    if best[1] is None:
        return logp / penalty(max_length, alpha), prefix[1:]
    return best[0], pad(best[1], max_length)


def biases(rows, vocab, seed=1, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=(rows, vocab))).astype("float32")


# ------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("logits_dtype", ["float32", "float16"])
def test_greedy_matches_numpy_loop(logits_dtype):
    toy = Toy(vocab=6, max_length=5, logits_dtype=logits_dtype)
    bias = biases(8, 6)
    out = np.asarray(greedy_search(toy.step, toy.state(bias), batch_size=8, max_length=5,
                                   bos_id=BOS, eos_id=EOS, pad_id=PAD))
    assert out.shape == (8, 5) and out.dtype == np.int32
    expected = np.array([np_greedy(toy, b, 5) for b in bias])
    np.testing.assert_array_equal(out, expected)


def test_greedy_pads_after_eos_and_stops_when_all_rows_finished():
    toy = Toy(vocab=6, max_length=5)
    bias = biases(4, 6)
    toy.position[:] = 0.0
    toy.position[2:, EOS] = 100.0          # every row ends by step 2 at the latest
    bias[0, EOS] = 100.0                   # row 0 ends at step 0
    out = np.asarray(greedy_search(toy.step, toy.state(bias), batch_size=4, max_length=5,
                                   bos_id=BOS, eos_id=EOS, pad_id=PAD))
    expected = np.array([np_greedy(toy, b, 5) for b in bias])
    np.testing.assert_array_equal(out, expected)
    assert list(out[0]) == [EOS, PAD, PAD, PAD, PAD]
    lengths = np.asarray(decode_lengths(out, EOS))
    for row, length in zip(out, lengths):
        assert row[length - 1] == EOS and np.all(row[length:] == PAD)
    if BACKEND == "tensorflow":  # eager TF runs the loop body once a step: count the steps
        assert max(i for i, _, _ in toy.calls) == max(lengths) - 1 < 4


def test_decode_lengths():
    tokens = np.array([[3, 2, 0, 0], [2, 0, 0, 0], [3, 4, 5, 3], [3, 3, 3, 2]], "int32")
    np.testing.assert_array_equal(np.asarray(decode_lengths(tokens, 2)), [2, 1, 4, 4])


# -------------------------------------------------------------------------------- beam search
@pytest.mark.parametrize("alpha", [0.6, 0.0, 1.5, 3.0])
def test_large_beam_is_exhaustive_search(alpha):
    # 5 non-EOS tokens, 4 steps: 5**3 = 125 live prefixes at most, so beam 125 is exact.
    v, length, beam, batch = 6, 4, 125, 5
    toy = Toy(vocab=v, max_length=length, seed=3)
    bias = biases(batch, v, seed=3)
    bias[:, EOS] -= 1.5                 # EOS less likely: longer hypotheses compete
    tokens, scores = beam_search(toy.step, tile_for_beams(toy.state(bias), beam),
                                 batch_size=batch, beam_size=beam, max_length=length,
                                 bos_id=BOS, eos_id=EOS, pad_id=PAD, length_penalty=alpha)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert tokens.shape == (batch, length) and scores.shape == (batch,)
    for b in range(batch):
        ref_score, ref_tokens = np_exhaustive(toy, bias[b], length, alpha)
        assert list(tokens[b]) == ref_tokens, b
        np.testing.assert_allclose(scores[b], ref_score, rtol=1e-5, atol=1e-5)
    # Answers of several lengths: the length penalty matters, and at alpha 3 (long hypotheses
    # win) stopping early on a bound at the current length instead of max_length is wrong.
    assert len({int(n) for n in np.asarray(decode_lengths(tokens, EOS))}) >= 2


def test_beam_falls_back_to_best_live_beam_when_nothing_finishes():
    v, length, beam, batch = 5, 3, 16, 2
    toy = Toy(vocab=v, max_length=length, seed=4)
    bias = biases(batch, v, seed=5)
    bias[:, EOS] = -np.inf             # EOS impossible
    tokens, scores = beam_search(toy.step, tile_for_beams(toy.state(bias), beam),
                                 batch_size=batch, beam_size=beam, max_length=length,
                                 bos_id=BOS, eos_id=EOS, pad_id=PAD, length_penalty=0.6)
    for b in range(batch):
        ref_score, ref_tokens = np_exhaustive(toy, bias[b], length, 0.6)
        assert EOS not in ref_tokens
        assert list(np.asarray(tokens)[b]) == ref_tokens
        np.testing.assert_allclose(np.asarray(scores)[b], ref_score, rtol=1e-5, atol=1e-5)


def test_beam_one_walks_the_greedy_path():
    v, length, batch = 6, 5, 6
    toy = Toy(vocab=v, max_length=length, seed=6)
    bias = biases(batch, v, seed=7)
    tokens, scores = beam_search(toy.step, toy.state(bias), batch_size=batch, beam_size=1,
                                 max_length=length, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    for b in range(batch):
        ref_score, ref_tokens = np_beam_one(toy, bias[b], length, 0.6)
        assert list(np.asarray(tokens)[b]) == ref_tokens
        np.testing.assert_allclose(np.asarray(scores)[b], ref_score, rtol=1e-5, atol=1e-5)


def test_peaked_model_beam_sizes_agree_with_greedy():
    # A near-deterministic model: greedy, beam 1 and beam 4 all find its one likely sentence.
    v, length, batch = 6, 5, 4
    toy = Toy(vocab=v, max_length=length, seed=8, scale=30.0)
    bias = biases(batch, v, seed=9, scale=30.0)
    toy.position[3, EOS] = 1000.0          # the likely sentences end by step 3
    greedy = np.asarray(greedy_search(toy.step, toy.state(bias), batch_size=batch,
                                      max_length=length, bos_id=BOS, eos_id=EOS))
    assert np.all(np.asarray(decode_lengths(greedy, EOS)) <= 4)
    for beam in (1, 4):
        toy.calls.clear()
        tokens, _ = beam_search(toy.step, tile_for_beams(toy.state(bias), beam),
                                batch_size=batch, beam_size=beam, max_length=length,
                                bos_id=BOS, eos_id=EOS, length_penalty=0.0)
        np.testing.assert_array_equal(np.asarray(tokens), greedy)
        if BACKEND == "tensorflow":  # stopped early: no live beam can beat the finished ones
            assert max(i for i, _, _ in toy.calls) == max(decode_lengths(greedy, EOS)) - 1


@tf_only
def test_beam_state_rows_follow_their_beams():
    """The history the step function wrote into each state row is the prefix of the hypothesis
    fed through that row: at the step that produced the best hypothesis' last token, some row
    of its example holds exactly [BOS] + that hypothesis' earlier tokens."""
    v, length, beam, batch = 6, 5, 3, 4
    toy = Toy(vocab=v, max_length=length, seed=10)
    bias = biases(batch, v, seed=11)
    toy.position[:3, EOS] = -50.0          # no EOS before step 3: long prefixes
    tokens, _ = beam_search(toy.step, tile_for_beams(toy.state(bias), beam), batch_size=batch,
                            beam_size=beam, max_length=length, bos_id=BOS, eos_id=EOS)
    tokens = np.asarray(tokens)
    lengths = np.asarray(decode_lengths(tokens, EOS))
    assert lengths.min() >= 4
    calls = {index: (fed, history) for index, fed, history in toy.calls}
    for b in range(batch):
        n = lengths[b]
        fed, history = calls[n - 1]
        prefix = [BOS] + list(tokens[b, :n - 1])
        rows = range(b * beam, (b + 1) * beam)
        assert any(list(history[r, :n]) == prefix and fed[r] == prefix[-1] for r in rows), b


# ----------------------------------------------------------------------------------- sampling
def test_sampling_top_k_one_and_zero_temperature_are_greedy():
    toy = Toy(vocab=6, max_length=5)
    bias = biases(8, 6)
    greedy = np.asarray(greedy_search(toy.step, toy.state(bias), batch_size=8, max_length=5,
                                      bos_id=BOS, eos_id=EOS))
    for kwargs in ({"top_k": 1, "temperature": 3.0}, {"temperature": 0.0}):
        out = sample(toy.step, toy.state(bias), batch_size=8, max_length=5, bos_id=BOS,
                     eos_id=EOS, seed=3, **kwargs)
        np.testing.assert_array_equal(np.asarray(out), greedy)


def test_sampling_is_reproducible_with_a_seed():
    toy = Toy(vocab=6, max_length=5, scale=0.3)
    bias = np.zeros((64, 6), "float32")
    kwargs = dict(batch_size=64, max_length=5, bos_id=BOS, eos_id=EOS, temperature=1.0)
    first = np.asarray(sample(toy.step, toy.state(bias), seed=7, **kwargs))
    again = np.asarray(sample(toy.step, toy.state(bias), seed=7, **kwargs))
    other = np.asarray(sample(toy.step, toy.state(bias), seed=8, **kwargs))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # A SeedGenerator advances between calls and replays from the same initial seed.
    gen_a, gen_b = keras.random.SeedGenerator(5), keras.random.SeedGenerator(5)
    a1 = np.asarray(sample(toy.step, toy.state(bias), seed=gen_a, **kwargs))
    a2 = np.asarray(sample(toy.step, toy.state(bias), seed=gen_a, **kwargs))
    b1 = np.asarray(sample(toy.step, toy.state(bias), seed=gen_b, **kwargs))
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, a2)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 3), (2.0, 4)])
def test_sampling_frequencies_match_the_tempered_top_k_softmax(temperature, top_k):
    rows, v, length = 4000, 6, 2
    toy = Toy(vocab=v, max_length=length, seed=12, scale=1.0)
    bias = np.zeros((rows, v), "float32")
    bias[:, EOS] = -np.inf                # no EOS: every row samples both steps
    out = np.asarray(sample(toy.step, toy.state(bias), batch_size=rows, max_length=length,
                            bos_id=BOS, eos_id=EOS, temperature=temperature, top_k=top_k,
                            seed=13))

    def allowed_probs(prefix):
        logits = toy.np_logits(prefix, bias[0]) / temperature
        if top_k:
            logits[np.argsort(logits)[:-top_k]] = -np.inf
        return np.exp(log_softmax(logits))

    probs = allowed_probs([BOS])
    freq = np.bincount(out[:, 0], minlength=v) / rows
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert np.all(freq[probs == 0] == 0)                   # outside top-k / EOS: never drawn
    # Second step: never outside its own (prefix-dependent) top-k; the conditional
    # frequencies after the most common first token match too.
    for first_token in range(v):
        chosen = out[out[:, 0] == first_token, 1]
        if not len(chosen):
            continue
        probs = allowed_probs([BOS, first_token])
        assert np.all(probs[chosen] > 0), first_token
    common = np.bincount(out[:, 0]).argmax()
    chosen = out[out[:, 0] == common, 1]
    np.testing.assert_allclose(np.bincount(chosen, minlength=v) / len(chosen),
                               allowed_probs([BOS, common]), atol=0.04)


def test_sampling_draws_fresh_noise_each_step():
    # A uniform model: with the same noise at every step a row would repeat its token.
    rows, v, length = 3000, 6, 3
    toy = Toy(vocab=v, max_length=length, scale=0.0)
    out = np.asarray(sample(toy.step, toy.state(np.zeros((rows, v), "float32")),
                            batch_size=rows, max_length=length, bos_id=BOS, eos_id=v + 10,
                            seed=1))
    repeats = np.mean(out[:, 0] == out[:, 1])
    assert abs(repeats - 1 / v) < 0.03, repeats
    np.testing.assert_allclose(np.bincount(out.reshape(-1), minlength=v) / out.size,
                               np.full(v, 1 / v), atol=0.02)


def test_bad_arguments():
    toy = Toy()
    state = toy.state(np.zeros((2, 6), "float32"))
    with pytest.raises(ValueError, match="temperature"):
        sample(toy.step, state, batch_size=2, max_length=3, bos_id=BOS, eos_id=EOS,
               temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(toy.step, state, batch_size=2, max_length=3, bos_id=BOS, eos_id=EOS, top_k=-2)
    with pytest.raises(ValueError, match="max_length"):
        greedy_search(toy.step, state, batch_size=2, max_length=0, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(toy.step, state, batch_size=2, beam_size=0, max_length=3, bos_id=BOS,
                    eos_id=EOS)


# ----------------------------------------------------------------------- compiled / exported
def _all_searches(toy, bias, batch_size, beam=3):
    common = dict(batch_size=batch_size, max_length=toy.max_length, bos_id=BOS, eos_id=EOS)
    greedy = greedy_search(toy.step, toy.state(bias), **common)
    beam_tokens, beam_scores = beam_search(toy.step, tile_for_beams(toy.state(bias), beam),
                                           beam_size=beam, **common)
    sampled = sample(toy.step, toy.state(bias), top_k=3, temperature=0.7, seed=5, **common)
    return greedy, beam_tokens, beam_scores, sampled


def _check_against_references(toy, bias, outputs):
    greedy, beam_tokens, beam_scores, sampled = (np.asarray(x) for x in outputs)
    np.testing.assert_array_equal(greedy, [np_greedy(toy, b, toy.max_length) for b in bias])
    assert beam_tokens.shape == greedy.shape and sampled.shape == greedy.shape
    lengths = np.asarray(decode_lengths(sampled, EOS))
    for row, n in zip(sampled, lengths):
        assert np.all(row[n:] == PAD)
    return beam_tokens, beam_scores, sampled


def _check_compiled_exhaustive(compile_fn):
    """A compiled beam search of 25 beams is the exhaustive search (5**2 = 25 live prefixes)."""
    toy, beam, bias = Toy(vocab=6, max_length=3, seed=14), 25, biases(4, 6, seed=15)
    tokens, scores = compile_fn(lambda bias: beam_search(
        toy.step, tile_for_beams(toy.state(bias), beam), batch_size=4, beam_size=beam,
        max_length=3, bos_id=BOS, eos_id=EOS))(bias)
    for b in range(4):
        ref_score, ref_tokens = np_exhaustive(toy, bias[b], 3, 0.6)
        assert list(np.asarray(tokens)[b]) == ref_tokens
        np.testing.assert_allclose(np.asarray(scores)[b], ref_score, rtol=1e-5, atol=1e-5)


@tf_only
def test_searches_compile_with_xla_and_a_dynamic_batch():
    import tensorflow as tf

    toy = Toy(vocab=6, max_length=5, seed=14)
    bias = biases(4, 6, seed=15)
    eager = [np.asarray(x) for x in _all_searches(toy, bias, 4)]

    @tf.function(jit_compile=True)
    def xla(bias):
        return _all_searches(toy, bias, 4)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def dynamic(bias):
        return _all_searches(toy, bias, tf.shape(bias)[0])

    for fn in (xla, dynamic):
        outputs = [np.asarray(x) for x in fn(tf.constant(bias))]
        beam_tokens, beam_scores, sampled = _check_against_references(toy, bias, outputs)
        np.testing.assert_array_equal(beam_tokens, eager[1])
        np.testing.assert_allclose(beam_scores, eager[2], rtol=1e-5)
        np.testing.assert_array_equal(sampled, np.asarray(fn(tf.constant(bias))[3]))
    # Sampling with top_k=1 inside XLA is the greedy answer.
    greedy_xla = tf.function(jit_compile=True)(
        lambda bias: sample(toy.step, toy.state(bias), batch_size=4, max_length=5, bos_id=BOS,
                            eos_id=EOS, top_k=1, seed=1))
    np.testing.assert_array_equal(np.asarray(greedy_xla(tf.constant(bias))), eager[0])
    _check_compiled_exhaustive(lambda fn: tf.function(fn, jit_compile=True))


@tf_only
def test_searches_inside_a_saved_model(tmp_path):
    import tensorflow as tf

    toy = Toy(vocab=6, max_length=5, seed=16)
    bias = biases(3, 6, seed=17)
    eager = [np.asarray(x) for x in _all_searches(toy, bias, 3)]

    class Searches(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
        def decode(self, bias):
            greedy, tokens, scores, sampled = _all_searches(toy, bias, tf.shape(bias)[0])
            return {"greedy": greedy, "beam": tokens, "scores": scores, "sampled": sampled}

    tf.saved_model.save(Searches(), str(tmp_path / "search"))
    loaded = tf.saved_model.load(str(tmp_path / "search"))
    out = {k: np.asarray(v) for k, v in loaded.decode(tf.constant(bias)).items()}
    np.testing.assert_array_equal(out["greedy"], eager[0])
    np.testing.assert_array_equal(out["beam"], eager[1])
    np.testing.assert_allclose(out["scores"], eager[2], rtol=1e-5)
    _check_against_references(toy, bias, (out["greedy"], out["beam"], out["scores"],
                                          out["sampled"]))
    # A batch size the export never saw.
    more = biases(5, 6, seed=18)
    out = {k: np.asarray(v) for k, v in loaded.decode(tf.constant(more)).items()}
    np.testing.assert_array_equal(out["greedy"], [np_greedy(toy, b, 5) for b in more])


@jax_only
def test_searches_under_jax_jit():
    import jax

    toy = Toy(vocab=6, max_length=5, seed=14)
    bias = biases(4, 6, seed=15)
    eager = [np.asarray(x) for x in _all_searches(toy, bias, 4)]
    jitted = jax.jit(lambda bias: _all_searches(toy, bias, 4))
    outputs = [np.asarray(x) for x in jitted(bias)]
    beam_tokens, beam_scores, sampled = _check_against_references(toy, bias, outputs)
    np.testing.assert_array_equal(beam_tokens, eager[1])
    np.testing.assert_allclose(beam_scores, eager[2], rtol=1e-5)
    np.testing.assert_array_equal(sampled, eager[3])
    _check_compiled_exhaustive(jax.jit)


def test_no_python_loop_per_token_when_traced():
    """Traced once (a tf.function / jax.jit), the step function runs once whatever
    max_length: the loop is a graph loop."""
    toy = Toy(vocab=6, max_length=5)
    traced = []

    def step(tokens, state, index):
        traced.append(1)
        return toy.step(tokens, state, index)

    bias = biases(2, 6)
    if BACKEND == "tensorflow":
        import tensorflow as tf
        compile_ = tf.function
    else:
        import jax
        compile_ = jax.jit
    fn = compile_(lambda bias: greedy_search(step, toy.state(bias), batch_size=2, max_length=5,
                                             bos_id=BOS, eos_id=EOS))
    np.asarray(fn(bias))
    assert len(traced) <= 2  # TF may trace the body twice (shape inference), never 5 times


def test_itertools_reference_sanity():
    """The exhaustive reference enumerates what a brute force over every token tuple gives."""
    toy = Toy(vocab=4, max_length=3, seed=20)
    bias = biases(1, 4, seed=21)[0]
    best = (-np.inf, None)
    for n in range(1, 4):
        for seq in itertools.product(range(4), repeat=n):
            if EOS in seq[:-1] or seq[-1] != EOS:
                continue
            prefix, logp = [BOS], 0.0
            for token in seq:
                logp += log_softmax(toy.np_logits(prefix, bias))[token]
                prefix.append(token)
            if logp / penalty(n, 0.6) > best[0]:
                best = (logp / penalty(n, 0.6), pad(list(seq), 3))
    score, tokens = np_exhaustive(toy, bias, 3, 0.6)
    assert tokens == best[1] and np.isclose(score, best[0])
