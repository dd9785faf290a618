"""``kmm bench video``: clips/s of the video input pipeline and of the video-text train step.

Input pipeline (TensorFlow only; ``--skip_pipeline`` leaves it out): the moving-digits job
(``kmm data video --source moving-digits``, DirectRunner) writes ``--num_clips`` training clips
to a temporary folder, then ``pipelines.datasets.video_train_dataset`` (JPEG decode of every
frame, temporal sampling, batching, tokenization) is timed with
``pipelines.datasets.benchmark_dataset``: clips/s after ``--warmup`` batches.

Train step: the video-text two-tower model (CLIP softmax loss over the batch) with each video
tower of ``--encoders``: ``tubevit`` (sparse tubes) and ``frame_average`` (the image ViT on every
frame, averaged), the same text tower, AdamW, random clips in [-1, 1] and random token ids, the
same dtype policy and ``jit_compile``. ``model.train_on_batch`` is timed after ``--warmup``
untimed steps, the encoders alternating step by step; each figure is the median step.

MFU (only on a GPU with the JAX backend, else null): analytical training FLOPs per clip over the
card's peak (``keras_mm.bench.two_tower.PEAK_TFLOPS``), 3 x forward, forward = 2 x multiply-adds:
per transformer ``6 * depth * (4 w^2 + 2 w mlp) * n + 12 * depth * n^2 * w`` for n tokens, plus
the token embedding (``6 * kernel volume * 3 * w`` per token: tubes or patches) and the text
tower; TubeViT has one transformer over its tube tokens, the frame-averaging tower T transformers
over the patches of one frame each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Dict, Optional, Sequence

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import two_tower as tt

ENCODERS = ("tubevit", "frame_average")


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench video", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "b16"))
    parser.add_argument("--tubes", default=None,
                        help="named tube set (clip8, tiny, paper); default: clip8 for tiny "
                             "(8 x 32 x 32 clips), the preset's otherwise")
    parser.add_argument("--num_frames", type=int, default=None,
                        help="default 8 for tiny, 32 for b16")
    parser.add_argument("--image_size", type=int, default=None,
                        help="default 32 for tiny, 224 for b16")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="default 64 for tiny, 8 for b16")
    parser.add_argument("--encoders", default=",".join(ENCODERS),
                        help=f"comma-separated, of {', '.join(ENCODERS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per encoder")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per encoder")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit_compile", type=tt._bool_or_auto, default="auto",
                        help="true, false or auto (Keras' default)")
    parser.add_argument("--tube_impl", default="einsum", choices=("einsum", "conv"),
                        help="TubeViT's tube embedding: windows + einsum, or ops.conv")
    parser.add_argument("--skip_pipeline", action="store_true",
                        help="time the train step only (no TensorFlow / Beam needed)")
    parser.add_argument("--num_clips", type=int, default=1024,
                        help="moving-digits clips written for the pipeline benchmark")
    parser.add_argument("--num_batches", type=int, default=20,
                        help="timed pipeline batches")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def resolve(args) -> Dict:
    tiny = args.preset == "tiny"
    def given(value, default):
        return default if value is None else value

    sizes = {"preset": args.preset,
             "num_frames": given(args.num_frames, 8 if tiny else 32),
             "image_size": given(args.image_size, 32 if tiny else 224),
             "batch_size": given(args.batch_size, 64 if tiny else 8),
             "tubes": args.tubes or ("clip8" if tiny else None), "tube_impl": args.tube_impl}
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    bad = [e for e in encoders if e not in ENCODERS]
    if bad or not encoders:
        raise job_flags.FlagError(f"kmm bench video: --encoders: unknown {bad}; valid: "
                                  f"{', '.join(ENCODERS)}")
    if min(sizes["num_frames"], sizes["image_size"], sizes["batch_size"], args.steps) < 1 or (
            args.warmup < 0):
        raise job_flags.FlagError("kmm bench video: --num_frames, --image_size, --batch_size "
                                  "and --steps must be >= 1, --warmup >= 0")
    return {**sizes, "encoders": encoders}


# ------------------------------------------------------------------------------ pipeline
def bench_pipeline(args, sizes: Dict) -> Dict:
    from keras_mm.beam_jobs import video_tubes
    from keras_mm.pipelines import datasets

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        video_tubes.run(["--source", "moving-digits", "--out", folder,
                         "--num_train", str(args.num_clips), "--num_validation", "0",
                         "--num_test", "0", "--num_frames", str(sizes["num_frames"]),
                         "--canvas_size", str(sizes["image_size"])])
        job_seconds = time.perf_counter() - start
        config = datasets.InputConfig(image_size=sizes["image_size"],
                                      num_frames=sizes["num_frames"],
                                      batch_size=sizes["batch_size"], max_text_len=24,
                                      shuffle_buffer=256, augment="none")
        result = datasets.benchmark_dataset(datasets.video_train_dataset(folder, config),
                                            num_batches=args.num_batches, warmup=2)
    return {"clips": args.num_clips, "beam_job_seconds": round(job_seconds, 2),
            "beam_clips_per_second": round(args.num_clips / job_seconds, 1),
            "clips_per_second": round(result["examples_per_second"], 1),
            "batch_time_ms": round(1000 * result["seconds"] / result["batches"], 2),
            "batches": result["batches"]}


# ------------------------------------------------------------------------------ train step
def transformer_flops(n: int, width: int, mlp: int, depth: int) -> float:
    """Training FLOPs of ``depth`` pre-LN blocks over ``n`` tokens (module docstring)."""
    return 6.0 * depth * (4 * width * width + 2 * width * mlp) * n + 12.0 * depth * n * n * width


def video_tower_flops(model, sizes: Dict, encoder: str) -> float:
    """Analytical training FLOPs per clip of the video tower (module docstring)."""
    import numpy as np

    tower = model.image_encoder
    if encoder == "tubevit":
        w, m, depth = tower.width, tower.mlp_dim, tower.depth
        video = np.zeros((1, sizes["num_frames"], sizes["image_size"], sizes["image_size"], 3),
                         "float32")
        n = int(tower(video, return_tokens=True)[1].shape[1])
        embed = 0.0
        for (kernel, _, _), count in zip(tower.tube_embedding.tubes,
                                         tower.tube_embedding.token_counts(video.shape[1:4])):
            embed += 6.0 * kernel[0] * kernel[1] * kernel[2] * 3 * w * count
        return transformer_flops(n, w, m, depth) + embed
    vit = tower.image_encoder
    w, m, depth = vit.width, vit.mlp_dim, vit.depth
    ph, pw = (vit.patch_size, vit.patch_size) if isinstance(vit.patch_size, int) else (
        tuple(vit.patch_size))
    n = (sizes["image_size"] // ph) * (sizes["image_size"] // pw)
    per_frame = transformer_flops(n, w, m, depth) + 6.0 * ph * pw * 3 * w * n
    return sizes["num_frames"] * per_frame


def build_model(sizes: Dict, encoder: str):
    from keras_mm.encoders import presets
    from keras_mm.models.video import build_video_two_tower

    video_overrides = {"video_size": [sizes["num_frames"], sizes["image_size"],
                                      sizes["image_size"]], "tube_impl": sizes["tube_impl"]}
    if sizes["tubes"]:
        video_overrides["tubes"] = presets.tube_set(sizes["tubes"])
    return build_video_two_tower(sizes["preset"], "softmax", encoder=encoder,
                                 vocab_size=1000 if sizes["preset"] == "tiny" else 32000,
                                 max_len=24 if sizes["preset"] == "tiny" else 64,
                                 video_overrides=video_overrides)


def bench_train(args, sizes: Dict) -> Dict:
    import keras
    import numpy as np

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.precision)
    try:
        keras.utils.set_random_seed(args.seed)
        rng = np.random.default_rng(args.seed)
        b, t, s = sizes["batch_size"], sizes["num_frames"], sizes["image_size"]
        models: Dict = {}
        for encoder in sizes["encoders"]:
            model = build_model(sizes, encoder)
            vocab, length = model.text_encoder.vocab_size, model.text_encoder.max_len
            tokens = rng.integers(4, vocab, (b, length)).astype("int32")
            tokens[:, -1] = tt.EOS_ID
            x = {"video": tt._to_device(rng.uniform(-1, 1, (b, t, s, s, 3)).astype("float32")),
                 "text": tt._to_device(tokens)}
            model.compile(optimizer=keras.optimizers.AdamW(learning_rate=tt.LEARNING_RATE,
                                                           weight_decay=tt.WEIGHT_DECAY),
                          jit_compile=args.jit_compile)
            models[encoder] = (model, x)
        for _ in range(args.warmup + 1):
            for model, x in models.values():
                model.train_on_batch(x)
        times = tt.time_train_steps(models, args.steps)
        backend, device, is_gpu = tt.device_info()
        peak = tt.peak_tflops(device, args.precision) if (is_gpu and backend == "jax") else None
        out: Dict = {"backend": backend, "device": device}
        for name, (model, _) in models.items():
            text = model.text_encoder
            flops = video_tower_flops(model, sizes, name) + transformer_flops(
                text.max_len, text.width, text.mlp_dim, text.depth)
            step = statistics.median(times[name])
            cps = b / step
            out[name] = {"clips_per_second": round(cps, 3), "step_time_ms": round(step * 1e3, 2),
                         "step_time_ms_all": [round(v * 1e3, 2) for v in times[name]],
                         "params": tt.count_params(model),
                         "train_gflops_per_clip": round(flops / 1e9, 4),
                         "mfu": (cps * flops / (peak * 1e12)) if peak else None,
                         "jit_compile_resolved": bool(model.jit_compile)}
        return out
    finally:
        keras.config.set_dtype_policy(previous)


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    sizes = resolve(args)
    out: Dict = {"preset": sizes["preset"], "num_frames": sizes["num_frames"],
                 "image_size": sizes["image_size"], "batch_size": sizes["batch_size"],
                 "tubes": sizes["tubes"], "tube_impl": sizes["tube_impl"],
                 "precision": args.precision,
                 "jit_compile": args.jit_compile, "steps": args.steps, "warmup": args.warmup}
    if not args.skip_pipeline:
        out["pipeline"] = bench_pipeline(args, sizes)
    out["train_step"] = bench_train(args, sizes)
    return out
