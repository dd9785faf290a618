"""Losses as pure functions of embeddings and logits (contrastive softmax / sigmoid, ...)."""

from keras_mm.losses.pair_accuracy import pair_accuracy, pair_hits
from keras_mm.losses.sigmoid_contrastive import (
    chunked_sigmoid_loss,
    sigmoid_block_loss,
    sigmoid_logits,
    sigmoid_loss,
)
from keras_mm.losses.softmax_contrastive import logit_scale, softmax_contrastive_loss
