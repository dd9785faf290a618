"""Sparse mixture of experts (V-MoE, LIMoE): router, dispatch with capacity and batch priority
routing, the expert MLP, the MoE transformer block, routing statistics and the expert-parallel
layout map. Import the modules directly; the auxiliary losses live in
``keras_mm.losses.moe_auxiliary``."""
