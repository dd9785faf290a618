"""``kmm bench moe``: LIMoE train-step time at fixed per-token compute as the experts grow.

Every model is the LIMoE ``--preset`` one-tower transformer (same width, depth, heads, MLP width,
image and text lengths) with top-1 routing, so each token passes through one expert MLP of the
dense size whatever the number of experts E: per-token compute is fixed, parameters grow with E.
``--experts 0`` is the dense model (no MoE block). What grows with E is the router, the
dispatch / combine tensors ``[groups, group_size, E, C]`` with ``C = ceil(capacity_factor *
group_size / E)`` (their size is constant in E: ``E * C ~ capacity_factor * group_size``) and the
memory traffic of the expert weights.

Timing as ``kmm bench two-tower``: the same random batch (images in [-1, 1], token ids), AdamW,
``train_on_batch`` after ``--warmup`` untimed steps, the models alternating step by step, the
median step. MFU (JAX on a GPU only) uses the dense model's analytic training FLOPs per example
(``keras_mm.bench.two_tower.train_flops_per_example`` at the one-tower sizes, both modalities),
which is the per-token compute of every E.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, Optional, Sequence

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import two_tower as tt

PRESETS = ("tiny", "b16", "l16")


def _experts(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench moe", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--experts", type=_experts, default=[0, 1, 4, 16, 64],
                        help="comma-separated expert counts (0 = dense)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--capacity_factor", type=float, default=1.0)
    parser.add_argument("--group_size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit_compile", type=tt._bool_or_auto, default="auto",
                        help="true, false or auto (Keras' default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.capacity_factor <= 0:
        raise job_flags.FlagError("kmm bench moe: --batch_size and --steps must be >= 1, "
                                  "--warmup >= 0, --capacity_factor > 0")
    import keras

    from keras_mm.encoders import presets
    from keras_mm.models.limoe import build_limoe

    base = presets.limoe_config(args.preset)
    if args.image_size:
        base["image_size"] = args.image_size
    if args.group_size:
        base["group_size"] = args.group_size
    sizes = dict(image_size=base["image_size"], patch_size=base["patch_size"],
                 width=base["width"], depth=base["depth"], heads=base["heads"],
                 mlp_dim=base["mlp_dim"], vocab_size=base["vocab_size"],
                 max_len=base["max_len"], embed_dim=base["width"])
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.precision)
    try:
        keras.utils.set_random_seed(args.seed)
        images, tokens = tt.random_batch(sizes, args.batch_size, args.seed)
        x = {"image": tt._to_device(images), "text": tt._to_device(tokens)}
        models = {}
        for experts in args.experts:
            overrides = dict(image_size=base["image_size"], group_size=base["group_size"],
                             num_experts=experts, capacity_factor=args.capacity_factor)
            model = build_limoe(args.preset, encoder_overrides=overrides)
            model.compile(optimizer=keras.optimizers.AdamW(learning_rate=tt.LEARNING_RATE,
                                                           weight_decay=tt.WEIGHT_DECAY),
                          jit_compile=args.jit_compile)
            models[experts] = model
        for _ in range(args.warmup + 1):      # builds, traces and compiles, untimed
            for model in models.values():
                model.train_on_batch(x)
        times = tt.time_train_steps({e: (model, x) for e, model in models.items()}, args.steps,
                                    describe=lambda e: f"E={e}")

        backend, device, is_gpu = tt.device_info()
        flops = tt.train_flops_per_example(sizes)
        peak = tt.peak_tflops(device, args.precision) if (is_gpu and backend == "jax") else None
        tokens_per_example = (sizes["image_size"] // sizes["patch_size"]) ** 2 + sizes["max_len"]
        rows = []
        reference = None
        for experts, model in models.items():
            step = statistics.median(times[experts])
            reference = reference or step
            eps = args.batch_size / step
            rows.append({
                "experts": experts, "moe_blocks": list(model.encoder.moe_indices),
                "params": tt.count_params(model),
                "step_time_ms": round(step * 1e3, 2),
                "examples_per_second": round(eps, 3),
                "tokens_per_second": round(eps * tokens_per_example, 1),
                "step_time_vs_first": round(step / reference, 3),
                "mfu": (eps * flops / (peak * 1e12)) if peak else None,
            })
        return {"preset": args.preset, "batch_size": args.batch_size,
                "capacity_factor": args.capacity_factor, "group_size": base["group_size"],
                "precision": args.precision, "jit_compile": args.jit_compile,
                "backend": backend, "device": device, "steps": args.steps,
                "train_gflops_per_example": round(flops / 1e9, 3),
                "sizes": sizes, "results": rows}
    finally:
        keras.config.set_dtype_policy(previous_policy)
