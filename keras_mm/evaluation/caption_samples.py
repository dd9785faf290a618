"""Caption samples in TensorBoard: the images and a markdown table of predicted and reference captions.

``write_caption_samples`` writes, at one step, under the tags

  caption_samples/images   ``tf.summary.image`` of the first ``max_samples`` images (IMAGES tab)
  caption_samples/table    ``tf.summary.text`` of a markdown table ``id | prediction | reference``
                           (TEXT tab; TensorBoard renders the markdown)

so a captioner's eval can be read next to its CIDEr curve. It returns the markdown table too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf

IMAGES_TAG = "caption_samples/images"
TABLE_TAG = "caption_samples/table"


def images_to_uint8(images) -> np.ndarray:
    """[N, H, W, C] images -> uint8 in [0, 255].

    uint8 images pass through. Float images are read as [-1, 1] when any value is negative (the models'
    input range) and as [0, 1] otherwise, then rounded and clipped. C is 1, 3 or 4 (a [N, H, W] batch is
    taken as greyscale).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"write_caption_samples: images must be [N, H, W, 1|3|4], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"write_caption_samples: images must be uint8 or float, got {images.dtype}")
    images = images.astype(np.float32)
    if images.size and images.min() < 0.0:
        images = (images + 1.0) / 2.0
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _cell(text) -> str:
    """One markdown table cell: bytes decoded, line breaks -> spaces, '|' escaped, empty -> an em dash."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(str(text).splitlines()).replace("|", "\\|").strip()
    return text if text else "\u2014"


def caption_table(predictions, references, ids=None) -> str:
    """Markdown table ``| id | prediction | reference |``, one row per sample; several references of one
    sample are joined with " / "."""
    ids = range(len(predictions)) if ids is None else ids
    lines = ["| id | prediction | reference |", "|---|---|---|"]
    for key, prediction, reference in zip(ids, predictions, references):
        if not isinstance(reference, (str, bytes)):
            reference = " / ".join(_cell(r) for r in reference)
        lines.append(f"| {_cell(key)} | {_cell(prediction)} | {_cell(reference)} |")
    return "\n".join(lines)


def write_caption_samples(
    logdir: str,
    step: int,
    images,
    predictions: Sequence[Union[str, bytes]],
    references: Sequence[Union[str, bytes, Sequence[str]]],
    max_samples: int = 8,
    ids: Optional[Sequence] = None,
) -> str:
    """Write the first ``max_samples`` samples to TensorBoard at ``step``.

    Args:
        logdir: the summary folder (e.g. ``<out>/tensorboard/eval``); a new event file is written there.
        step: the training step the samples belong to.
        images: [N, H, W, C] uint8 in [0, 255], or float in [-1, 1] (when any value is negative) or [0, 1];
            C = 1, 3 or 4. Any array-like (NumPy, tf, jax).
        predictions: N predicted captions.
        references: N reference captions; an entry may be a list of references.
        max_samples: how many samples (images and rows) to write.
        ids: optional N sample ids for the table's first column (default 0..N-1).

    Returns:
        The markdown table written under ``caption_samples/table``.
    """
    count = min(max_samples, len(predictions))
    if len(references) < count:
        raise ValueError(
            f"write_caption_samples: {len(predictions)} predictions but {len(references)} references")
    images = images_to_uint8(images)[:count]
    if len(images) < count:
        raise ValueError(f"write_caption_samples: {len(predictions)} predictions but {len(images)} images")
    table = caption_table(list(predictions)[:count], list(references)[:count],
                          None if ids is None else list(ids)[:count])
    writer = tf.summary.create_file_writer(str(logdir))
    try:
        with writer.as_default():
            if count:
                tf.summary.image(IMAGES_TAG, images, step=step, max_outputs=count)
            tf.summary.text(TABLE_TAG, table, step=step)
        writer.flush()
    finally:
        writer.close()
    return table
