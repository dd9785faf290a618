import numpy as np
import pytest

from keras_mm.moe.dispatch import expert_capacity, group_tokens, top_k_dispatch, ungroup_tokens
from tests.keras_mm.moe import numpy_moe as ref

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)


@pytest.mark.parametrize("group_size, experts, k, factor, expected", [
    (8, 4, 1, 1.0, 2), (8, 4, 2, 1.0, 4), (10, 4, 1, 1.0, 3), (10, 4, 1, 1.25, 4),
    (8, 4, 1, 0.01, 1), (8, 2, 2, 4.0, 8), (196, 8, 1, 1.05, 26)])
def test_capacity(group_size, experts, k, factor, expected):
    assert expert_capacity(group_size, experts, k, factor) == expected


def test_group_and_ungroup_pad_the_last_group():
    x = RNG.normal(size=(3, 5, 2)).astype("float32")
    groups, valid = group_tokens(x, 4)
    groups, valid = np.asarray(groups), np.asarray(valid)
    assert groups.shape == (4, 4, 2) and valid.shape == (4, 4)
    np.testing.assert_array_equal(groups.reshape(-1, 2)[:15], x.reshape(-1, 2))
    np.testing.assert_array_equal(groups.reshape(-1, 2)[15:], 0)
    np.testing.assert_array_equal(valid.reshape(-1), [1] * 15 + [0])
    np.testing.assert_array_equal(np.asarray(ungroup_tokens(groups, (3, 5))), x)


def _dispatch(gates, k, group_size, cap, bpr, valid):
    """The layer's dispatch on ``gates [N, E]`` grouped like the reference."""
    values = np.sort(gates, -1)[:, ::-1][:, :k]
    index = np.argsort(-gates, -1, kind="stable")[:, :k]
    e = gates.shape[-1]
    grp = lambda a: group_tokens(a[None], group_size)[0]            # noqa: E731
    valid_g = grp(valid.astype("float32")[:, None])[..., 0]     # padding: zeros
    out = top_k_dispatch(grp(index.astype("int32")), grp(values.astype("float32")), e, cap,
                         batch_priority=bpr, valid=valid_g)
    n = len(gates)
    return {name: np.asarray(t).reshape((-1,) + tuple(np.asarray(t).shape[2:]))[:n]
            for name, t in out.items()}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bpr", [False, True])
def test_dispatch_matches_a_loop_over_tokens(k, bpr):
    num_tokens, experts, group_size = 27, 4, 8          # 4 groups, the last one short
    gates = ref.softmax(RNG.normal(size=(num_tokens, experts)) * 2.0)
    valid = RNG.random(num_tokens) > 0.15
    cap = 1 if k == 1 else 2                            # below demand: many drops
    out = _dispatch(gates, k, group_size, cap, bpr, valid)
    index, dispatched, slot = ref.route(gates, k, group_size, cap, bpr, valid)
    np.testing.assert_array_equal(out["dispatched"], dispatched.astype("float32"))
    np.testing.assert_array_equal(out["slot"], np.where(dispatched, slot, 0))
    expected = np.zeros((num_tokens, experts, cap))
    for t in range(num_tokens):
        for r in range(k):
            if dispatched[t, r]:
                expected[t, index[t, r], slot[t, r]] = 1.0
    np.testing.assert_array_equal(out["dispatch"], expected)
    np.testing.assert_allclose(out["combine"], expected * gates[:, :, None], atol=1e-6)
    assert 0 < dispatched.sum() < valid.sum() * k       # capacity really bit
    assert not dispatched[~valid].any()


def test_bpr_gives_first_choices_priority_over_second_choices():
    # 4 tokens, 2 experts, k = 2, capacity 2: all first choices (and only they) get a slot,
    # even the lowest-priority token's first choice before the top token's second choice.
    gates = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    for bpr in (False, True):
        out = _dispatch(gates, 2, 4, 2, bpr, np.ones(4, bool))
        np.testing.assert_array_equal(out["dispatched"], [[1, 0]] * 4)
