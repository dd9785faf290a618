"""TextDecoder: masks, cross-attention placement, the key / value cache, serialization."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.decoders.decoder_block import DecoderBlock
from keras_mm.decoders.text_decoder import TextDecoder, cross_attention_layers
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)
V, L = 23, 7


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(7)


def _ids(batch=3, length=L, pad_from=None):
    ids = RNG.integers(3, V, size=(batch, length)).astype("int32")
    ids[:, 0] = 1
    if pad_from is not None:
        ids[-1, pad_from] = 2
        ids[-1, pad_from + 1:] = 0
    return ids


def _context(batch=3, tokens=5, width=12):
    return RNG.normal(size=(batch, tokens, width)).astype("float32")


def _decoder(cross_attention="all", **kwargs):
    return TextDecoder(V, max_len=L, width=16, depth=4, heads=2, mlp_dim=32,
                       cross_attention=cross_attention, **kwargs)


@pytest.mark.parametrize("spec,expected", [
    ("all", (0, 1, 2, 3, 4, 5)), ("none", ()), ("every_other", (1, 3, 5)),
    ("last_2", (4, 5)), ("first_1", (0,)), ("0,3", (0, 3)), ([5, 1], (1, 5))])
def test_cross_attention_placement(spec, expected):
    assert cross_attention_layers(spec, 6) == expected
    decoder = TextDecoder(V, max_len=L, width=8, depth=6, heads=2, mlp_dim=16,
                          cross_attention=spec)
    assert tuple(i for i, b in enumerate(decoder.blocks) if b.cross_attention) == expected


@pytest.mark.parametrize("spec", ["last_7", "middle", "0,9", "last_x"])
def test_bad_placement_is_rejected(spec):
    with pytest.raises(ValueError, match="cross_attention"):
        cross_attention_layers(spec, 6)


def _logits(decoder, ids, context=None, **kwargs):
    return np.asarray(ops.convert_to_numpy(decoder(ids, context, **kwargs)))


@pytest.mark.parametrize("spec", ["all", "every_other", "none"])
def test_causal_pass_never_sees_later_tokens(spec):
    decoder = _decoder(spec)
    ids, context = _ids(), _context()
    base = _logits(decoder, ids, context)
    for t in range(1, L):
        changed = ids.copy()
        changed[:, t:] = RNG.integers(3, V, size=changed[:, t:].shape)
        out = _logits(decoder, changed, context)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-5)
        assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4   # the later positions do change


def test_bidirectional_pass_sees_later_tokens():
    decoder = _decoder("none")
    ids = _ids()
    base = _logits(decoder, ids, use_causal_mask=False)
    changed = ids.copy()
    changed[:, -1] = (changed[:, -1] + 1 - 3) % (V - 3) + 3
    assert np.abs(_logits(decoder, changed, use_causal_mask=False)[:, 0] - base[:, 0]).max() > 1e-5


def test_padding_is_invisible():
    decoder = _decoder("all")
    ids, context = _ids(pad_from=4), _context()        # last row: EOS at 4, PAD at 5 and 6
    padded = _logits(decoder, ids, context, use_causal_mask=False)
    # Padding positions are keys nobody attends to: the real tokens' logits do not depend on
    # the pads that follow, even bidirectionally.
    unpadded = _logits(decoder, ids[-1:, :5], context[-1:], use_causal_mask=False)
    np.testing.assert_allclose(padded[-1, :5], unpadded[0], atol=1e-5)
    # ... while a real token there would change them.
    real = ids[-1:].copy()
    real[0, 5:] = 5
    assert np.abs(_logits(decoder, real, context[-1:], use_causal_mask=False)[0, :5]
                  - padded[-1, :5]).max() > 1e-4


def test_cross_attention_can_be_switched_off_and_context_is_used():
    decoder = _decoder("every_other")
    ids, context = _ids(), _context()
    with_image = _logits(decoder, ids, context)
    other_image = _logits(decoder, ids, _context())
    assert np.abs(with_image - other_image).max() > 1e-4
    # Without cross-attention no token sees the context (MaMMUT's contrastive pass).
    np.testing.assert_allclose(_logits(decoder, ids, context, use_cross_attention=False),
                               _logits(decoder, ids, None, use_cross_attention=False), atol=0)


def test_context_mask_hides_context_tokens():
    decoder = _decoder("all")
    ids, context = _ids(), _context()
    mask = np.ones((3, 5), bool)
    mask[:, 3:] = False
    base = _logits(decoder, ids, context, context_mask=mask)
    changed = context.copy()
    changed[:, 3:] = RNG.normal(size=changed[:, 3:].shape)
    np.testing.assert_allclose(_logits(decoder, ids, changed, context_mask=mask), base,
                               atol=1e-5)


def test_missing_context_is_an_error():
    decoder = _decoder("all")
    with pytest.raises(ValueError, match="context"):
        decoder(_ids(), None)


@pytest.mark.parametrize("spec,tie,qk_norm", [("all", True, False), ("every_other", False, True),
                                              ("none", True, False), ("last_1", False, False)])
def test_cached_steps_equal_full_decoding(spec, tie, qk_norm):
    decoder = _decoder(spec, tie_embeddings=tie, qk_norm=qk_norm)
    ids, context = _ids(), _context()
    mask = np.ones((3, 5), bool)
    mask[1, 2:] = False
    full = _logits(decoder, ids, context, context_mask=mask)
    state = decoder.init_state(3, context, mask)
    steps = []
    for i in range(L):
        logits, state = decoder.step(ids[:, i], state, i)
        steps.append(ops.convert_to_numpy(logits))
    np.testing.assert_allclose(np.stack(steps, axis=1), full, atol=2e-5)


def test_extra_tokens_are_input_only():
    decoder = _decoder("none", extra_tokens=2)
    ids = _ids()
    ids[:, -1] = V + 1
    out = _logits(decoder, ids)
    assert out.shape == (3, L, V)


def test_block_and_decoder_serialize():
    ids, context = _ids(), _context()
    assert_serialization_round_trip(_decoder("every_other", tie_embeddings=False),
                                    (ids, context))
    block = DecoderBlock(2, 32, cross_attention=True)
    x = RNG.normal(size=(3, L, 16)).astype("float32")
    assert_serialization_round_trip(block, (x, context))
