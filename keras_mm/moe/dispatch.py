"""Token groups, expert capacity and top-k dispatch with (optional) Batch Priority Routing.

V-MoE (Riquelme et al. 2021, Sec. 2.2 and 4.1; reference code ``vmoe/moe.py``):

* **Groups.** The ``batch * tokens`` tokens are cut into groups of ``group_size`` tokens
  (``[groups, group_size, width]``) and every group is routed independently, so the dispatch
  tensors grow linearly with the batch (``groups * group_size * experts * capacity``), not with
  its square.
* **Capacity.** Each expert takes at most ``C = ceil(capacity_factor * k * group_size / E)``
  tokens of a group (capped at ``group_size``: an expert never sees a token twice). A choice that
  finds its expert full is dropped: that token gets nothing from that expert (with k = 1 its MoE
  output is 0 and it passes through the residual connection unchanged).
* **Who claims a slot first.** Choices are processed in rounds, all tokens' first choices before
  any second choice (V-MoE, ``_get_top_experts_per_item_common``). Inside a round the order is the
  token position ("vanilla" routing) or, with **Batch Priority Routing** (BPR, V-MoE Sec. 4.1),
  the descending top-1 routing gate of the token: confident tokens first. It is computed without
  a loop over tokens: sort the tokens by priority, one-hot their experts, cumulative-sum along the
  (round, sorted token) order to get each choice's slot, unsort.

Ties in priority keep position order (``top_k`` returns equal values lowest index first on both
backends). Padding tokens (``valid = 0``) claim no slot.
"""

from __future__ import annotations

import math

from keras import ops


def expert_capacity(group_size, num_experts, num_selected=1, capacity_factor=1.0):
    """``C = min(group_size, max(1, ceil(capacity_factor * k * group_size / E)))`` (python int)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    capacity = int(math.ceil(capacity_factor * num_selected * group_size / num_experts - 1e-9))
    return int(min(group_size, max(1, capacity)))


def group_tokens(x, group_size):
    """``[batch, tokens, ...] -> [groups, group_size, ...]``, zero-padding the last group.

    Returns ``(groups, valid)`` with ``valid`` ``[groups, group_size]`` float32 (0 = padding).
    Works with a batch size unknown when traced (TensorFlow) as well as with static shapes.
    """
    shape = ops.shape(x)
    num_tokens = shape[0] * shape[1]
    flat = ops.reshape(x, (-1,) + tuple(shape[2:]))                       # [N, ...]
    num_groups = (num_tokens + group_size - 1) // group_size
    pad = num_groups * group_size - num_tokens
    flat = ops.pad(flat, [[0, pad]] + [[0, 0]] * (len(shape) - 2))
    valid = ops.pad(ops.ones((num_tokens,), "float32"), [[0, pad]])
    return (ops.reshape(flat, (-1, group_size) + tuple(shape[2:])),
            ops.reshape(valid, (-1, group_size)))


def ungroup_tokens(groups, batch_shape):
    """``[groups, group_size, ...] -> [batch, tokens, ...]`` (drops the padding).

    ``batch_shape``: ``(batch, tokens)`` (ints or scalar tensors, e.g. ``ops.shape(x)[:2]``).
    """
    shape = ops.shape(groups)
    flat = ops.reshape(groups, (-1,) + tuple(shape[2:]))
    flat = flat[: batch_shape[0] * batch_shape[1]]
    return ops.reshape(flat, tuple(batch_shape) + tuple(shape[2:]))


def top_k_dispatch(expert_index, expert_gate, num_experts, capacity, batch_priority=False,
                   valid=None, dtype="float32"):
    """Dispatch and combine tensors of top-k routing with capacity, for every group at once.

    Args:
        expert_index: ``[groups, group_size, k]`` int, each token's chosen experts, best first.
        expert_gate: ``[groups, group_size, k]`` their routing gates (the combine weights; the
            first one is the BPR priority).
        num_experts: E.
        capacity: C, slots per expert and group.
        batch_priority: BPR (slots claimed by descending top-1 gate) instead of by position.
        valid: ``[groups, group_size]``, 0 for padding tokens (claim nothing); None = all valid.
        dtype: of ``dispatch`` and ``combine``.

    Returns:
        a dict:
        ``"dispatch"`` ``[groups, group_size, experts, capacity]`` one-hot (token -> slot),
        ``"combine"`` the same times the token's gate for that expert (differentiable w.r.t.
        ``expert_gate``),
        ``"dispatched"`` ``[groups, group_size, k]`` float32, 1 where that choice got a slot,
        ``"slot"`` ``[groups, group_size, k]`` int32, the slot it got (0 where dropped).
    """
    expert_index = ops.cast(expert_index, "int32")
    shape = ops.shape(expert_index)
    group_size, k = shape[1], shape[2]
    if valid is None:
        valid = ops.ones(shape[:2], "float32")
    valid = ops.cast(valid, "float32")
    # [G, S, k, E] one-hot of the choices; padding tokens choose nothing.
    one_hot = ops.one_hot(expert_index, num_experts, dtype="float32") * valid[:, :, None, None]
    if batch_priority:
        # Tokens in descending order of their top-1 gate (padding last), ties by position.
        priority = ops.where(valid > 0, ops.cast(expert_gate[:, :, 0], "float32"), -1.0)
        _, order = ops.top_k(priority, group_size)                         # [G, S]
        order = ops.cast(order, "int32")
        one_hot = ops.take_along_axis(one_hot, order[:, :, None, None], axis=1)
    # Rounds first (all first choices before any second choice), then tokens: [G, k * S, E].
    rounds = ops.reshape(ops.transpose(one_hot, (0, 2, 1, 3)), (-1, k * group_size, num_experts))
    position = ops.cumsum(rounds, axis=1) - 1.0                            # slot if claimed
    position = ops.sum(position * rounds, axis=-1)                         # [G, k * S]
    claimed = ops.sum(rounds, axis=-1)                                     # 1 where a choice
    position = ops.transpose(ops.reshape(position, (-1, k, group_size)), (0, 2, 1))  # [G, S, k]
    claimed = ops.transpose(ops.reshape(claimed, (-1, k, group_size)), (0, 2, 1))
    if batch_priority:
        inverse = ops.cast(ops.argsort(order, axis=-1), "int32")           # unsort
        position = ops.take_along_axis(position, inverse[:, :, None], axis=1)
        claimed = ops.take_along_axis(claimed, inverse[:, :, None], axis=1)
    dispatched = claimed * ops.cast(ops.less(position, float(capacity)), "float32")  # [G, S, k]
    slot = ops.cast(position * dispatched, "int32")
    # [G, S, k, E] x [G, S, k, C] -> [G, S, E, C]; a token's k experts differ, so no overlaps.
    expert_one_hot = ops.one_hot(expert_index, num_experts, dtype=dtype)
    slot_one_hot = ops.one_hot(slot, capacity, dtype=dtype) * ops.cast(dispatched, dtype)[..., None]
    dispatch = ops.einsum("gske,gskc->gsec", expert_one_hot, slot_one_hot)
    weighted = slot_one_hot * ops.cast(expert_gate, dtype)[..., None]
    combine = ops.einsum("gske,gskc->gsec", expert_one_hot, weighted)
    return {"dispatch": dispatch, "combine": combine, "dispatched": dispatched, "slot": slot}
