"""Known embedding functions and hand-made eval batches for the evaluation tests."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


class PromptTable:
    """A tokenizer + text tower with known outputs: prompt string -> one id -> a given vector.

    ``tokenize(strings [N]) -> int32 [N, 2]`` (id of the string, then an EOS-like 2; unknown strings
    raise), ``embed_text(ids [N, 2]) -> vectors[ids[:, 0]]``.
    """

    def __init__(self, vectors: Dict[str, np.ndarray]):
        self.strings = list(vectors)
        self.index = {s: i for i, s in enumerate(self.strings)}
        self.table = np.stack([np.asarray(vectors[s], np.float32) for s in self.strings])
        self.calls: List[int] = []

    def tokenize(self, strings: Sequence[str]) -> np.ndarray:
        return np.array([[self.index[s], 2] for s in strings], np.int32)

    def embed_text(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        self.calls.append(ids.shape[0])
        return self.table[ids[:, 0]]


def batches(images: np.ndarray, ids: Sequence[str], batch_size: int, **extra) -> List[dict]:
    """Splits arrays into eval-style batches (the last one smaller)."""
    out = []
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        batch = {"image": images[start:stop],
                 "id": np.array([s.encode() for s in ids[start:stop]], dtype=object)}
        for key, value in extra.items():
            batch[key] = value[start:stop]
        out.append(batch)
    return out


def index_embedder(vectors: np.ndarray):
    """embed_image returning ``vectors[i]`` for an image whose first pixel holds i."""

    def embed(batch):
        return vectors[np.asarray(batch)[:, 0, 0, 0].astype(np.int64)]

    return embed


def images_with_index(n: int, size: int = 2) -> np.ndarray:
    """n images [n, size, size, 3] whose first pixel holds their index."""
    images = np.zeros([n, size, size, 3], np.float32)
    images[:, 0, 0, 0] = np.arange(n)
    return images
