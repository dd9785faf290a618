"""Zero-shot classification with prompt ensembles (CLIP, Radford et al. 2021, Sec. 3.1.4).

Each class name is filled into every eval template (``"{}"`` marks the name), every prompt is
embedded and L2-normalised, the prompts of a class are averaged and the mean is L2-normalised
again: the classifier is ``W [K, D]`` with unit rows. An image is scored by cosine similarity with
every row; its prediction is the highest score.

Cosine ranking gives the same top-k as the models' calibrated scores: ``sigmoid(t * cos + b)``
(SigLIP) and ``softmax`` over labels (CLIP) are increasing in the cosine for a fixed image.

Ties: classes are ranked by a stable descending sort of the scores, so among equal scores the
lower class index ranks first (``np.argmax`` semantics). A collapsed model (all scores equal)
therefore predicts class 0 for everything, not "every class".

Top-5 is the fraction of images whose label is among the ``min(5, K)`` highest-scoring classes;
with K <= 5 classes every label is, so top-5 is 1.0 by definition.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from keras_mm.evaluation import embeddings as emb

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_EVAL_FILE = "templates_eval.txt"


def _read_lines(path: str) -> List[str]:
    import tensorflow as tf    # gfile reads local and remote (gs://) folders

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found (a label-as-text dataset folder holds it)")
    with tf.io.gfile.GFile(path, "r") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def load_class_names(folder: str) -> List[str]:
    """``<folder>/classnames.txt``: class names in label order."""
    return _read_lines(os.path.join(folder, CLASSNAMES_FILE))


def load_eval_templates(folder: str) -> List[str]:
    """``<folder>/templates_eval.txt``: one template a line, ``{}`` marks the class name."""
    return _read_lines(os.path.join(folder, TEMPLATES_EVAL_FILE))


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> List[str]:
    """All prompts, class-major: ``[t0(c0), t1(c0), ..., tT-1(c0), t0(c1), ..., tT-1(cK-1)]``.

    The name replaces ``{}`` literally (no ``str.format``), so braces elsewhere are kept.
    """
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name, bad: "
                         f"{bad[:3]}")
    return [t.replace("{}", str(name)) for name in class_names for t in templates]


def build_zero_shot_classifier(embed_text: emb.EmbedFn, tokenizer: Any,
                               class_names: Sequence[str], templates: Sequence[str],
                               batch_size: int = 256) -> np.ndarray:
    """The prompt-ensembled zero-shot classifier.

    Args:
      embed_text: token ids int32 ``[B, L]`` -> ``[B, D]``.
      tokenizer: a ``Tokenizer`` or a callable strings ``[N]`` -> int32 ``[N, L]``.
      class_names: K names, in label order.
      templates: T templates with one ``{}`` each.
      batch_size: prompts embedded per call.

    Returns:
      float32 ``[K, D]``: row k = normalize(mean_t normalize(embed_text(template_t(name_k)))).
    """
    texts = prompts(class_names, templates)
    prompt_emb = emb.embed_texts(embed_text, tokenizer, texts, batch_size)     # [K * T, D]
    emb.check_finite(prompt_emb, "prompt embeddings")
    return ensemble_classifier(prompt_emb.reshape(len(class_names), len(templates), -1))


def ensemble_classifier(prompt_emb: np.ndarray) -> np.ndarray:
    """Prompt embeddings ``[K, T, D]`` -> classifier ``[K, D]`` (normalize, mean over T,
    normalize)."""
    prompt_emb = np.asarray(prompt_emb, np.float32)
    if prompt_emb.ndim != 3:
        raise ValueError(f"prompt embeddings must be [classes, templates, dim], got "
                         f"{prompt_emb.shape}")
    return emb.l2_normalize(emb.l2_normalize(prompt_emb).mean(axis=1))


def zero_shot_scores(image_emb: np.ndarray, classifier: np.ndarray) -> np.ndarray:
    """Cosine similarities ``[N, K]`` of images ``[N, D]`` with the classifier rows ``[K, D]``."""
    image_emb = np.asarray(image_emb, np.float32)
    classifier = np.asarray(classifier, np.float32)
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(f"image embeddings [N, D] and classifier [K, D] must share D, got "
                         f"{image_emb.shape} and {classifier.shape}")
    emb.check_finite(image_emb, "image embeddings")
    emb.check_finite(classifier, "classifier")
    return emb.l2_normalize(image_emb) @ emb.l2_normalize(classifier).T


def label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each true label among the classes, ties broken towards lower indices.

    rank_i = #{k : s_ik > s_iy} + #{k < y : s_ik == s_iy}, with y = labels[i].

    Args:
      scores: ``[N, K]``; labels: int ``[N]`` in ``[0, K)``.
    Returns:
      int64 ``[N]``.
    """
    n, k = scores.shape
    labels = np.asarray(labels, np.int64)
    true = scores[np.arange(n), labels][:, None]                          # [N, 1]
    higher = np.sum(scores > true, axis=1)
    tied_before = np.sum((scores == true) & (np.arange(k)[None, :] < labels[:, None]), axis=1)
    return (higher + tied_before).astype(np.int64)


def zero_shot_metrics(image_emb: np.ndarray, labels: np.ndarray, classifier: np.ndarray, *,
                      return_confusion: bool = False) -> Dict[str, Any]:
    """Top-1 / top-5 accuracy of precomputed image embeddings.

    Args:
      image_emb: ``[N, D]`` (any norm; compared by cosine).
      labels: int ``[N]`` in ``[0, K)``.
      classifier: ``[K, D]`` from :func:`build_zero_shot_classifier`.
      return_confusion: also return ``"confusion_matrix"``: int64 ``[K, K]``, rows = true label,
        columns = predicted label.

    Returns:
      ``{"zero_shot_top1": float, "zero_shot_top5": float, "num_examples": int
      (, "confusion_matrix": int64 [K, K])}``.
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    scores = zero_shot_scores(image_emb, classifier)                          # [N, K]
    n, k = scores.shape
    if labels.shape[0] != n:
        raise ValueError(f"{n} image embeddings but {labels.shape[0]} labels")
    if n == 0:
        raise ValueError("zero-shot evaluation needs at least one example")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in [0, {k}) for a classifier of {k} classes, got "
                         f"[{labels.min()}, {labels.max()}]")
    ranks = label_ranks(scores, labels)
    out: Dict[str, Any] = {
        "zero_shot_top1": float(np.mean(ranks < 1)),
        "zero_shot_top5": float(np.mean(ranks < min(5, k))),
        "num_examples": int(n),
    }
    if return_confusion:
        predicted = np.argmax(scores, axis=1)                  # first max = rank-0 class
        confusion = np.zeros([k, k], np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        out["confusion_matrix"] = confusion
    return out


def evaluate_zero_shot(embed_image: emb.EmbedFn, classifier: np.ndarray, dataset, *,
                       return_confusion: bool = False,
                       max_examples: Optional[int] = None) -> Dict[str, Any]:
    """Zero-shot accuracy over a labelled eval dataset.

    Args:
      embed_image: images float32 ``[B, S, S, 3]`` -> ``[B, D]``.
      classifier: ``[K, D]`` from :func:`build_zero_shot_classifier`.
      dataset: batches with ``image``, ``id`` and ``label`` (a label-as-text ``eval_dataset``).
      return_confusion, max_examples: see :func:`zero_shot_metrics`, :func:`embed_dataset`.

    Returns:
      ``{"zero_shot_top1", "zero_shot_top5", "num_examples" (, "confusion_matrix")}``.
    """
    data = emb.embed_dataset(embed_image, dataset, max_examples=max_examples)
    if data["labels"] is None:
        raise ValueError("zero-shot evaluation needs labelled batches ('label'): use a "
                         "label-as-text dataset")
    return zero_shot_metrics(data["image_emb"], data["labels"], classifier,
                             return_confusion=return_confusion)


def evaluate_zero_shot_folder(embed_image: emb.EmbedFn, embed_text: emb.EmbedFn, folder: str,
                              split: str = "test", config=None, tokenizer=None, *,
                              templates: Optional[Sequence[str]] = None,
                              class_names: Optional[Sequence[str]] = None,
                              text_batch_size: int = 256, return_confusion: bool = False,
                              max_examples: Optional[int] = None) -> Dict[str, Any]:
    """Zero-shot evaluation of a label-as-text dataset folder (what ``kmm eval`` / the demo run).

    Class names come from ``classnames.txt`` and templates from ``templates_eval.txt`` (never
    used in training) unless given; the tokenizer is the folder's ``tokenizer.model`` unless
    given.

    Args:
      config: a ``keras_mm.pipelines.datasets.InputConfig`` (default: ``InputConfig()``).
    Returns:
      see :func:`evaluate_zero_shot`.
    """
    from keras_mm.pipelines import datasets

    config = config or datasets.InputConfig()
    tokenizer = tokenizer or datasets.load_tokenizer(folder, config)
    class_names = list(class_names) if class_names is not None else load_class_names(folder)
    templates = list(templates) if templates is not None else load_eval_templates(folder)
    classifier = build_zero_shot_classifier(embed_text, tokenizer, class_names, templates,
                                            text_batch_size)
    dataset = datasets.eval_dataset(folder, split, config, tokenizer)
    return evaluate_zero_shot(embed_image, classifier, dataset,
                              return_confusion=return_confusion, max_examples=max_examples)
