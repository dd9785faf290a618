"""Independent NumPy reference for the contrastive losses; writes contrastive.json next to this file.

Written from the papers' formulas in float64, without keras or keras_mm:

* SigLIP (Zhai et al. 2023, Eq. 1): L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)), t = exp(t'),
  z_ij = 1 if i == j else -1.
* CLIP (Radford et al. 2021, Fig. 3):
  L = 1/(2|B|) sum_i [-log softmax_j(s x_i.y_j)_i - log softmax_j(s y_i.x_j)_i], s = min(exp(log_scale), 100).

Besides the loss of the whole batch it stores, for several splits of the batch into replica row blocks,
each replica's share (the terms of its rows divided by |B|), the analytic gradients w.r.t. the embeddings
and the scalars, and the image->text top-1 hits.

Run: python tests/keras_mm/losses/golden/make_golden.py   (the inputs are float32-representable values)
"""

import json
import pathlib

import numpy as np

BATCH, DIM = 8, 16
SPLITS = [[8], [4, 4], [5, 3], [2, 2, 2, 2]]
# (t', b): the paper's init, keras-hub's init, another point
SIGMOID_PARAMS = [(float(np.log(10.0)), -10.0), (0.0, 0.0), (1.7, -3.5)]
SOFTMAX_LOG_SCALES = [float(np.log(1 / 0.07)), 0.5, float(np.log(200.0))]  # the last one is clipped at 100


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, DIM))
    y = x + 2.0 * rng.normal(size=(BATCH, DIM))  # correlated pairs: realistic losses, mixed top-1 hits
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    # Store float32 values; compute on them in float64.
    return x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)


def log_sigmoid(v):
    return -np.logaddexp(0.0, -v)


def sigmoid(v):
    return 0.5 * (1.0 + np.tanh(0.5 * v))


def sigmoid_reference(x, y, t_prime, b):
    n = x.shape[0]
    t = np.exp(t_prime)
    dots = x @ y.T
    logits = t * dots + b
    z = 2.0 * np.eye(n) - 1.0
    terms = -log_sigmoid(z * logits)  # [B, B]
    row_terms = terms.sum(axis=1)
    # d terms / d logits = -z sigmoid(-z logits)
    d_logits = -z * sigmoid(-z * logits) / n
    return {
        "loss": terms.sum() / n,
        "row_terms": row_terms,
        "grad_image": t * d_logits @ y,
        "grad_text": t * d_logits.T @ x,
        "grad_log_temperature": float(np.sum(d_logits * t * dots)),
        "grad_bias": float(np.sum(d_logits)),
    }


def softmax_rows(a):
    a = a - a.max(axis=1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax_rows(a):
    m = a.max(axis=1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=1, keepdims=True))


def softmax_reference(x, y, log_scale):
    n = x.shape[0]
    clipped = log_scale > np.log(100.0)
    s = min(np.exp(log_scale), 100.0)
    dots = x @ y.T  # [i, j] = x_i . y_j
    i2t = -np.diag(log_softmax_rows(s * dots))  # [B]
    t2i = -np.diag(log_softmax_rows(s * dots.T))  # [B]
    p, q = softmax_rows(s * dots), softmax_rows(s * dots.T)
    eye = np.eye(n)
    # dL/d(x_i . y_j) summed over both directions, times 1/(2B)
    d_dots = ((p - eye) + (q - eye).T) / (2 * n)
    d_scale = float(np.sum(d_dots * dots))
    return {
        "loss": (i2t.sum() + t2i.sum()) / (2 * n),
        "row_terms": (i2t + t2i) / 2.0,  # a replica's share: sum of its rows / B
        "grad_image": s * d_dots @ y,
        "grad_text": s * d_dots.T @ x,
        "grad_log_scale": 0.0 if clipped else s * d_scale,
    }


def shares(row_terms, split):
    n = len(row_terms)
    bounds = np.cumsum([0] + split)
    return [float(row_terms[a:c].sum() / n) for a, c in zip(bounds[:-1], bounds[1:])]


def tolist(v):
    return v.tolist() if isinstance(v, np.ndarray) else float(v)


def build():
    x, y = make_inputs()
    golden = {"image": x.tolist(), "text": y.tolist(), "splits": SPLITS, "sigmoid": [], "softmax": []}
    for t_prime, b in SIGMOID_PARAMS:
        ref = sigmoid_reference(x, y, t_prime, b)
        entry = {"log_temperature": t_prime, "bias": b}
        entry.update({k: tolist(v) for k, v in ref.items() if k != "row_terms"})
        entry["shares"] = [shares(ref["row_terms"], split) for split in SPLITS]
        golden["sigmoid"].append(entry)
    for log_scale in SOFTMAX_LOG_SCALES:
        ref = softmax_reference(x, y, log_scale)
        entry = {"log_scale": log_scale}
        entry.update({k: tolist(v) for k, v in ref.items() if k != "row_terms"})
        entry["shares"] = [shares(ref["row_terms"], split) for split in SPLITS]
        golden["softmax"].append(entry)
    golden["image_to_text_hits"] = (np.argmax(x @ y.T, axis=1) == np.arange(BATCH)).astype(float).tolist()
    golden["text_to_image_hits"] = (np.argmax(y @ x.T, axis=1) == np.arange(BATCH)).astype(float).tolist()
    return golden


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("contrastive.json")
    out.write_text(json.dumps(build(), indent=1) + "\n")
    print("wrote", out)
