"""Linear probe and few-shot classification on frozen embeddings.

Linear probe (CLIP, Radford et al. 2021, Sec. 3.2 / App. A.3): multinomial L2-regularised logistic
regression fitted with L-BFGS (scikit-learn's ``LogisticRegression``) on the training embeddings;
the inverse regularisation strength C is swept over a log grid and chosen on the validation split,
then the chosen model is scored on the test split.

Few-shot (big_vision's ``fewshot_lsr`` evaluator, Zhai et al. / Dosovitskiy et al. 2021): k
training examples per class, features standardised with the k-shot sample's mean and std, a
constant bias feature of 100 appended (large, so the bias is almost unregularised), targets
one-hot in {-1, 1}, and ridge regression in closed form,

    W = (Z^T Z + l2 I)^-1 Z^T T   [D + 1, K]   (= Z^T (Z Z^T + l2 I)^-1 T when N < D + 1),

computed through one eigendecomposition so a whole grid of l2 costs one factorisation. The
prediction is argmax(Z W). l2 is chosen on the validation split, or when none is given on the
training examples left out of the k-shot sample (never on the test split).

Metric names: ``{prefix}_top1`` (linear probe; ``prefix="motion_probe"`` gives the summary
contract's ``motion_probe_top1``) and ``{prefix}_{k}shot_top1`` (few-shot). Accuracies are
fractions in [0, 1].
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from keras_mm.evaluation import embeddings as emb

DEFAULT_C_VALUES = tuple(10.0 ** e for e in range(-3, 5))          # 1e-3 ... 1e4
DEFAULT_L2_REGS = tuple(2.0 ** e for e in range(-10, 20))           # big_vision's grid
DEFAULT_SHOTS = (1, 5, 10, 25)
BIAS_FEATURE = 100.0
STD_EPS = 1e-5


def _xy(x, y, what: str):
    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{what}: features [N, D] and labels [N] with N > 0 needed, got "
                         f"{x.shape} and {y.shape}")
    emb.check_finite(x, f"{what} features")
    if y.min() < 0:
        raise ValueError(f"{what}: labels must be >= 0")
    return x, y


# ------------------------------------------------------------------------------ linear probe


def linear_probe(train_x, train_y, val_x, val_y, test_x, test_y, *,
                 c_values: Sequence[float] = DEFAULT_C_VALUES, max_iter: int = 1000,
                 refit_on_train_and_val: bool = False,
                 prefix: str = "linear_probe") -> Dict[str, Any]:
    """Multinomial logistic regression probe with C chosen on the validation split.

    Args:
      train_x, val_x, test_x: embeddings ``[N_*, D]``; train_y, val_y, test_y: int labels.
      c_values: grid of scikit-learn's C (inverse L2 strength); ties go to the smaller C.
      max_iter: L-BFGS iterations.
      refit_on_train_and_val: refit at the chosen C on train + validation before testing.
      prefix: metric name prefix.

    Returns:
      ``{f"{prefix}_top1": test accuracy, f"{prefix}_val_top1": validation accuracy at the chosen
      C, f"{prefix}_c": the chosen C, "num_train", "num_test"}``.
    """
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = _xy(train_x, train_y, "train")
    val_x, val_y = _xy(val_x, val_y, "validation")
    test_x, test_y = _xy(test_x, test_y, "test")
    if np.unique(train_y).size < 2:
        raise ValueError("the linear probe needs at least two classes in the training split")
    c_values = sorted(float(c) for c in c_values)
    if not c_values or c_values[0] <= 0:
        raise ValueError(f"c_values must be positive, got {c_values}")

    def fit(x, y, c):
        return LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs").fit(x, y)

    best_c, best_val, best_model = None, -1.0, None
    for c in c_values:
        model = fit(train_x, train_y, c)
        accuracy = float(np.mean(model.predict(val_x) == val_y))
        if accuracy > best_val:
            best_c, best_val, best_model = c, accuracy, model
    if refit_on_train_and_val:
        best_model = fit(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]),
                         best_c)
    return {
        f"{prefix}_top1": float(np.mean(best_model.predict(test_x) == test_y)),
        f"{prefix}_val_top1": best_val,
        f"{prefix}_c": best_c,
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
    }


# ------------------------------------------------------------------------------ few-shot


def ridge_weights(z, targets, l2_regs: Sequence[float]) -> np.ndarray:
    """Closed-form ridge regression for several regularisation strengths.

    Solves ``min_W ||Z W - T||^2 + l2 ||W||^2`` for each l2:
    ``W = (Z^T Z + l2 I)^-1 Z^T T`` (N >= D) or ``Z^T (Z Z^T + l2 I)^-1 T`` (N < D), both through
    one symmetric eigendecomposition.

    Args:
      z: design matrix ``[N, D]``; targets: ``[N, K]``; l2_regs: positive strengths ``[R]``.
    Returns:
      float64 ``[R, D, K]``.
    """
    z = np.asarray(z, np.float64)
    targets = np.asarray(targets, np.float64)
    l2 = np.asarray(l2_regs, np.float64).reshape(-1)
    if l2.size == 0 or np.any(l2 <= 0):
        raise ValueError(f"l2_regs must be positive, got {l2_regs}")
    n, d = z.shape
    if n >= d:
        eigs, q = np.linalg.eigh(z.T @ z)                   # [D], [D, D]
        left, right = q, q.T @ (z.T @ targets)              # [D, D], [D, K]
    else:
        eigs, q = np.linalg.eigh(z @ z.T)                   # [N], [N, N]
        left, right = z.T @ q, q.T @ targets                # [D, N], [N, K]
    return np.stack([(left / (eigs + reg)[None, :]) @ right for reg in l2])   # [R, D, K]


def _standardizer(x: np.ndarray):
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + STD_EPS

    def apply(v):
        z = (v - mean) / std
        return np.concatenate([z, np.full([z.shape[0], 1], BIAS_FEATURE)], axis=1)

    return apply


def ridge_classifier_accuracies(train_x, train_y, eval_x, eval_y, num_classes: int,
                                l2_regs: Sequence[float]) -> np.ndarray:
    """Accuracy on ``eval`` of big_vision's least-squares classifier fitted on ``train``, per l2.

    Returns:
      float64 ``[len(l2_regs)]``.
    """
    features = _standardizer(train_x)
    targets = 2.0 * np.eye(num_classes)[train_y] - 1.0                 # [N, K] in {-1, 1}
    weights = ridge_weights(features(train_x), targets, l2_regs)        # [R, D + 1, K]
    logits = np.einsum("nd,rdk->rnk", features(eval_x), weights)         # [R, N_eval, K]
    return np.mean(np.argmax(logits, axis=2) == eval_y[None, :], axis=1)


def sample_shots(labels: np.ndarray, shots: int, num_classes: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Indices of ``shots`` examples of every class (without replacement), sorted."""
    picked = []
    for c in range(num_classes):
        members = np.nonzero(labels == c)[0]
        if members.size < shots:
            raise ValueError(f"class {c} has {members.size} training examples, fewer than "
                             f"{shots} shots")
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def few_shot(train_x, train_y, test_x, test_y, *, shots: Sequence[int] = DEFAULT_SHOTS,
             l2_regs: Sequence[float] = DEFAULT_L2_REGS, val_x=None, val_y=None,
             num_classes: Optional[int] = None, repeats: int = 1, seed: int = 0,
             prefix: str = "few_shot") -> Dict[str, Any]:
    """big_vision-style k-shot linear classification by closed-form ridge regression.

    For each k in ``shots`` and each of ``repeats`` draws of k examples per class: fit for every
    l2 in ``l2_regs``, score on the selection split (``val_x``/``val_y`` if given, else the
    training examples not drawn) and on the test split. The l2 with the best selection accuracy
    averaged over draws is kept (ties: the smaller l2); its mean test accuracy is reported.

    Returns:
      ``{f"{prefix}_{k}shot_top1": test accuracy, f"{prefix}_{k}shot_l2": chosen l2}`` per k.
    """
    train_x, train_y = _xy(train_x, train_y, "train")
    test_x, test_y = _xy(test_x, test_y, "test")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is not None:
        val_x, val_y = _xy(val_x, val_y, "validation")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if test_y.max() >= num_classes or train_y.max() >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    l2_regs = sorted(float(v) for v in l2_regs)
    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {}
    for k in shots:
        k = int(k)
        if k < 1:
            raise ValueError(f"shots must be >= 1, got {k}")
        select_acc, test_acc = [], []
        for _ in range(repeats):
            chosen = sample_shots(train_y, k, num_classes, rng)
            if val_x is not None:
                sel_x, sel_y = val_x, val_y
            else:
                rest = np.setdiff1d(np.arange(train_y.shape[0]), chosen)
                if rest.size == 0 and len(l2_regs) > 1:
                    raise ValueError(f"{k}-shot: no training example is left to choose l2 on; "
                                     "pass val_x/val_y or a single l2")
                sel_x, sel_y = (train_x[rest], train_y[rest]) if rest.size else (None, None)
            x, y = train_x[chosen], train_y[chosen]
            if sel_x is not None:
                select_acc.append(ridge_classifier_accuracies(x, y, sel_x, sel_y, num_classes,
                                                              l2_regs))
            else:
                select_acc.append(np.zeros(len(l2_regs)))
            test_acc.append(ridge_classifier_accuracies(x, y, test_x, test_y, num_classes,
                                                        l2_regs))
        best = int(np.argmax(np.mean(select_acc, axis=0)))               # first max = smaller l2
        out[f"{prefix}_{k}shot_top1"] = float(np.mean(test_acc, axis=0)[best])
        out[f"{prefix}_{k}shot_l2"] = l2_regs[best]
    return out


# ------------------------------------------------------------------------------ dataset drivers


def _embedded(embed_image, dataset, what: str):
    data = emb.embed_dataset(embed_image, dataset)
    if data["labels"] is None:
        raise ValueError(f"the {what} dataset has no 'label': probes need a labelled dataset")
    return data["image_emb"], data["labels"]


def evaluate_linear_probe(embed_image: emb.EmbedFn, train_dataset, val_dataset, test_dataset,
                          **kwargs) -> Dict[str, Any]:
    """Embeds three labelled eval datasets and runs :func:`linear_probe` (``kwargs`` go there)."""
    train = _embedded(embed_image, train_dataset, "train")
    val = _embedded(embed_image, val_dataset, "validation")
    test = _embedded(embed_image, test_dataset, "test")
    return linear_probe(*train, *val, *test, **kwargs)


def evaluate_few_shot(embed_image: emb.EmbedFn, train_dataset, test_dataset, val_dataset=None,
                      **kwargs) -> Dict[str, Any]:
    """Embeds labelled eval datasets and runs :func:`few_shot` (``kwargs`` go there)."""
    train_x, train_y = _embedded(embed_image, train_dataset, "train")
    test_x, test_y = _embedded(embed_image, test_dataset, "test")
    if val_dataset is not None:
        kwargs["val_x"], kwargs["val_y"] = _embedded(embed_image, val_dataset, "validation")
    return few_shot(train_x, train_y, test_x, test_y, **kwargs)
