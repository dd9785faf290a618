"""RoutingMonitor: per MoE layer and modality, expert load and routing success over training,
as TensorBoard scalars and, at the end, matplotlib figures next to the run.

Every ``every`` global steps the model's encoder runs (inference capacity) on a fixed probe batch
and the callback writes, under the run's ``train`` TensorBoard folder,

    moe/block_<l>/<modality>/routing_success
    moe/block_<l>/<modality>/load_expert_<e>      (share of the modality's tokens sent to e)

At the end of training it saves ``routing_experts.png`` (tokens of each modality per expert, per
MoE block: do experts specialise by modality?) and ``routing_success.png`` (success over steps)
in ``figure_dir``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import keras
import numpy as np

from keras_mm.moe import routing_stats
from keras_mm.training.callbacks import _GlobalStepCallback, _crossed

MODALITIES = ("image", "text")


def probe_routing(model, batch) -> Dict:
    """Routing of ``model.encoder`` (a OneTowerEncoder) on one batch, as numpy:
    ``{"layers": [...], "load_<m>": [layers, E], "success_<m>": [layers], "tokens_<m>":
    [layers, E] (token counts)}``."""
    out = model.encoder(images=batch["image"], token_ids=batch["text"], training=False)
    layers = list(model.encoder.moe_indices)
    result = {"layers": layers}
    for m in MODALITIES:
        mask = out[f"{m}_mask"]
        count = float(np.sum(keras.ops.convert_to_numpy(mask)))
        loads = [keras.ops.convert_to_numpy(routing_stats.expert_load(r, mask))
                 for r in out["routing"]]
        result[f"load_{m}"] = np.asarray(loads, np.float64)
        result[f"tokens_{m}"] = result[f"load_{m}"] * count
        result[f"success_{m}"] = np.asarray(
            [float(keras.ops.convert_to_numpy(routing_stats.routing_success_rate(r, mask)))
             for r in out["routing"]], np.float64)
    return result


class RoutingMonitor(_GlobalStepCallback):
    """See the module docstring.

    Args:
      probe: a batch ``{"image": [B, S, S, 3], "text": [B, L]}`` (numpy or tensors).
      scalar_logger: the run's ``ScalarLogger`` (writes the TensorBoard scalars).
      every: period in global steps.
      figure_dir: where the PNGs go (None: no figures).
      initial_step: the resumed step.
    """

    def __init__(self, probe, scalar_logger, every, figure_dir: Optional[str] = None,
                 initial_step=0):
        super().__init__(initial_step)
        self.probe, self.scalar_logger = probe, scalar_logger
        self.every = int(every)
        self.figure_dir = figure_dir
        self.history: List[Dict] = []

    def _record(self):
        stats = probe_routing(self.model, self.probe)
        scalars = {}
        for m in MODALITIES:
            for i, layer in enumerate(stats["layers"]):
                scalars[f"moe/block_{layer}/{m}/routing_success"] = stats[f"success_{m}"][i]
                for e, load in enumerate(stats[f"load_{m}"][i]):
                    scalars[f"moe/block_{layer}/{m}/load_expert_{e}"] = load
        self.scalar_logger.log_scalars(scalars, step=self.global_step, split="train")
        self.history.append({"step": self.global_step, "layers": stats["layers"],
                             "success_image": stats["success_image"].tolist(),
                             "success_text": stats["success_text"].tolist()})
        return stats

    def on_train_batch_end(self, batch, logs=None):
        before = self._advance(batch)
        if _crossed(before, self.global_step, self.every):
            self._record()

    def on_train_end(self, logs=None):
        stats = self._record()
        if not self.figure_dir or not self.scalar_logger.write:
            return
        from keras_mm.evaluation import routing_plots

        os.makedirs(self.figure_dir, exist_ok=True)
        routing_plots.plot_expert_usage(
            {"layers": stats["layers"], "image_tokens": stats["tokens_image"],
             "text_tokens": stats["tokens_text"]},
            os.path.join(self.figure_dir, "routing_experts.png"),
            title=f"expert use at step {self.global_step}")
        routing_plots.plot_routing_history(
            self.history, os.path.join(self.figure_dir, "routing_success.png"))
