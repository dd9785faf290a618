"""``kmm bench captioner``: train step examples/s of CoCa, CapPa, MaMMUT and the PaLI-style model.

Each ``--kinds`` model is ``models.captioners.build_captioner(kind, --preset)`` with its preset's
sizes (``--max_len`` tokens per caption, default the preset decoder's + 1), compiled with AdamW
(lr 1e-3, weight decay 1e-4), the dtype policy of ``--precision`` and ``--jit_compile``, and
trained with ``model.train_on_batch`` on one fixed random batch: images uniform in [-1, 1],
captions BOS, random ids in [4, V), EOS, and for PaLI a prompt of ``max_prompt_len - 1`` random
ids and one PAD. Each model trains with its own default objective: CoCa's contrastive (global
batch) + 2 x captioning, CapPa's parallel prediction on 75% of rows, MaMMUT's two decoder passes
(bidirectional contrastive, causal captioning), PaLI's prompted encoder-decoder.

Timing: ``--warmup`` untimed steps per model after the compiling one, then the models take turns
step by step (coca, cappa, ..., coca, ...) for ``--steps`` rounds so that other load on the
machine hits them alike; each figure is the median step, the logs read back (the step has
finished).

FLOPs and MFU (JAX backend; null on TensorFlow): the model's training-mode forward pass
(``model.stateless_call(..., training=True)`` on the batch) is traced to a jaxpr and its matrix
products counted exactly: 2 x (output elements) x (contracted size) for every ``dot_general``
and ``conv_general_dilated``, inside nested jaxprs too (``count_matmul_flops``). Attention is
traced in its einsum form for this count (on a GPU the timed step runs cuDNN's fused kernel,
whose opaque call the trace could not see; it does the same matrix products). Training FLOPs =
3 x forward (forward + the two backward products of each matmul), the usual model-FLOPs
convention: no rematerialisation, elementwise ops, softmaxes and norms left out. MFU = examples/s
x training FLOPs / the card's peak (``keras_mm.bench.two_tower.PEAK_TFLOPS``), on a GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Dict, List, Optional, Sequence

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import two_tower as tt

KINDS = ("coca", "cappa", "mammut", "pali")
PRESETS = ("tiny", "b16")
BOS_ID, EOS_ID = 1, 2   # keras_mm's tokenizer: PAD 0, BOS 1, EOS 2


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench captioner", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default 64 for tiny, 8 for b16")
    parser.add_argument("--max_len", type=int, default=None,
                        help="caption tokens BOS .. EOS (default: the preset decoder's + 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per model after the compiling one")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit_compile", type=tt._bool_or_auto, default="auto",
                        help="true, false or auto (Keras' default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_kinds(text: str) -> List[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise job_flags.FlagError(f"kmm bench captioner: --kinds takes a comma-separated list "
                                  f"of {', '.join(KINDS)}; got {text!r}")
    if len(set(kinds)) != len(kinds):
        raise job_flags.FlagError(f"kmm bench captioner: --kinds repeats a model: {text!r}")
    return kinds


def build_model(kind: str, preset: str, max_len: Optional[int]):
    from keras_mm.models.captioners import build_captioner

    return build_captioner(kind, preset, max_len=max_len)


def random_batch(model, kind: str, batch_size: int, seed: int) -> Dict:
    """The fixed random inputs of ``model`` (module docstring), as numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    # CoCa and MaMMUT hold their ViT as image_encoder_model (image_encoder is the two-tower
    # contract's pooled tower)
    vit = getattr(model, "image_encoder_model", None) or model.image_encoder
    height, width = vit.image_size
    decoder = model.decoder
    length = decoder.max_len + 1 - (1 if kind == "coca" else 0)   # coca: + the cls slot
    text = rng.integers(4, decoder.vocab_size, (batch_size, length)).astype("int32")
    text[:, 0], text[:, -1] = BOS_ID, EOS_ID
    batch = {"image": rng.uniform(-1, 1, (batch_size, height, width, 3)).astype("float32"),
             "text": text}
    if kind == "pali":
        prompt = rng.integers(4, decoder.vocab_size,
                              (batch_size, model.max_prompt_len)).astype("int32")
        prompt[:, -1] = 0
        batch["prompt"] = prompt
    return batch


def _sub_jaxprs(value):
    """The jaxprs held by one equation parameter (a jaxpr, a closed one, or a list of them)."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (list, tuple)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def count_matmul_flops(jaxpr) -> float:
    """FLOPs of the matrix products (``dot_general``, ``conv_general_dilated``) of a jaxpr,
    nested jaxprs included (a ``scan`` body times its length; a ``cond`` its costliest branch).

    Raises:
      ValueError: the jaxpr has a ``while`` loop (its trip count is unknown).
    """
    import math

    jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") and hasattr(jaxpr.jaxpr, "eqns") else jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = math.prod(int(lhs[d]) for d in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            per_output = math.prod(rhs) // int(rhs[out_feature_dim])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name == "while":
            raise ValueError("count_matmul_flops: a while loop's trip count is unknown")
        elif name == "cond":
            total += max(count_matmul_flops(b) for b in eqn.params["branches"])
        else:
            inner = sum(count_matmul_flops(j) for v in eqn.params.values()
                        for j in _sub_jaxprs(v))
            total += inner * (int(eqn.params["length"]) if name == "scan" else 1)
    return total


@contextlib.contextmanager
def einsum_attention():
    """Every attention layer takes its einsum form inside (for tracing the FLOP count)."""
    from keras_mm.layers import attention

    original = attention._use_dot_product
    attention._use_dot_product = lambda impl, q: False
    try:
        yield
    finally:
        attention._use_dot_product = original


def forward_flops(model, batch: Dict) -> Optional[float]:
    """Matmul FLOPs of ``model``'s training-mode forward pass on ``batch`` (whole batch);
    None off the JAX backend."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    if not model.built:
        model(batch)                                   # creates the variables
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=True)[0]

    with einsum_attention():
        jaxpr = jax.make_jaxpr(forward)(trainable, non_trainable, batch)
    return count_matmul_flops(jaxpr)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    kinds = parse_kinds(args.kinds)
    batch_size = args.batch_size if args.batch_size is not None else (
        64 if args.preset == "tiny" else 8)
    if batch_size < 1 or args.steps < 1 or args.warmup < 0:
        raise job_flags.FlagError("kmm bench captioner: --batch_size and --steps must be >= 1, "
                                  "--warmup >= 0")
    if args.max_len is not None and args.max_len < 3:
        raise job_flags.FlagError("kmm bench captioner: --max_len must be >= 3 (BOS, a token, "
                                  "EOS)")
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.precision)
    try:
        keras.utils.set_random_seed(args.seed)
        models: Dict = {}
        for kind in kinds:
            model = build_model(kind, args.preset, args.max_len)
            batch = random_batch(model, kind, batch_size, args.seed)
            x = {k: tt._to_device(v) for k, v in batch.items()}
            model.compile(optimizer=keras.optimizers.AdamW(learning_rate=tt.LEARNING_RATE,
                                                           weight_decay=tt.WEIGHT_DECAY),
                          jit_compile=args.jit_compile)
            compile_start = time.perf_counter()
            model.train_on_batch(x)                      # builds, traces and compiles
            models[kind] = {"model": model, "x": x,
                            "compile_seconds": time.perf_counter() - compile_start}
        for _ in range(args.warmup):
            for entry in models.values():
                entry["model"].train_on_batch(entry["x"])
        times = tt.time_train_steps({kind: (entry["model"], entry["x"])
                                     for kind, entry in models.items()}, args.steps)

        backend, device, is_gpu = tt.device_info()
        peak = tt.peak_tflops(device, args.precision) if (is_gpu and backend == "jax") else None
        out: Dict = {"preset": args.preset, "batch_size": batch_size,
                     "precision": args.precision, "jit_compile": args.jit_compile,
                     "backend": backend, "device": device, "steps": args.steps,
                     "warmup": args.warmup, "seed": args.seed}
        for kind, entry in models.items():
            model = entry["model"]
            forward = forward_flops(model, entry["x"])
            train = None if forward is None else 3.0 * forward / batch_size
            step = statistics.median(times[kind])
            eps = batch_size / step
            out[kind] = {
                "examples_per_second": round(eps, 3), "step_time_ms": round(step * 1e3, 2),
                "step_time_ms_all": [round(t * 1e3, 2) for t in times[kind]],
                "compile_seconds": round(entry["compile_seconds"], 2),
                "params": tt.count_params(model),
                "caption_tokens": int(entry["x"]["text"].shape[1]),
                "train_gflops_per_example": None if train is None else round(train / 1e9, 4),
                "mfu": (eps * train / (peak * 1e12)) if (peak and train) else None,
                "jit_compile_resolved": bool(model.jit_compile)}
        return out
    finally:
        keras.config.set_dtype_policy(previous)
