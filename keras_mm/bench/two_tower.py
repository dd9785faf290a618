"""``kmm bench two-tower``: our SigLIP two-tower train step against keras-hub's SigLIPBackbone.

Both models get the same sizes (image size, patch, width, depth, heads, MLP dim, vocabulary,
sequence length, embedding width), the same AdamW (lr 1e-3, weight decay 1e-4), the same batch
of random inputs (images float32 in [-1, 1], token ids in [4, V) ending in an EOS id), the same
dtype policy and the same ``jit_compile`` setting, and the same sigmoid loss (ours: the
global-batch SigLIP loss; keras-hub: its own ``compute_loss`` with ``SigLIPLoss``).

Timing: ``model.train_on_batch`` in a loop for both models (the batch already a tensor on the
device, the step's logs read back so the step has finished), after ``--warmup`` untimed steps
per model (compilation excluded). The two models alternate step by step (A, B, A, B, ...) so that
other load on the machine hits both alike; each figure is the median step time.

MFU (only on a GPU with the JAX backend, else null): model FLOPs per example over the peak of
the card (``PEAK_TFLOPS``). Training FLOPs per example are estimated analytically as
3 x forward (forward + two backward matmuls), forward = 2 x multiply-adds:

    per tower:  6 * P_matmul * n  +  12 * depth * n^2 * width
        P_matmul = depth * (4 width^2 + 2 width mlp)        (QKV + output, MLP in + out)
        n        = tokens (patches or text tokens); 12 n^2 width per layer is 3 x (2 n^2 width
                   for Q K^T + 2 n^2 width for A V)
    image only: + 6 * (patch^2 * 3 * width) * n              (patch embedding)
                + 6 * (2 width^2 * n + 2 width^2 + 2 width mlp) + 12 * n * width
                                                            (MAP head: K/V over n tokens, Q and
                                                             out and MLP on the one probe)
    text only:  + 6 * width * embed_dim                      (projection of the pooled token)

Embedding lookups, layer norms, softmaxes, GELUs and the B x B logits are left out (they are
under 1% at b16).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Dict, Optional, Sequence

from keras_mm.beam_jobs import job_flags

PRESETS = ("tiny", "s16", "b16", "l16")

# Dense peak TFLOP/s by (card name substring, compute dtype); first match wins.
PEAK_TFLOPS = (
    ("H200", "bfloat16", 989.0), ("H200", "float32", 67.0),
    ("H100 PCIe", "bfloat16", 756.0), ("H100 PCIe", "float32", 51.0),
    ("H100", "bfloat16", 989.0), ("H100", "float32", 67.0),
    ("A100", "bfloat16", 312.0), ("A100", "float32", 19.5),
)

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
EOS_ID = 1  # any id outside [4, V) works as the end marker; 1 is the tokenizer job's EOS


def _bool_or_auto(value: str):
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"expected true, false or auto, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench two-tower", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default 64 for tiny, 8 otherwise")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit_compile", type=_bool_or_auto, default="auto",
                        help="true, false or auto (Keras' default)")
    parser.add_argument("--loss", default="sigmoid", choices=("sigmoid",))
    parser.add_argument("--skip_keras_hub", action="store_true", help="only time our model")
    parser.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("size overrides (applied to both models and both towers)")
    for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim",
                 "vocab_size", "max_len"):
        g.add_argument(f"--{name}", type=int, default=None)
    return parser


def resolve_sizes(args) -> Dict:
    """The preset's sizes with the overrides applied: one dict for both models."""
    from keras_mm.encoders import presets

    cfg = presets.two_tower_config(args.preset, style="siglip")
    img, txt = cfg["image"], cfg["text"]
    sizes = dict(image_size=img["image_size"], patch_size=img["patch_size"],
                 width=img["width"], depth=img["depth"], heads=img["heads"],
                 mlp_dim=img["mlp_dim"], vocab_size=txt["vocab_size"], max_len=txt["max_len"],
                 embed_dim=cfg["embed_dim"])
    for k in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "vocab_size",
              "max_len"):
        v = getattr(args, k)
        if v is not None:
            sizes[k] = int(v)
    if args.width is not None:
        sizes["embed_dim"] = sizes["width"]
    return sizes


def build_ours(s: Dict):
    from keras_mm.models.two_tower import build_two_tower

    shared = dict(width=s["width"], depth=s["depth"], heads=s["heads"], mlp_dim=s["mlp_dim"])
    image = dict(shared, image_size=s["image_size"], patch_size=s["patch_size"])
    if s["embed_dim"] != s["width"]:
        image["output_dim"] = s["embed_dim"]
    text = dict(shared, output_dim=s["embed_dim"])
    # preset is a name only here; every size is given explicitly so overrides reach both towers
    return build_two_tower(s["preset"], "sigmoid", vocab_size=s["vocab_size"],
                           max_len=s["max_len"], image_overrides=image, text_overrides=text)


def build_keras_hub(s: Dict):
    import keras_hub

    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=s["patch_size"], hidden_dim=s["width"], num_layers=s["depth"],
        num_heads=s["heads"], intermediate_dim=s["mlp_dim"],
        image_shape=(s["image_size"], s["image_size"], 3), name="vision_encoder")
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=s["vocab_size"], embedding_dim=s["width"], hidden_dim=s["width"],
        num_layers=s["depth"], num_heads=s["heads"], intermediate_dim=s["mlp_dim"],
        max_sequence_length=s["max_len"], projection_dim=s["embed_dim"], name="text_encoder")
    return keras_hub.models.SigLIPBackbone(vision_encoder=vision, text_encoder=text)


def _siglip_loss():
    try:
        from keras_hub.src.models.siglip.siglip_loss import SigLIPLoss
        return SigLIPLoss()
    except ImportError:  # pragma: no cover - older keras-hub: the same formula
        import keras
        from keras import ops

        class _SigmoidLoss(keras.losses.Loss):
            def call(self, y_true, y_pred):
                y_true = ops.cast(y_true, y_pred.dtype)
                return -ops.sum(ops.log_sigmoid(y_true * y_pred), axis=-1)

        return _SigmoidLoss()


def random_batch(s: Dict, batch_size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, (batch_size, s["image_size"], s["image_size"], 3))
    tokens = rng.integers(4, s["vocab_size"], (batch_size, s["max_len"]))
    tokens[:, -1] = EOS_ID
    return images.astype("float32"), tokens.astype("int32")


def count_params(model) -> int:
    """Trainable parameters."""
    return int(sum(_size(w) for w in model.trainable_weights))


def _size(w):
    n = 1
    for d in w.shape:
        n *= int(d)
    return n


def train_flops_per_example(s: Dict) -> float:
    """Analytical training FLOPs per example (see the module docstring)."""
    w, m, depth = s["width"], s["mlp_dim"], s["depth"]
    n_img = (s["image_size"] // s["patch_size"]) ** 2
    n_txt = s["max_len"]
    p_layer = 4 * w * w + 2 * w * m

    def tower(n):
        return 6 * depth * p_layer * n + 12 * depth * n * n * w

    image = (tower(n_img) + 6 * s["patch_size"] ** 2 * 3 * w * n_img
             + 6 * (2 * w * w * n_img + 2 * w * w + 2 * w * m) + 12 * n_img * w)
    text = tower(n_txt) + 6 * w * s["embed_dim"]
    return float(image + text)


def device_info():
    """(backend, device name, is_gpu)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        if d.platform == "gpu":
            return backend, str(getattr(d, "device_kind", "GPU")), True
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
            return backend, name, True
    cpu = platform.processor() or platform.machine()
    return backend, f"CPU ({os.cpu_count()} cores, {cpu})", False


def peak_tflops(device: str, precision: str) -> Optional[float]:
    dtype = "bfloat16" if precision == "mixed_bfloat16" else "float32"
    for key, dt, peak in PEAK_TFLOPS:
        if key in device and dt == dtype:
            return peak
    return None


def time_train_steps(models, steps: int, describe=str) -> Dict:
    """``{name: [seconds of each timed step]}`` of ``models`` (``{name: (model, x)}``, compiled
    and warmed up): ``steps`` rounds in which the models take turns, one
    ``model.train_on_batch(x)`` each (the logs read back, so the step has finished), so that
    other load on the machine hits them alike.

    Raises:
      FloatingPointError: a step logged a NaN (``describe(name)`` names the model).
    """
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, (model, x) in models.items():
            start = time.perf_counter()
            logs = model.train_on_batch(x, return_dict=True)  # numpy: the step has finished
            times[name].append(time.perf_counter() - start)
            if not all(float(v) == float(v) for v in logs.values()):
                raise FloatingPointError(f"{describe(name)}: non-finite logs {logs}")
    return times


def _to_device(x):
    from keras import ops
    return ops.convert_to_tensor(x)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    import keras

    batch_size = args.batch_size or (64 if args.preset == "tiny" else 8)
    if batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise job_flags.FlagError("kmm bench two-tower: --batch_size and --steps must be >= 1, "
                                  "--warmup >= 0")
    sizes = dict(resolve_sizes(args), preset=args.preset)

    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.precision)
    try:
        keras.utils.set_random_seed(args.seed)
        images, tokens = random_batch(sizes, batch_size, args.seed)
        images_t, tokens_t = _to_device(images), _to_device(tokens)

        def optimizer():
            return keras.optimizers.AdamW(learning_rate=LEARNING_RATE,
                                          weight_decay=WEIGHT_DECAY)

        models = {}
        ours = build_ours(sizes)
        ours.compile(optimizer=optimizer(), jit_compile=args.jit_compile)
        models["ours"] = (ours, {"image": images_t, "text": tokens_t})
        if not args.skip_keras_hub:
            hub = build_keras_hub(sizes)
            hub.compile(optimizer=optimizer(), loss=_siglip_loss(), jit_compile=args.jit_compile)
            models["keras_hub"] = (hub, {"images": images_t, "token_ids": tokens_t})

        for _ in range(args.warmup):  # builds, traces and compiles both, untimed
            for model, x in models.values():
                model.train_on_batch(x)
        for model, x in models.values():
            model.train_on_batch(x)  # at least one untimed step even with --warmup 0
        times = time_train_steps(models, args.steps)

        backend, device, is_gpu = device_info()
        flops = train_flops_per_example(sizes)
        peak = peak_tflops(device, args.precision) if (is_gpu and backend == "jax") else None
        out: Dict = {"preset": args.preset, "batch_size": batch_size,
                     "precision": args.precision, "jit_compile": args.jit_compile,
                     "jit_compile_resolved": {n: bool(m.jit_compile)
                                              for n, (m, _) in models.items()},
                     "backend": backend, "device": device, "steps": args.steps,
                     "warmup": args.warmup, "sizes": {k: v for k, v in sizes.items()
                                                      if k != "preset"},
                     "train_gflops_per_example": round(flops / 1e9, 3)}
        for name, (model, _) in models.items():
            step = statistics.median(times[name])
            eps = batch_size / step
            mfu = (eps * flops / (peak * 1e12)) if peak else None
            out[name] = {"examples_per_second": round(eps, 3),
                         "step_time_ms": round(step * 1e3, 2),
                         "step_time_ms_all": [round(t * 1e3, 2) for t in times[name]],
                         "params": count_params(model), "mfu": mfu}
        out["mfu"] = out["ours"]["mfu"]
        if "keras_hub" in out:
            out["ratio"] = round(out["ours"]["examples_per_second"]
                                 / out["keras_hub"]["examples_per_second"], 4)
        return out
    finally:
        keras.config.set_dtype_policy(previous_policy)
