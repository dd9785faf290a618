"""Label differential privacy for label-as-text: randomized response, optionally with a prior.

From "Deep Learning with Label Differential Privacy" (Ghazi et al., NeurIPS 2021; seed 000):
inputs are public, only training labels are private. Randomized response (RR) replaces the
label ``y`` of each training example by a random one so that for every output ``o`` and labels
``y, y'``: ``P(o | y) <= e^eps * P(o | y')`` (eps-LabelDP). RR-with-prior uses a prior over
classes for the (public) input to sample only among likely classes:

    sort classes by prior, descending; for k = 1..K:  w_k = sum of the top-k priors
    k* = argmax_k  w_k * e^eps / (e^eps + k - 1);     Y_k* = the top-k* classes
    if y in Y_k*:  P(o = y) = e^eps / (e^eps + k* - 1),  P(o = y') = 1 / (e^eps + k* - 1) (y' in Y_k*, y' != y)
    else:          o uniform over Y_k*

With a uniform prior k* = K and this is classical K-ary RR. Randomness here is a deterministic
function of (seed, example id), so a job re-run (or a retried Beam bundle) draws the same labels.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np


def top_k_set(prior: Sequence[float], epsilon: float) -> np.ndarray:
    """The classes RR-with-prior samples from (``Y_k*``), best prior first. Shape ``[k*]``."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.ndim != 1 or prior.size < 2 or np.any(prior < 0) or prior.sum() <= 0:
        raise ValueError(f"prior must be a non-negative vector over >= 2 classes, got {prior}")
    prior = prior / prior.sum()
    order = np.argsort(-prior, kind="stable")
    k = np.arange(1, prior.size + 1)
    e = math.exp(min(epsilon, 700.0))
    scores = np.cumsum(prior[order]) * e / (e + k - 1)
    k_star = int(np.argmax(scores)) + 1  # first maximum: the smallest best set
    return order[:k_star]


def output_distribution(label: int, prior: Sequence[float], epsilon: float) -> np.ndarray:
    """``P(o | y = label)`` over all K classes, shape ``[K]``."""
    if epsilon <= 0:
        raise ValueError("epsilon must be > 0")
    prior = np.asarray(prior, dtype=np.float64)
    chosen = top_k_set(prior, epsilon)
    dist = np.zeros(prior.size)
    if label in chosen:
        e = math.exp(min(epsilon, 700.0))
        dist[chosen] = 1.0 / (e + len(chosen) - 1)
        dist[label] = e / (e + len(chosen) - 1)
    else:
        dist[chosen] = 1.0 / len(chosen)
    return dist


def unit_random(example_id: str, seed: int) -> float:
    """A deterministic uniform number in [0, 1) for (seed, id)."""
    digest = hashlib.sha256(f"labeldp:{seed}:{example_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def randomize_label(label: int, num_classes: int, epsilon: float, example_id: str, seed: int,
                    prior: Optional[Sequence[float]] = None) -> int:
    """One draw of RR(-with-prior) for an example; a uniform prior when ``prior`` is None."""
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside [0, {num_classes})")
    prior = np.ones(num_classes) if prior is None else np.asarray(prior, dtype=np.float64)
    if prior.size != num_classes:
        raise ValueError(f"prior has {prior.size} entries for {num_classes} classes")
    cdf = np.cumsum(output_distribution(label, prior, epsilon))
    u = unit_random(example_id, seed) * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), num_classes - 1))
