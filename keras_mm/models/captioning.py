"""What every captioner here shares (CoCa, CapPa, MaMMUT, the PaLI-style model): teacher forcing,
the captioning loss as this replica's share, logged metrics, generation with the in-graph searches
and caption scoring.

Text batches hold token ids ``[B, L]`` laid out ``BOS t_1 .. t_n EOS PAD ..`` (the pipelines'
``add_bos=True``). Teacher forcing feeds ``text[:, :-1]`` and predicts ``text[:, 1:]``, so a
decoder's ``max_len`` is ``L - 1`` and a generated caption has at most ``L - 1`` tokens.

A model mixes :class:`CaptionerMixin` into a ``keras.Model`` and provides ``decoder`` (a
:class:`~keras_mm.decoders.text_decoder.TextDecoder`) and ``caption_context(images,
training=False) -> (context [B, S, C], context_mask [B, S] or None)``. With ``blind=True`` the
context is zeroed: the same decoder trained without the image, the language-model baseline a
captioner must beat.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.losses import captioning as caption_losses
from keras_mm.models.two_tower import TwoTowerModel
from keras_mm.training import global_batch


def teacher_forcing(text):
    """``[B, L]`` ids -> ``(inputs [B, L-1], labels [B, L-1])``."""
    text = ops.cast(text, "int32")
    return text[:, :-1], text[:, 1:]


class CaptionerMixin:
    """Generation, scoring and the captioning loss for a model with ``decoder`` and
    ``caption_context`` (module docstring). Configs hold the nested ``image_encoder`` and
    ``decoder``; ``from_config`` rebuilds them."""

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("image_encoder", "decoder"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    def _init_captioner(self, blind=False, label_smoothing=0.0):
        self.blind = bool(blind)
        self.label_smoothing = float(label_smoothing)
        self.caption_loss_tracker = keras.metrics.Mean(name="caption_loss")
        self.token_accuracy_tracker = keras.metrics.Mean(name="token_accuracy")

    def _build_decoder(self, context_width):
        """Builds the decoder for contexts of ``context_width`` (models that call its pieces -
        ``embed``, ``run_blocks``, ``logits`` - before any whole call need its weights)."""
        if not self.decoder.built:
            self.decoder.build((None, self.decoder.max_len), (None, None, int(context_width)))

    def _blinded(self, context):
        """Zeroes the image context of a blind baseline (same shapes and weights)."""
        return ops.zeros_like(context) if self.blind else context

    def caption_terms(self, logits, text):
        """``{"caption_loss", "token_accuracy"}`` (float32 scalars, local batch) of teacher-forced
        ``logits [B, L-1, V]`` for ``text [B, L]``: computed in ``call`` and returned with the
        predictions, so metrics update outside the differentiated function on every backend."""
        _, labels = teacher_forcing(text)
        return {"caption_loss": caption_losses.captioning_loss(
                    logits, labels, label_smoothing=self.label_smoothing),
                "token_accuracy": caption_losses.token_accuracy(logits, labels)}

    def caption_share(self, y_pred):
        """This replica's share of the captioning loss: Keras sums the replicas' gradients, so
        the local mean is divided by the replica count."""
        _, replicas = global_batch.replica_info()
        loss = y_pred["caption_loss"]
        return loss / ops.cast(replicas, loss.dtype)

    def track_caption(self, y_pred):
        self.caption_loss_tracker.update_state(y_pred["caption_loss"])
        self.token_accuracy_tracker.update_state(y_pred["token_accuracy"])

    # -- inference ---------------------------------------------------------------------------
    @property
    def max_caption_length(self):
        """The longest caption the model generates (the decoder's positions)."""
        return self.decoder.max_len

    def generate(self, images, *, method="greedy", max_length=None, beam_size=4,
                 length_penalty=0.6, temperature=1.0, top_k=0, seed=None, **context_kwargs):
        """images ``[B, H, W, 3]`` -> caption token ids ``[B, max_length]`` (no BOS, PAD after
        EOS); the search runs in the graph (``TextDecoder.decode``)."""
        context, context_mask = self.caption_context(images, training=False, **context_kwargs)
        max_length = min(int(max_length or self.max_caption_length), self.max_caption_length)
        return self.decoder.decode(context, context_mask, method=method, max_length=max_length,
                                   beam_size=beam_size, length_penalty=length_penalty,
                                   temperature=temperature, top_k=top_k, seed=seed)

    def caption_logits(self, images, text, training=False, **context_kwargs):
        """Teacher-forced logits ``[B, L-1, vocab]`` of ``text [B, L]`` given the images."""
        context, context_mask = self.caption_context(images, training=training,
                                                     **context_kwargs)
        inputs, _ = teacher_forcing(text)
        return self.decoder(inputs, context, context_mask=context_mask, training=training)

    def score_texts(self, images, texts, **context_kwargs):
        """Log-likelihood of every text under every image: images ``[N, H, W, 3]``, texts
        ``[K, L]`` ids -> ``[N, K]`` float32, the sum of log p over the label tokens (CapPa's
        scoring classifier: the class whose caption is most likely wins)."""
        context, context_mask = self.caption_context(images, training=False, **context_kwargs)
        n, k = ops.shape(context)[0], ops.shape(texts)[0]
        inputs, labels = teacher_forcing(texts)                           # [K, L-1]
        # Every (image, text) pair: repeat images K times, tile texts N times.
        context = ops.repeat(context, k, axis=0)                          # [N*K, S, C]
        if context_mask is not None:
            context_mask = ops.repeat(context_mask, k, axis=0)
        inputs = ops.tile(inputs, (n, 1))
        labels = ops.tile(labels, (n, 1))
        logits = self.decoder(inputs, context, context_mask=context_mask)  # [N*K, L-1, V]
        log_probs = ops.log_softmax(logits, axis=-1)
        picked = ops.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        mask = ops.cast(ops.not_equal(labels, self.decoder.pad_id), "float32")
        return ops.reshape(ops.sum(picked * mask, axis=-1), (n, k))


class CaptionOnlyModel(CaptionerMixin, keras.Model):
    """A captioner trained with the captioning loss alone (CapPa, the PaLI-style model): the
    subclass's ``call`` returns ``{"logits", "caption_loss", "token_accuracy"}``."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = self.caption_share(y_pred)
        if self.losses:   # regularisers (none by default), split evenly over replicas
            _, replicas = global_batch.replica_info()
            loss = loss + ops.sum(self.losses) / replicas
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.track_caption(y_pred)
        return self.get_metrics_result()


class ContrastiveCaptionerModel(CaptionerMixin, TwoTowerModel):
    """A captioner with a contrastive head (CoCa, MaMMUT): a ``TwoTowerModel`` whose towers are
    views of the captioner, trained with
    ``contrastive_weight * contrastive_share + caption_weight * caption_share``. The subclass's
    ``call`` returns the two-tower outputs plus ``logits``, ``caption_loss``, ``token_accuracy``
    and sets ``contrastive_weight`` / ``caption_weight``."""

    def contrastive_share(self, x, y, y_pred, sample_weight=None, training=True):
        """This replica's share of the contrastive loss: the two-tower one by default."""
        return TwoTowerModel.compute_loss(self, x, y, y_pred, sample_weight, training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = self.caption_weight * self.caption_share(y_pred)
        if self.contrastive_weight:  # weight 0: a captioning-only model (e.g. a blind baseline)
            loss = loss + self.contrastive_weight * self.contrastive_share(
                x, y, y_pred, sample_weight, training)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.track_caption(y_pred)
        return super().compute_metrics(x, y, y_pred, sample_weight)
