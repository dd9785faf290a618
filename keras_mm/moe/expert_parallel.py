"""Expert parallelism with ``keras.distribution`` (JAX backend): each device of a mesh axis holds
``E / axis size`` of the experts of every ``MoeMlp``.

``MoeMlp`` stores its experts as batched tensors whose leading axis is the expert
(``.../experts_kernel_in [E, width, hidden]``, ``experts_bias_in [E, hidden]``,
``experts_kernel_out [E, hidden, width]``, ``experts_bias_out [E, width]``) and constrains its
dispatched activations ``[E, groups, capacity, width]`` to the layouts named
``<layer path>/expert_inputs`` and ``<layer path>/expert_outputs``. This module's layout map
shards all of them over the expert axis (and the token groups over the batch axis), so each device
runs only its own experts and XLA moves tokens between devices (all-to-all) around the experts,
as GShard / V-MoE do. Everything else (router, attention, embeddings) is replicated unless the
caller's own layout map says otherwise; the input batch is split over the batch axis by
``ModelParallel(batch_dim_name=...)``.

    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    keras.distribution.set_distribution(expert_parallel_distribution(mesh))
    model = ...  # built after this: its expert weights are created sharded

``num_experts`` must be a multiple of the expert axis size, and with ``shard_groups`` the number of
token groups (``batch * tokens / group_size``) a multiple of the batch axis size.
"""

from __future__ import annotations

import keras

EXPERT_WEIGHTS = ("experts_kernel_in", "experts_kernel_out", "experts_bias_in",
                  "experts_bias_out")
EXPERT_ACTIVATIONS = ("expert_inputs", "expert_outputs")


def expert_layout_map(device_mesh, expert_axis="model", batch_axis="batch", layout_map=None,
                      shard_groups=True):
    """A ``keras.distribution.LayoutMap`` sharding every MoE layer's experts over ``expert_axis``.

    Args:
        device_mesh: a ``keras.distribution.DeviceMesh`` with an axis named ``expert_axis``.
        expert_axis: mesh axis for the expert dimension.
        batch_axis: mesh axis the data (and with ``shard_groups`` the token groups of the
            dispatched activations) is split over; None: groups replicated.
        layout_map: an existing LayoutMap (e.g. with the dense layers' layouts) to add to.
        shard_groups: split the groups axis of the dispatched activations over ``batch_axis``.

    Returns:
        the layout map, with the regex keys ``.*experts_kernel_in`` ... (weights) and
        ``.*/expert_inputs``, ``.*/expert_outputs`` (activations).
    """
    if expert_axis not in device_mesh.axis_names:
        raise ValueError(f"expert_axis {expert_axis!r} is not an axis of the mesh "
                         f"{device_mesh.axis_names}")
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(device_mesh)
    for name in EXPERT_WEIGHTS:
        rank = 3 if "kernel" in name else 2
        layout_map[f".*{name}"] = (expert_axis,) + (None,) * (rank - 1)
    groups_axis = batch_axis if shard_groups and batch_axis in device_mesh.axis_names else None
    for name in EXPERT_ACTIVATIONS:
        layout_map[f".*/{name}"] = (expert_axis, groups_axis, None, None)
    return layout_map


def expert_parallel_distribution(device_mesh, expert_axis="model", batch_axis="batch",
                                 layout_map=None, shard_groups=True):
    """``keras.distribution.ModelParallel`` with ``expert_layout_map`` and the batch split over
    ``batch_axis``."""
    layout_map = expert_layout_map(device_mesh, expert_axis, batch_axis, layout_map,
                                   shard_groups)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)
