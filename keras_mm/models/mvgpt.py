"""MV-GPT (Seo et al. 2022, "End-to-end Generative Pretraining for Multimodal Video Captioning"):
a multimodal video encoder and a sentence decoder pretrained together on unlabelled videos, with
the *future utterance* as the generation target and a bidirectional generation loss.

    visual = Dense(video_encoder tokens)                         [B, S, width]   (frames)
    memory(u) = TransformerEncoder(concat(visual, embed(u)))     [B, S + U, width]
    forward:  decoder(BOS-F future ..., memory(current))   -> the future utterance
    backward: decoder(BOS-B current ..., memory(future))   -> the present utterance
    L = forward_weight * L_forward + backward_weight * L_backward        (1 and 1)

Forward generation fuses the frames with the present transcript to predict what is said next;
backward generation predicts the present (visually grounded) transcript from the frames and the
future utterance, which ties the decoder to the visual input. ``backward=False`` is the paper's
forward-only ablation, ``use_frames=False`` the ablation whose encoder sees the utterance only.

Batches::

    {"video":   [B, T, H, W, 3] float,
     "current": [B, P] ids  t_1 .. t_n EOS PAD ..   (no BOS; the present utterance),
     "future":  [B, L] ids  BOS t_1 .. t_m EOS PAD ..  (the next utterance)}

Special tokens. BOS-F is the tokenizer's BOS (``decoder.bos_id``), so the forward pass is the
captioners' teacher forcing and ``generate`` is ``TextDecoder.decode``. BOS-B is the decoder's
first *extra* token (``TextDecoder(extra_tokens=1)``): id ``decoder.vocab_size``, one more row in
the token embedding and none in the output layer, so it starts backward generation but is never
a target and can never be generated (logits are ``[..., vocab_size]``). The backward pass feeds
the encoder the future utterance without its BOS (``future[:, 1:]``, laid out like ``current``)
and teacher-forces ``concat(BOS-B, current)``: inputs ``[BOS-B, t_1 .. t_{P-1}]``, labels
``current``. Encoder and decoder share the token embedding (T5-style, as the PaLI-style model).
The decoder needs ``max_len >= max(L - 1, P)`` positions and the encoder's text positions
``max_text_len >= max(P, L - 1)``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.decoders import search
from keras_mm.decoders.text_decoder import SEARCH_METHODS
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.transformer_encoder import TransformerEncoder
from keras_mm.models.captioning import CaptionerMixin, CaptionOnlyModel, teacher_forcing
from keras_mm.training import global_batch


@keras.saving.register_keras_serializable(package="keras_mm")
class MVGPTModel(CaptionOnlyModel):
    """Video encoder + multimodal encoder over (frames, utterance) + text decoder.

    Args:
        video_encoder: a ``TubeViTEncoder`` or ``FrameAverageEncoder`` (its tokens are used);
            ignored (stored as None) when ``use_frames=False``.
        decoder: a ``TextDecoder`` cross-attending in every block (or some), with
            ``extra_tokens >= 1``: the first extra id is BOS-B.
        encoder_depth: blocks of the multimodal encoder (heads / MLP as the decoder's).
        max_text_len: the longest utterance the encoder reads (``max(P, L - 1)``).
        backward: add the backward (BOS-B) generation loss; False = forward-only ablation.
        use_frames: False = the no-frames ablation: the encoder sees the utterance alone.
        forward_weight, backward_weight: loss weights.
        label_smoothing: of both captioning losses.

    Outputs of ``call``: ``logits [B, L-1, V]``, ``caption_loss`` and ``token_accuracy`` of the
    forward pass, and with ``backward``: ``backward_logits [B, P, V]``,
    ``backward_caption_loss``, ``backward_token_accuracy``. Logged metrics: ``loss``,
    ``caption_loss``, ``token_accuracy`` (forward) and ``backward_caption_loss``,
    ``backward_token_accuracy``.
    """

    family = "mvgpt"
    visual_key = "video"            # the batch key of the clips (fixed; see the module docstring)

    def __init__(self, video_encoder, decoder, encoder_depth=2, max_text_len=16, backward=True,
                 use_frames=True, forward_weight=1.0, backward_weight=1.0, label_smoothing=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if decoder.extra_tokens < 1:
            raise ValueError("MV-GPT's decoder needs extra_tokens >= 1 (the BOS-B token)")
        if not decoder.cross_layers:
            raise ValueError("MV-GPT's decoder must cross-attend to the multimodal encoder")
        self.use_frames = bool(use_frames)
        if self.use_frames and video_encoder is None:
            raise ValueError("give a video_encoder, or use_frames=False for the no-frames "
                             "ablation")
        self.video_encoder = video_encoder if self.use_frames else None
        self.decoder = decoder
        self.encoder_depth = int(encoder_depth)
        self.max_text_len = int(max_text_len)
        self.backward = bool(backward)
        self.forward_weight = float(forward_weight)
        self.backward_weight = float(backward_weight)
        self.bos_f_id = decoder.bos_id
        self.bos_b_id = decoder.vocab_size              # the first input-only extra token
        self.visual_projection = (keras.layers.Dense(decoder.width, name="visual_projection")
                                  if self.use_frames else None)
        self.text_position = LearnedPositionEmbedding(self.max_text_len, name="text_position")
        self.encoder = TransformerEncoder(
            self.encoder_depth, decoder.heads, decoder.mlp_dim, dropout=decoder.dropout,
            layer_norm_epsilon=decoder.layer_norm_epsilon, name="encoder")
        self._init_captioner(blind=False, label_smoothing=label_smoothing)
        if self.backward:
            self.backward_caption_loss_tracker = keras.metrics.Mean(
                name="backward_caption_loss")
            self.backward_token_accuracy_tracker = keras.metrics.Mean(
                name="backward_token_accuracy")
        self._build_decoder(decoder.width)              # cross-attends to the encoder output

    # -- pieces ------------------------------------------------------------------------------
    def visual_tokens(self, video, training=False):
        """video ``[B, T, H, W, 3]`` -> projected tokens ``[B, S, width]`` (None without
        frames)."""
        if not self.use_frames:
            return None
        _, tokens = self.video_encoder(video, training=training, return_tokens=True)
        return self.visual_projection(tokens)

    def fuse(self, visual, utterance, training=False):
        """The multimodal encoder: visual ``[B, S, width]`` (or None) and utterance ``[B, U]``
        ids (no BOS, PAD 0) -> (memory ``[B, S + U, width]``, mask ``[B, S + U]``)."""
        utterance = ops.cast(utterance, "int32")
        text = self.text_position(self.decoder.token_embedding(utterance))
        mask = ops.not_equal(utterance, self.decoder.pad_id)
        if visual is not None:
            text = ops.cast(text, visual.dtype)
            mask = ops.concatenate([ops.ones(ops.shape(visual)[:2], dtype="bool"), mask],
                                   axis=1)
            text = ops.concatenate([visual, text], axis=1)
        return self.encoder(text, attention_mask=mask, training=training), mask

    def caption_context(self, video, training=False, utterance=None):
        """video ``[B, T, H, W, 3]``, utterance ``[B, U]`` ids -> (memory, mask): the context
        the decoder cross-attends to (``CaptionerMixin``)."""
        if utterance is None:
            raise ValueError("MV-GPT's encoder needs an utterance (token ids [B, U]): the "
                             "present one to generate the future, the future one to generate "
                             "the present")
        return self.fuse(self.visual_tokens(video, training=training), utterance,
                         training=training)

    def backward_target(self, current):
        """``current [B, P]`` -> ``concat(BOS-B, current)`` ``[B, P + 1]``: the backward pass's
        teacher-forced sequence (inputs ``[:, :-1]``, labels ``current``)."""
        current = ops.cast(current, "int32")
        bos = ops.full((ops.shape(current)[0], 1), self.bos_b_id, dtype="int32")
        return ops.concatenate([bos, current], axis=1)

    @staticmethod
    def strip_bos(future):
        """``future [B, L]`` (BOS first) -> ``[B, L - 1]``, laid out like ``current``."""
        return ops.cast(future, "int32")[:, 1:]

    # -- training ----------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """{"video", "current", "future"} -> forward (and backward) logits and loss terms."""
        visual = self.visual_tokens(inputs["video"], training=training) if self.use_frames \
            else None
        current = ops.cast(inputs["current"], "int32")
        future = ops.cast(inputs["future"], "int32")
        memory, mask = self.fuse(visual, current, training=training)
        forward_inputs, _ = teacher_forcing(future)
        logits = self.decoder(forward_inputs, memory, context_mask=mask, training=training)
        out = {"logits": logits, **self.caption_terms(logits, future)}
        if self.backward:
            memory, mask = self.fuse(visual, self.strip_bos(future), training=training)
            target = self.backward_target(current)
            backward_inputs, _ = teacher_forcing(target)
            backward_logits = self.decoder(backward_inputs, memory, context_mask=mask,
                                           training=training)
            terms = self.caption_terms(backward_logits, target)
            out.update(backward_logits=backward_logits,
                       backward_caption_loss=terms["caption_loss"],
                       backward_token_accuracy=terms["token_accuracy"])
        return out

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """``forward_weight * L_f (+ backward_weight * L_b)``, this replica's share."""
        if y_pred is None:
            y_pred = self(x, training=training)
        loss = self.forward_weight * self.caption_share(y_pred)
        if self.backward:
            loss = loss + self.backward_weight * self.caption_share(
                {"caption_loss": y_pred["backward_caption_loss"]})
        if self.losses:
            _, replicas = global_batch.replica_info()
            loss = loss + ops.sum(self.losses) / replicas
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.track_caption(y_pred)
        if self.backward:
            self.backward_caption_loss_tracker.update_state(y_pred["backward_caption_loss"])
            self.backward_token_accuracy_tracker.update_state(
                y_pred["backward_token_accuracy"])
        return self.get_metrics_result()

    # -- inference ---------------------------------------------------------------------------
    def generate(self, video, current, **search_kwargs):
        """Forward generation: video ``[B, T, H, W, 3]`` and the present utterance ``[B, P]``
        -> the future utterance ``[B, max_length]`` ids (no BOS, PAD after EOS), decoded in the
        graph from BOS-F (``TextDecoder.decode``; ``method``, ``max_length``, ``beam_size``,
        ``length_penalty``, ``temperature``, ``top_k``, ``seed`` as there)."""
        return CaptionerMixin.generate(self, video, utterance=current, **search_kwargs)

    def generate_present(self, video, future, *, method="greedy", max_length=None,
                         beam_size=4, length_penalty=0.6, temperature=1.0, top_k=0, seed=None):
        """Backward generation: video and the future utterance ``[B, L]`` (BOS first, as in
        batches) -> the present utterance ``[B, max_length]`` ids, decoded from BOS-B."""
        if method not in SEARCH_METHODS:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
        context, context_mask = self.caption_context(video, utterance=self.strip_bos(future))
        max_length = min(int(max_length or self.max_caption_length), self.max_caption_length)
        batch_size = ops.shape(context)[0]
        d = self.decoder
        state = d.init_state(batch_size, context, context_mask)
        common = dict(batch_size=batch_size, max_length=max_length, bos_id=self.bos_b_id,
                      eos_id=d.eos_id, pad_id=d.pad_id)
        if method == "beam":
            tokens, _ = search.beam_search(d.generation_step,
                                           search.tile_for_beams(state, beam_size),
                                           beam_size=beam_size, length_penalty=length_penalty,
                                           **common)
            return tokens
        if method == "sample":
            return search.sample(d.generation_step, state, temperature=temperature,
                                 top_k=top_k, seed=seed, **common)
        return search.greedy_search(d.generation_step, state, **common)

    # -- serialization -----------------------------------------------------------------------
    def get_config(self):
        config = keras.Model.get_config(self)
        config.update({
            "video_encoder": (None if self.video_encoder is None
                              else keras.saving.serialize_keras_object(self.video_encoder)),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "encoder_depth": self.encoder_depth, "max_text_len": self.max_text_len,
            "backward": self.backward, "use_frames": self.use_frames,
            "forward_weight": self.forward_weight, "backward_weight": self.backward_weight,
            "label_smoothing": self.label_smoothing})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("video_encoder") is not None:
            config["video_encoder"] = keras.saving.deserialize_keras_object(
                config["video_encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)
