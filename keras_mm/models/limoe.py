"""LIMoE (Mustafa et al. 2022): one sparse mixture-of-experts transformer for images and text,
trained with the contrastive losses of the two-tower models plus the MoE auxiliary losses.

    model = LIMoEModel(OneTowerEncoder(...), loss="sigmoid")
    model.compile(optimizer=...)
    model.fit(dataset)       # batches {"image": [B, S, S, 3], "text": [B, L] int32, ...}

It is a ``TwoTowerModel`` whose two "towers" are views of one ``OneTowerEncoder``: the contrastive
loss over the global batch, ``embed_image`` / ``embed_text``, the logit head and therefore
evaluation and SavedModel export are the two-tower ones. On top, per MoE layer l and modality m
(``keras_mm.losses.moe_auxiliary``; LIMoE Sec. 3.1):

    L = L_contrastive + sum_l sum_m [ w_local * local_entropy(g_lm) +
                                      w_global * max(0, log(tau) - H(mean g_lm))
                                      + w_importance * importance(g_lm) + w_load * load(g_lm) ]

averaged over layers. Logged per step: the contrastive ``loss`` total (Keras' ``loss`` includes
the auxiliaries), ``aux_loss``, ``routing_success_image`` / ``routing_success_text`` (fraction
of the modality's tokens that got an expert slot, mean over MoE layers) and the gate entropies.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.losses import moe_auxiliary as aux
from keras_mm.models.two_tower import TwoTowerModel, l2_normalize
from keras_mm.moe import routing_stats
from keras_mm.training import global_batch

MODALITIES = ("image", "text")


@keras.saving.register_keras_serializable(package="keras_mm")
class LIMoEModel(TwoTowerModel):
    """A one-tower sparse MoE contrastive model (see the module docstring).

    Args:
        encoder: a ``keras_mm.encoders.one_tower.OneTowerEncoder``.
        loss, chunked, log_scale_init, bias_init: as ``TwoTowerModel``.
        local_entropy_weight, global_entropy_weight: LIMoE's entropy losses (per modality).
        global_entropy_tau: the global entropy threshold tau, in experts (None: no threshold).
        importance_weight, load_weight: V-MoE's balancing losses (0: off; LIMoE uses its entropy
            losses instead).
    """

    family = "limoe"

    def __init__(self, encoder, loss="sigmoid", chunked=False, log_scale_init=None,
                 bias_init=None, local_entropy_weight=0.01, global_entropy_weight=0.01,
                 global_entropy_tau=None, importance_weight=0.0, load_weight=0.0, **kwargs):
        super().__init__(None, None, loss=loss, chunked=chunked, log_scale_init=log_scale_init,
                         bias_init=bias_init, **kwargs)
        self.encoder = encoder
        self.local_entropy_weight = float(local_entropy_weight)
        self.global_entropy_weight = float(global_entropy_weight)
        self.global_entropy_tau = (None if global_entropy_tau is None
                                   else float(global_entropy_tau))
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.aux_tracker = keras.metrics.Mean(name="aux_loss")
        self.routing_trackers = {
            f"{stat}_{m}": keras.metrics.Mean(name=f"{stat}_{m}")
            for m in MODALITIES for stat in ("routing_success", "gate_entropy")}

    # ------------------------------------------------------------------ inference
    def embed_image(self, images, training=False):
        return l2_normalize(self.encoder(images=images, training=training)["image_emb"])

    def embed_text(self, token_ids, training=False):
        return l2_normalize(self.encoder(token_ids=token_ids, training=training)["text_emb"])

    def call(self, inputs, training=False):
        """{"image", "text"} -> {"image_emb", "text_emb", "t"(, "b"), "aux_loss",
        "routing_success_<m>", "gate_entropy_<m>"} (scalars float32)."""
        out = self.encoder(images=inputs["image"], token_ids=inputs["text"], training=training)
        result = {"image_emb": l2_normalize(out["image_emb"]),
                  "text_emb": l2_normalize(out["text_emb"]), "t": self.logits.scale}
        if self.logits.bias is not None:
            result["b"] = ops.cast(self.logits.bias, "float32")
        result.update(self.routing_terms(out))
        return result

    def routing_terms(self, encoder_out):
        """The auxiliary loss and the routing statistics, averaged over the MoE layers."""
        layers = encoder_out["routing"]
        zero = ops.zeros((), "float32")
        terms = {"aux_loss": zero}
        for m in MODALITIES:
            terms[f"routing_success_{m}"] = zero
            terms[f"gate_entropy_{m}"] = zero
        if not layers:
            return terms
        masks = {m: encoder_out[f"{m}_mask"] for m in MODALITIES}
        total = zero
        for routing in layers:
            for m, mask in masks.items():
                gates = routing["gates"]                                     # [B, T, E]
                if self.local_entropy_weight:
                    total += self.local_entropy_weight * aux.local_entropy_loss(gates, mask)
                if self.global_entropy_weight:
                    total += self.global_entropy_weight * aux.global_entropy_loss(
                        gates, mask, threshold=self.global_entropy_tau)
                if self.importance_weight:
                    total += self.importance_weight * aux.importance_loss(gates, mask)
                if self.load_weight:
                    noise = self.encoder.noise_std / self.encoder.num_experts
                    total += self.load_weight * aux.load_loss(
                        routing["logits"], routing["noisy_logits"], noise,
                        self.encoder.num_selected, mask)
                terms[f"routing_success_{m}"] += routing_stats.routing_success_rate(routing, mask)
                terms[f"gate_entropy_{m}"] += routing_stats.mean_gate_entropy(routing, mask)
        count = float(len(layers))
        return {k: v / count if k != "aux_loss" else total / count for k, v in terms.items()}

    # ------------------------------------------------------------------ training
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        # The auxiliaries are per replica (local tokens): average them over the replicas.
        _, replicas = global_batch.replica_info()
        return loss + y_pred["aux_loss"] / replicas

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.aux_tracker.update_state(y_pred["aux_loss"])
        for name, tracker in self.routing_trackers.items():
            tracker.update_state(y_pred[name])
        return super().compute_metrics(x, y, y_pred, sample_weight)

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = keras.Model.get_config(self)
        config.update({
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "loss": self.loss_type, "chunked": self.chunked,
            "log_scale_init": self.log_scale_init, "bias_init": self.bias_init,
            "local_entropy_weight": self.local_entropy_weight,
            "global_entropy_weight": self.global_entropy_weight,
            "global_entropy_tau": self.global_entropy_tau,
            "importance_weight": self.importance_weight, "load_weight": self.load_weight,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


def build_limoe(preset="tiny", loss="sigmoid", *, vocab_size=None, max_len=None,
                encoder_overrides=None, chunked=False, log_scale_init=None, bias_init=None,
                **loss_weights):
    """A LIMoEModel from a preset name (``keras_mm.encoders.presets.limoe_config``)."""
    from keras_mm.encoders import presets
    from keras_mm.encoders.one_tower import OneTowerEncoder

    overrides = dict(encoder_overrides or {})
    if vocab_size is not None:
        overrides["vocab_size"] = int(vocab_size)
    if max_len is not None:
        overrides["max_len"] = int(max_len)
    config = presets.limoe_config(preset, **overrides)
    defaults = presets.limoe_loss_weights(preset)
    defaults.update(loss_weights)
    return LIMoEModel(OneTowerEncoder(**config, name="encoder"), loss=loss, chunked=chunked,
                      log_scale_init=log_scale_init, bias_init=bias_init, **defaults,
                      name=f"limoe_{preset}")

