"""Batched embedding of eval datasets and of strings, with frozen embedding functions.

The evaluators take two plain callables (a two-tower model's methods, an export's signatures,
anything):

  embed_image(images float32 [B, S, S, 3]) -> [B, D]
  embed_text(token_ids int32 [B, L]) -> [B, D]

They get NumPy arrays and may return NumPy arrays or tensors of any backend; results are collected
as float32 NumPy arrays in the order the dataset yields its examples (``eval_dataset`` is
deterministic: shards sorted, records in file order), so two runs give identical arrays.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np

EmbedFn = Callable[[np.ndarray], Any]


def to_numpy(x) -> np.ndarray:
    """A tensor of any backend (or array-like) -> NumPy array."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):                      # tf.Tensor, torch (cpu)
        return np.asarray(x.numpy())
    try:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(x))
    except Exception:                            # pragma: no cover - plain sequences
        return np.asarray(x)


def _call(embed_fn: EmbedFn, inputs: np.ndarray, what: str) -> np.ndarray:
    out = to_numpy(embed_fn(inputs)).astype(np.float32, copy=False)
    if out.ndim != 2 or out.shape[0] != inputs.shape[0]:
        raise ValueError(f"{what} must return [batch, dim] = [{inputs.shape[0]}, D] for inputs of "
                         f"shape {tuple(inputs.shape)}, got shape {tuple(out.shape)}")
    return out


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """x / max(||x||, eps) along ``axis`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def check_finite(x: np.ndarray, what: str) -> None:
    """Raises ValueError when ``x`` holds NaN or inf (they would silently win every ranking)."""
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ValueError(f"{what} holds {bad} non-finite values (NaN/inf); cannot evaluate")


def image_key(image: np.ndarray) -> str:
    """Content key of one preprocessed image: SHA-1 of its float32 pixels (identical images ->
    identical keys)."""
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()


def token_key(ids: np.ndarray) -> bytes:
    """Content key of one caption: its token ids as bytes. Two captions share a key iff the model
    sees the same ids (identical after the tokenizer's normalisation and truncation to L)."""
    return np.ascontiguousarray(ids, dtype=np.int32).tobytes()


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values],
                    dtype=object)


def embed_dataset(embed_image: EmbedFn, dataset: Iterable[Dict[str, Any]], *,
                  embed_text: Optional[EmbedFn] = None,
                  max_examples: Optional[int] = None) -> Dict[str, Any]:
    """Embeds every example of an eval dataset, in the order it yields them.

    Args:
      embed_image: images float32 ``[B, S, S, 3]`` -> ``[B, D]``.
      dataset: an iterable of batches as ``keras_mm.pipelines.datasets.eval_dataset`` yields them:
        ``{"image": [B, S, S, 3], "id": string [B], ("label": int [B]), ("text": int [B, L]),
        ("texts": int [B, K, L], "num_texts": int [B])}`` (tensors or arrays).
      embed_text: token ids int32 ``[B', L]`` -> ``[B', D]``; when given, captions are embedded
        too: every present caption of ``texts`` (``eval_texts="all"``), else the one ``text``.
      max_examples: stop after this many examples (None: all).

    Returns:
      dict with
        ``image_emb``: float32 ``[N, D]`` (as returned by embed_image, not re-normalised),
        ``ids``: object ``[N]`` of str, ``image_keys``: object ``[N]`` of str (SHA-1 of the
        preprocessed pixels, see :func:`image_key`), ``labels``: int64 ``[N]`` or None when the
        dataset has no label;
      and with ``embed_text``:
        ``text_emb``: float32 ``[M, D]``, ``text_to_image``: int64 ``[M]`` (index of the image
        each caption belongs to, non-decreasing), ``text_keys``: object ``[M]`` of bytes (see
        :func:`token_key`).

    Raises:
      ValueError: an empty dataset, a batch without ``image``/``id``, or embeddings of the wrong
        shape.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    image_embs, ids, keys, labels = [], [], [], []
    text_embs, text_owner, text_keys = [], [], []
    has_label = None
    seen = 0
    for batch in dataset:
        if "image" not in batch or "id" not in batch:
            raise ValueError(f"eval batches need 'image' and 'id', got keys {sorted(batch)}")
        images = to_numpy(batch["image"]).astype(np.float32, copy=False)       # [B, S, S, 3]
        take = images.shape[0]
        if max_examples is not None:
            take = min(take, max_examples - seen)
        images = images[:take]
        image_embs.append(_call(embed_image, images, "embed_image"))
        ids.append(_decode(to_numpy(batch["id"])[:take]))
        keys.extend(image_key(im) for im in images)
        batch_has_label = "label" in batch
        if has_label is None:
            has_label = batch_has_label
        elif has_label != batch_has_label:
            raise ValueError("some batches have 'label' and others not")
        if has_label:
            labels.append(to_numpy(batch["label"])[:take].astype(np.int64))
        if embed_text is not None:
            owners, rows = _caption_rows(batch, take)
            if rows.shape[0]:
                text_embs.append(_call(embed_text, rows, "embed_text"))
                text_owner.append(owners + seen)
                text_keys.extend(token_key(r) for r in rows)
        seen += take
        if max_examples is not None and seen >= max_examples:
            break
    if seen == 0:
        raise ValueError("the dataset yielded no example")
    out = {
        "image_emb": np.concatenate(image_embs, axis=0),
        "ids": np.concatenate(ids, axis=0),
        "image_keys": np.array(keys, dtype=object),
        "labels": np.concatenate(labels, axis=0) if has_label else None,
    }
    if embed_text is not None:
        if not text_embs:
            raise ValueError("the dataset yielded no caption")
        out["text_emb"] = np.concatenate(text_embs, axis=0)
        out["text_to_image"] = np.concatenate(text_owner, axis=0).astype(np.int64)
        out["text_keys"] = np.array(text_keys, dtype=object)
    return out


def _caption_rows(batch: Dict[str, Any], take: int):
    """-> (owner index within the batch int64 [M_b], token ids int32 [M_b, L]) of the captions
    present in the first ``take`` examples of ``batch``."""
    if "texts" in batch:
        texts = to_numpy(batch["texts"])[:take].astype(np.int32, copy=False)     # [B, K, L]
        if "num_texts" in batch:
            num = to_numpy(batch["num_texts"])[:take].astype(np.int64)           # [B]
        else:
            num = np.full([texts.shape[0]], texts.shape[1], np.int64)
        k = texts.shape[1]
        present = np.arange(k)[None, :] < num[:, None]                          # [B, K]
        owners = np.nonzero(present)[0].astype(np.int64)
        return owners, texts[present]
    if "text" in batch:
        text = to_numpy(batch["text"])[:take].astype(np.int32, copy=False)       # [B, L]
        return np.arange(text.shape[0], dtype=np.int64), text
    raise ValueError("embedding captions needs 'text' or 'texts' in the batches")


def tokenize(tokenizer: Any, strings: Sequence[str]) -> np.ndarray:
    """Strings ``[N]`` -> int32 ``[N, L]`` with a :class:`~keras_mm.pipelines.tokenizer.Tokenizer`
    (its ``tokenize`` method) or any callable doing the same."""
    fn = tokenizer.tokenize if hasattr(tokenizer, "tokenize") else tokenizer
    ids = to_numpy(fn(list(strings)))
    if ids.ndim != 2 or ids.shape[0] != len(strings):
        raise ValueError(f"the tokenizer must map {len(strings)} strings to [N, L] ids, got "
                         f"shape {tuple(ids.shape)}")
    return ids.astype(np.int32, copy=False)


def embed_texts(embed_text: EmbedFn, tokenizer: Any, strings: Sequence[str],
                batch_size: int = 256) -> np.ndarray:
    """Tokenizes and embeds strings, ``batch_size`` at a time.

    Args:
      embed_text: token ids int32 ``[B, L]`` -> ``[B, D]``.
      tokenizer: a ``Tokenizer`` (``tokenize(strings [N]) -> int32 [N, L]``) or such a callable.
      strings: the texts, used as given.
      batch_size: strings per call (the last call may be smaller).

    Returns:
      float32 ``[len(strings), D]`` in the order of ``strings`` (not re-normalised).
    """
    strings = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in strings]
    if not strings:
        raise ValueError("embed_texts needs at least one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(strings), batch_size):
        ids = tokenize(tokenizer, strings[start:start + batch_size])
        out.append(_call(embed_text, ids, "embed_text"))
    return np.concatenate(out, axis=0)
