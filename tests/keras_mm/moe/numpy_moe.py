"""Independent NumPy (float64) reference of top-k routing with capacity, batch priority routing and
the expert MLPs, written from V-MoE (Riquelme et al. 2021) with explicit Python loops over groups,
rounds and tokens: the vectorised cumsum implementation in keras_mm/moe is checked against it."""

from __future__ import annotations

import math

import numpy as np

from tests.keras_mm.layers.numpy_reference import gelu_tanh, softmax, w


def capacity(group_size, num_experts, k, factor):
    return min(group_size, max(1, math.ceil(factor * k * group_size / num_experts - 1e-9)))


def route(gates, k, group_size, cap, bpr, valid=None):
    """gates ``[N, E]`` (the routing gates) -> (expert index ``[N, k]``, dispatched ``[N, k]``
    bool, slot ``[N, k]`` int). Tokens are cut into consecutive groups of ``group_size`` (the
    last one shorter); each group's experts have ``cap`` slots; all first choices claim before
    second choices; within a round, tokens go by position or (BPR) by descending top-1 gate,
    ties by position."""
    n, e = gates.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    index = np.argsort(-gates, axis=-1, kind="stable")[:, :k]
    dispatched = np.zeros((n, k), bool)
    slot = np.zeros((n, k), int)
    for start in range(0, n, group_size):
        tokens = list(range(start, min(n, start + group_size)))
        if bpr:
            tokens.sort(key=lambda t: (-gates[t, index[t, 0]], t))
        used = [0] * e
        for r in range(k):
            for t in tokens:
                if not valid[t]:
                    continue
                expert = index[t, r]
                if used[expert] < cap:
                    dispatched[t, r] = True
                    slot[t, r] = used[expert]
                used[expert] += 1
    return index, dispatched, slot


def expert_mlp(layer, expert, x):
    """One expert of a MoeMlp, ``[..., width] -> [..., width]`` (GELU, tanh form)."""
    h = gelu_tanh(x @ w(layer.experts_kernel_in)[expert] + w(layer.experts_bias_in)[expert])
    return h @ w(layer.experts_kernel_out)[expert] + w(layer.experts_bias_out)[expert]


def moe_mlp(layer, x, training=False, valid=None):
    """MoeMlp forward without router noise: ``x [b, n, w]`` -> (y ``[b, n, w]``, kept ``[b, n]``,
    gates ``[b, n, E]``)."""
    b, n, width = x.shape
    flat = x.reshape(-1, width).astype(np.float64)
    gates = softmax(flat @ w(layer.router.kernel))
    factor = layer.capacity_factor
    if not training and layer.eval_capacity_factor is not None:
        factor = layer.eval_capacity_factor
    cap = capacity(layer.group_size, layer.num_experts, layer.num_selected, factor)
    valid = None if valid is None else np.asarray(valid).reshape(-1)
    index, dispatched, _ = route(gates, layer.num_selected, layer.group_size, cap, layer.bpr,
                                 valid)
    y = np.zeros_like(flat)
    for t in range(flat.shape[0]):
        for r in range(layer.num_selected):
            if dispatched[t, r]:
                expert = index[t, r]
                y[t] += gates[t, expert] * expert_mlp(layer, expert, flat[t])
    kept = dispatched.any(-1)
    return y.reshape(b, n, width), kept.reshape(b, n), gates.reshape(b, n, -1)
