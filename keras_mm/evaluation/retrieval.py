"""Image <-> text retrieval Recall@K, COCO protocol (several captions per image).

N images and M captions; caption j belongs to image ``text_to_image[j]``. Similarity is the
cosine of the embeddings.

True pairs (DESIGN.md, run summary contract: items sharing the identical text or image count as
true pairs). Images are grouped by ``image_keys`` (identical image content -> one group) and
captions by ``caption_strings`` (identical text -> one group); without keys every item is its own
group. Image i and caption j are a true pair iff some caption j' with the same text as j belongs to
some image i' identical to i. So a photo whose caption "a dog on a sofa" also describes another
photo counts as a hit when it retrieves the other photo's identical caption, and a duplicated image
is as good as the original.

Recall@K:
  image -> text: the fraction of images for which at least one true caption is among the K
    captions ranked highest (COCO: "any of its captions").
  text -> image: the fraction of captions for which a true image is among the K highest.
Ranking is a stable descending sort of the similarities: among equal similarities the lower
index ranks first (a collapsed model with all similarities equal does not score 1.0). With
K >= the number of candidates, Recall@K is 1.0.

The [N, M] similarity matrix is never held whole: queries are processed ``chunk_size`` at a time
(memory O(chunk_size * (N + M))), and the rank of a query's best true candidate is counted
directly instead of sorting.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

import numpy as np

from keras_mm.evaluation import embeddings as emb

DEFAULT_KS = (1, 5, 10)


def _group_ids(keys: Optional[Sequence[Any]], n: int, what: str) -> np.ndarray:
    """Keys [n] -> int64 group ids [n] (equal keys, equal ids); None -> every item its own."""
    if keys is None:
        return np.arange(n, dtype=np.int64)
    keys = list(keys)
    if len(keys) != n:
        raise ValueError(f"{what} has {len(keys)} entries, expected {n}")
    index: Dict[Any, int] = {}
    return np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)


def _best_true_rank(sims: np.ndarray, true: np.ndarray) -> np.ndarray:
    """0-based rank of each query's best-ranked true candidate.

    With a stable descending sort the best-ranked true candidate j* is the true candidate with the
    highest similarity (the lowest index among equals), and its rank is
    #{j : s_j > s_j*} + #{j < j* : s_j == s_j*}.

    Args:
      sims: float ``[Q, C]``; true: bool ``[Q, C]`` with at least one True a row.
    Returns:
      int64 ``[Q]``.
    """
    masked = np.where(true, sims, -np.inf)
    best = np.argmax(masked, axis=1)                                       # first max
    best_sim = sims[np.arange(sims.shape[0]), best][:, None]               # [Q, 1]
    higher = np.sum(sims > best_sim, axis=1)
    tied_before = np.sum((sims == best_sim) & (np.arange(sims.shape[1])[None, :] < best[:, None]),
                         axis=1)
    return (higher + tied_before).astype(np.int64)


def evaluate_retrieval(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray,
                       caption_strings: Optional[Sequence[Any]] = None,
                       image_keys: Optional[Sequence[Any]] = None, *,
                       ks: Sequence[int] = DEFAULT_KS,
                       chunk_size: int = 1024) -> Dict[str, Any]:
    """Image->text and text->image Recall@K.

    Args:
      image_emb: ``[N, D]``; text_emb: ``[M, D]`` (any norm: compared by cosine).
      text_to_image: int ``[M]``, the index in ``[0, N)`` of the image each caption belongs to.
      caption_strings: ``[M]`` hashable keys (str, bytes, token-id bytes) of the captions;
        identical keys are the identical text. None: no two captions are identical.
      image_keys: ``[N]`` hashable keys of the images (ids of the source image, content hashes);
        None: no two images are identical.
      ks: the K of Recall@K.
      chunk_size: queries per similarity block.

    Returns:
      ``{"retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_i2t_r10", "retrieval_t2i_r1",
      "retrieval_t2i_r5", "retrieval_t2i_r10"`` (one pair per K, floats in [0, 1]),
      ``"num_images": N, "num_texts": M}``.

    Raises:
      ValueError: bad shapes, non-finite embeddings, an owner index out of range, or an image
        with no true caption at all.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    owner = np.asarray(text_to_image).astype(np.int64).reshape(-1)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"image [N, D] and text [M, D] embeddings must share D, got "
                         f"{image_emb.shape} and {text_emb.shape}")
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if owner.shape[0] != m:
        raise ValueError(f"text_to_image has {owner.shape[0]} entries for {m} captions")
    if owner.min() < 0 or owner.max() >= n:
        raise ValueError(f"text_to_image must index the {n} images, got range "
                         f"[{owner.min()}, {owner.max()}]")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    emb.check_finite(image_emb, "image embeddings")
    emb.check_finite(text_emb, "text embeddings")

    from scipy import sparse

    image_group = _group_ids(image_keys, n, "image_keys")                  # [N]
    text_group = _group_ids(caption_strings, m, "caption_strings")         # [M]
    num_ig, num_tg = int(image_group.max()) + 1, int(text_group.max()) + 1
    # pairs[a, b]: image group a owns a caption of text group b.
    pairs = sparse.csr_matrix((np.ones(m, np.int8), (image_group[owner], text_group)),
                              shape=(num_ig, num_tg))
    pairs_t = pairs.T.tocsr()

    images = emb.l2_normalize(image_emb)
    texts = emb.l2_normalize(text_emb)

    i2t_rank = np.empty(n, np.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        true = pairs[image_group[start:stop]].toarray()[:, text_group] > 0    # [C, M]
        lonely = np.nonzero(~true.any(axis=1))[0]
        if lonely.size:
            raise ValueError(f"image {start + lonely[0]} has no caption (no true pair); every "
                             "image needs at least one caption")
        i2t_rank[start:stop] = _best_true_rank(images[start:stop] @ texts.T, true)

    t2i_rank = np.empty(m, np.int64)
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        true = pairs_t[text_group[start:stop]].toarray()[:, image_group] > 0  # [C, N]
        t2i_rank[start:stop] = _best_true_rank(texts[start:stop] @ images.T, true)

    out: Dict[str, Any] = {}
    for k in ks:
        out[f"retrieval_i2t_r{k}"] = float(np.mean(i2t_rank < k))
    for k in ks:
        out[f"retrieval_t2i_r{k}"] = float(np.mean(t2i_rank < k))
    out["num_images"] = int(n)
    out["num_texts"] = int(m)
    return out


def evaluate_retrieval_dataset(embed_image: emb.EmbedFn, embed_text: emb.EmbedFn, dataset, *,
                               dedupe_texts: bool = True, dedupe_images: bool = True,
                               ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 1024,
                               max_examples: Optional[int] = None) -> Dict[str, Any]:
    """Retrieval over an eval dataset built with ``InputConfig(eval_texts="all")``.

    Every present caption of every image is a text query and a candidate. Identical captions are
    detected by their token ids (:func:`~keras_mm.evaluation.embeddings.token_key`: the same
    text after the tokenizer's normalisation and truncation, i.e. the same model input) and
    identical images by a hash of their preprocessed pixels
    (:func:`~keras_mm.evaluation.embeddings.image_key`).

    Args:
      embed_image, embed_text: the frozen towers (see :mod:`~keras_mm.evaluation.embeddings`).
      dataset: batches with ``image``, ``id``, ``texts`` ``[B, K, L]`` and ``num_texts``.
      dedupe_texts, dedupe_images: count identical captions / images as true pairs.
      ks, chunk_size: see :func:`evaluate_retrieval`.
      max_examples: only the first images (None: all).

    Returns:
      see :func:`evaluate_retrieval`.
    """
    data = emb.embed_dataset(embed_image, _require_all_texts(dataset), embed_text=embed_text,
                             max_examples=max_examples)
    return evaluate_retrieval(data["image_emb"], data["text_emb"], data["text_to_image"],
                              caption_strings=data["text_keys"] if dedupe_texts else None,
                              image_keys=data["image_keys"] if dedupe_images else None,
                              ks=ks, chunk_size=chunk_size)


def _require_all_texts(dataset):
    for batch in dataset:
        if "texts" not in batch or "num_texts" not in batch:
            raise ValueError("retrieval needs every caption of each image: build the eval "
                             "dataset with InputConfig(eval_texts='all')")
        yield batch


def evaluate_retrieval_folder(embed_image: emb.EmbedFn, embed_text: emb.EmbedFn, folder: str,
                              split: str = "test", config=None, tokenizer=None,
                              **kwargs) -> Dict[str, Any]:
    """Retrieval on a dataset folder's split; ``config.eval_texts`` is forced to ``"all"``
    (``config.eval_max_texts`` captions per image at most). ``kwargs`` go to
    :func:`evaluate_retrieval_dataset`."""
    from keras_mm.pipelines import datasets

    config = dataclasses.replace(config or datasets.InputConfig(), eval_texts="all")
    tokenizer = tokenizer or datasets.load_tokenizer(folder, config)
    dataset = datasets.eval_dataset(folder, split, config, tokenizer)
    return evaluate_retrieval_dataset(embed_image, embed_text, dataset, **kwargs)
