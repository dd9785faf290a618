"""Evaluation of CLIPPO models (text rendered as images, one encoder): the embed functions.

The evaluators take ``embed_text(token_ids int32 [B, L]) -> [B, D]`` and a tokenizer. For a
CLIPPO model the tokenizer is the :class:`~keras_mm.pipelines.ops.render_text.TextRenderer`: its
``tokenize`` gives Unicode code points ``int32 [B, L]`` (and the eval datasets built with
``InputConfig(render_text=True)`` hold those code points under ``text`` / ``texts``), and
``embed_text`` renders them in-graph and runs the model's one encoder. So the zero-shot,
retrieval and probe evaluators run unchanged::

    renderer = datasets.text_renderer(input_config)        # input_config.render_text=True
    embed_image, embed_text = clippo_embed_functions(model, renderer)
    zero_shot.evaluate_zero_shot_folder(embed_image, embed_text, folder, "test", input_config,
                                        renderer)

or in one call: :func:`evaluate_clippo`. The model is duck-typed (``embed_image(images)``,
``embed_text(rendered images)``, as ``keras_mm.models.clippo.CLIPPOModel``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

EmbedFn = Callable[[np.ndarray], np.ndarray]
TASKS = ("zero_shot", "retrieval")


def clippo_embed_functions(model, renderer) -> Tuple[EmbedFn, EmbedFn]:
    """``(embed_image, embed_text)`` over NumPy batches, compiled once (TensorFlow backend).

    ``embed_image``: images float32 ``[B, S, S, 3]`` -> ``[B, D]``; ``embed_text``: code points
    int32 ``[B, L]`` (``renderer.tokenize``) -> rendered ``[B, S, S, 3]`` -> ``[B, D]``. Both
    return L2-normalised float32 NumPy arrays.
    """
    import keras
    import tensorflow as tf

    if keras.backend.backend() == "tensorflow":
        # No Python control flow on tensors here: autograph off (it would re-read the sources).
        image_fn = tf.function(lambda x: model.embed_image(x), reduce_retracing=True,
                               autograph=False)
        text_fn = tf.function(lambda ids: model.embed_text(renderer.render_codepoints(ids)),
                              reduce_retracing=True, autograph=False)
        return (lambda x: image_fn(x).numpy()), (lambda ids: text_fn(ids).numpy())

    def embed_text(ids):         # render with TensorFlow, embed with the backend in use
        images = renderer.render_codepoints(tf.convert_to_tensor(ids)).numpy()
        return keras.ops.convert_to_numpy(model.embed_text(images))

    return (lambda x: keras.ops.convert_to_numpy(model.embed_image(x))), embed_text


def evaluate_clippo(model, folder: str, split: str = "test", input_config=None,
                    tasks: Sequence[str] = TASKS, *, renderer=None,
                    templates: Optional[Sequence[str]] = None,
                    class_names: Optional[Sequence[str]] = None,
                    max_examples: Optional[int] = None) -> Dict[str, Any]:
    """Zero-shot (label-as-text folders) and / or retrieval metrics of a CLIPPO model.

    Args:
      model: a CLIPPO model (``embed_image``, ``embed_text`` of rendered images).
      folder, split: the dataset folder and split evaluated.
      input_config: an ``InputConfig`` (``render_text`` is forced on; image size, eval
        preprocessing, value range and batch size come from it); default ``InputConfig()``.
      tasks: any of ``"zero_shot"``, ``"retrieval"``.
      renderer: default ``datasets.text_renderer(input_config)``.
      templates, class_names: zero-shot overrides of ``templates_eval.txt`` / ``classnames.txt``.
      max_examples: zero-shot: only the first images.

    Returns:
      the evaluators' outputs merged (``zero_shot_top1``, ``zero_shot_top5``,
      ``retrieval_i2t_r1`` ... and their counts).
    """
    from keras_mm.evaluation import retrieval, zero_shot
    from keras_mm.pipelines import datasets

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown CLIPPO eval tasks {unknown}; valid: {', '.join(TASKS)}")
    config = dataclasses.replace(input_config or datasets.InputConfig(), render_text=True)
    renderer = renderer or datasets.text_renderer(config)
    embed_image, embed_text = clippo_embed_functions(model, renderer)
    metrics: Dict[str, Any] = {}
    if "zero_shot" in tasks:
        metrics.update(zero_shot.evaluate_zero_shot_folder(
            embed_image, embed_text, folder, split, config, renderer, templates=templates,
            class_names=class_names, max_examples=max_examples))
    if "retrieval" in tasks:
        metrics.update(retrieval.evaluate_retrieval_folder(
            embed_image, embed_text, folder, split, config, renderer))
    return metrics
