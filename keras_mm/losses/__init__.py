"""Losses as pure functions of embeddings and logits (softmax / sigmoid / focal contrastive, captioning)."""

from keras_mm.losses.captioning import captioning_loss, token_accuracy, token_cross_entropy
from keras_mm.losses.focal_contrastive import focal_contrastive_logits, focal_contrastive_loss
from keras_mm.losses.pair_accuracy import pair_accuracy, pair_hits
from keras_mm.losses.sigmoid_contrastive import (
    chunked_sigmoid_loss,
    sigmoid_block_loss,
    sigmoid_logits,
    sigmoid_loss,
)
from keras_mm.losses.softmax_contrastive import logit_scale, softmax_contrastive_loss
