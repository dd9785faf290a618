"""Two-tower contrastive model: CLIP (softmax), SigLIP (sigmoid) and LiT (locked image tower).

    model = TwoTowerModel(ViTEncoder(...), TextEncoder(...), loss="sigmoid")
    model.compile(optimizer=...)
    model.fit(dataset)        # batches {"image": [B, S, S, 3], "text": [B, L] int32, ...}

The loss is computed over the GLOBAL batch (DESIGN.md): ``compute_loss`` asks
``keras_mm.training.global_batch`` for this replica's share of the global-batch loss, so Keras'
own per-backend ``train_step`` (TF GradientTape under any tf.distribute strategy, JAX stateless
and jitted under ``keras.distribution``) differentiates it; gradient accumulation, loss scaling
and jit_compile keep working. (models/ imports training/ only for that one helper: the rule in
DESIGN.md names it as the place that knows each backend.)

Logged per step: ``loss`` (global-batch loss), ``pair_accuracy`` (image->text top-1 over the
global batch), ``t`` (the logit scale / temperature exp(t')) and, for sigmoid, ``b``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.contrastive_logits import ContrastiveLogits
from keras_mm.models.last_value import LastValue
from keras_mm.training import global_batch

LOSSES = ("sigmoid", "softmax")


def l2_normalize(x, axis=-1, eps=1e-12):
    """x / max(||x||, eps) in float32.  [..., D] -> [..., D]."""
    x = ops.cast(x, "float32")
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True)), eps)


def embed_negatives(embed_text, inputs, training=False):
    """The hard-negative outputs of a contrastive model's ``call``: ``{"negative_text_emb",
    "negative_valid"}`` when the batch has ``text_negative`` (``InputConfig.hard_negatives``;
    ``embed_text``: token ids -> normalised embeddings), else ``{}``."""
    if "text_negative" not in inputs:
        return {}
    out = {"negative_text_emb": embed_text(inputs["text_negative"], training=training)}
    if "negative_valid" in inputs:
        out["negative_valid"] = ops.cast(inputs["negative_valid"], "bool")
    return out


def contrastive_caption(embed_text, inputs, training=False):
    """The contrastive outputs of a captioner's ``call`` when the batch has a caption of its own
    for the contrastive head (``text_contrastive``, ``InputConfig.contrastive_caption``):
    ``{"text_emb": its normalised embedding, "text_ids": its token ids}`` (the ids mark
    identical captions for the loss, :func:`duplicate_captions`); ``{}`` without."""
    if "text_contrastive" not in inputs:
        return {}
    ids = ops.cast(inputs["text_contrastive"], "int32")
    return {"text_emb": embed_text(ids, training=training), "text_ids": ids}


def duplicate_captions(y_pred):
    """``global_softmax_loss`` kwargs that leave identical captions out of each other's softmax
    (``{}`` when ``y_pred`` has no ``text_ids``)."""
    return {"text_ids": y_pred["text_ids"]} if "text_ids" in y_pred else {}


def softmax_extras(y_pred, loss):
    """``global_softmax_loss`` kwargs of ``y_pred``'s hard negatives and contrastive-caption ids
    (:func:`hard_negatives`, :func:`duplicate_captions`); ``{}`` without either.

    Raises:
      ValueError: ``y_pred`` has either and ``loss`` (the model's contrastive loss) is not
        "softmax".
    """
    extras = {**hard_negatives(y_pred), **duplicate_captions(y_pred)}
    if extras and loss != "softmax":
        raise ValueError("hard negative captions (text_negative) and a contrastive caption of "
                         f"its own (text_contrastive) need the softmax loss, not {loss!r}")
    return extras


def hard_negatives(y_pred):
    """``global_softmax_loss`` kwargs of the hard negatives in ``y_pred`` (``{}`` without)."""
    if "negative_text_emb" not in y_pred:
        return {}
    return {"negative_emb": y_pred["negative_text_emb"],
            "negative_valid": y_pred.get("negative_valid")}


@keras.saving.register_keras_serializable(package="keras_mm")
class TwoTowerModel(keras.Model):
    """An image tower and a text tower trained with a contrastive loss over the global batch.

    Args:
        image_encoder: a Keras model, images ``[B, H, W, 3]`` -> ``[B, D]``.
        text_encoder: a Keras model, token ids ``[B, L]`` -> ``[B, D]``.
        loss: ``"sigmoid"`` (SigLIP: t' = log 10, b = -10 at init) or ``"softmax"`` (CLIP:
            temperature 0.07 at init, logit scale clipped at 100).
        chunked: SigLIP's chunked form (logits in memory stay [local, local]).
        lock_image: LiT: the image tower is frozen (not trainable, always run in inference
            mode, so no optimizer slots and no dropout / batch-norm updates).
        log_scale_init, bias_init: override the initial t' (or log scale) and b.
        visual_key: the batch key of the visual input read by ``call`` (``"image"``; video
            models use ``"video"``, ``[B, T, H, W, 3]``, with a video tower).
    """

    # The model family named in exports (keras_mm_export.json) and run summaries.
    family = "two_tower"

    def __init__(self, image_encoder, text_encoder, loss="sigmoid", chunked=False,
                 lock_image=False, log_scale_init=None, bias_init=None, visual_key="image",
                 **kwargs):
        super().__init__(**kwargs)
        self.visual_key = str(visual_key)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if chunked and loss != "sigmoid":
            raise ValueError("the chunked form exists for the sigmoid loss only")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.loss_type = loss
        self.chunked = bool(chunked)
        self.lock_image = bool(lock_image)
        self.log_scale_init, self.bias_init = log_scale_init, bias_init
        self.logits = ContrastiveLogits(loss, log_scale_init=log_scale_init,
                                        bias_init=bias_init, name="logits")
        if self.lock_image:
            self.image_encoder.trainable = False
        self.pair_accuracy_tracker = keras.metrics.Mean(name="pair_accuracy")
        self.t_tracker = LastValue(name="t")
        self.b_tracker = LastValue(name="b") if loss == "sigmoid" else None

    # ------------------------------------------------------------------ inference
    def embed_image(self, images, training=False):
        """images [B, H, W, 3] float -> L2-normalised float32 embeddings [B, D]."""
        training = False if self.lock_image else training
        return l2_normalize(self.image_encoder(images, training=training))

    def embed_text(self, token_ids, training=False):
        """token ids [B, L] int -> L2-normalised float32 embeddings [B, D]."""
        return l2_normalize(self.text_encoder(token_ids, training=training))

    def call(self, inputs, training=False):
        """{"image": [B, H, W, 3], "text": [B, L]} -> {"image_emb", "text_emb"}: [B, D] each,
        plus the current scalars "t" (logit scale) and "b" (bias; sigmoid only) for logging,
        and with hard negatives (``text_negative`` [B, L], ``negative_valid`` [B]) their
        ``negative_text_emb`` and ``negative_valid`` (:func:`embed_negatives`).
        The visual input is read at ``visual_key`` ("image" by default; "video" for video
        towers: ``image_emb`` is then the video embedding)."""
        out = {"image_emb": self.embed_image(inputs[self.visual_key], training=training),
               "text_emb": self.embed_text(inputs["text"], training=training),
               "t": self.logits.scale, **embed_negatives(self.embed_text, inputs, training)}
        if self.logits.bias is not None:
            out["b"] = ops.cast(self.logits.bias, "float32")
        return out

    def similarity(self, image_emb, text_emb):
        """Calibrated scores [N, M]: sigmoid(t cos + b) or softmax over texts (t cos)."""
        return self.logits.probabilities(self.logits(image_emb, text_emb))

    # ------------------------------------------------------------------ training
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """This replica's share of the global-batch contrastive loss (see global_batch)."""
        if y_pred is None:
            y_pred = self(x, training=training)
        image_emb, text_emb = y_pred["image_emb"], y_pred["text_emb"]
        extras = softmax_extras(y_pred, self.loss_type)
        if self.loss_type == "sigmoid":
            loss = global_batch.global_sigmoid_loss(
                image_emb, text_emb, self.logits.log_scale, self.logits.bias,
                chunked=self.chunked)
        else:
            loss = global_batch.global_softmax_loss(
                image_emb, text_emb, self.logits.log_scale, max_scale=self.logits.max_scale,
                **extras)
        if self.losses:  # regularisers (none by default), split evenly over replicas
            _, replicas = global_batch.replica_info()
            loss = loss + ops.sum(self.losses) / replicas
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        hits = global_batch.global_pair_hits(y_pred["image_emb"], y_pred["text_emb"])
        self.pair_accuracy_tracker.update_state(hits)
        # The scalars come through y_pred: on JAX, model variables are only readable inside the
        # stateless call, not in the metrics scope.
        self.t_tracker.update_state(y_pred["t"])
        if self.b_tracker is not None:
            self.b_tracker.update_state(y_pred["b"])
        return self.get_metrics_result()

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update({
            "image_encoder": keras.saving.serialize_keras_object(self.image_encoder),
            "text_encoder": keras.saving.serialize_keras_object(self.text_encoder),
            "loss": self.loss_type, "chunked": self.chunked, "lock_image": self.lock_image,
            "log_scale_init": self.log_scale_init, "bias_init": self.bias_init,
            "visual_key": self.visual_key,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["image_encoder"] = keras.saving.deserialize_keras_object(config["image_encoder"])
        config["text_encoder"] = keras.saving.deserialize_keras_object(config["text_encoder"])
        return cls(**config)


def locked_image_tower(path_or_model):
    """LiT: an image tower from a saved Keras image encoder or classification model.

    A ``.keras`` file or a model. A model whose output is an embedding (e.g. a ``ViTEncoder``)
    is used as is; a classification model (last layer a Dense classifier) is cut before that
    layer, so its penultimate representation becomes the image embedding. Returns a model
    images -> [B, D], frozen.
    """
    model = (keras.saving.load_model(path_or_model) if isinstance(path_or_model, str)
             else path_or_model)
    tower = model
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.Dense) and hasattr(model, "inputs") and model.inputs:
        tower = keras.Model(model.inputs, model.layers[-2].output, name="locked_image_tower")
    tower.trainable = False
    return tower


def build_two_tower(preset="tiny", loss="sigmoid", *, vocab_size=None, max_len=None,
                    style=None, chunked=False, image_overrides=None, text_overrides=None,
                    image_tower=None, log_scale_init=None, bias_init=None):
    """A TwoTowerModel from a preset name (``keras_mm.encoders.presets``).

    ``vocab_size`` / ``max_len`` size the text tower for a tokenizer. ``style`` defaults to
    SigLIP's layout for the sigmoid loss and CLIP's for softmax. ``image_tower``: LiT, a frozen
    pre-trained image model (see ``locked_image_tower``) used instead of a fresh ViT; the text
    tower then projects to that tower's embedding width.
    """
    from keras_mm.encoders import presets
    from keras_mm.encoders.text import TextEncoder
    from keras_mm.encoders.vit import ViTEncoder

    style = style or ("siglip" if loss == "sigmoid" else "clip")
    text_overrides = dict(text_overrides or {})
    if vocab_size is not None:
        text_overrides["vocab_size"] = int(vocab_size)
    if max_len is not None:
        text_overrides["max_len"] = int(max_len)
    cfg = presets.two_tower_config(preset, style=style, image_overrides=image_overrides,
                                   text_overrides=text_overrides)
    if image_tower is not None:
        embed_dim = int(image_tower.output_shape[-1])
        cfg["text"]["output_dim"] = embed_dim
        image = image_tower
    else:
        image = ViTEncoder(**cfg["image"], name="image_encoder")
    text = TextEncoder(**cfg["text"], name="text_encoder")
    return TwoTowerModel(image, text, loss=loss, chunked=chunked,
                         lock_image=image_tower is not None, log_scale_init=log_scale_init,
                         bias_init=bias_init, name=f"two_tower_{preset}")
