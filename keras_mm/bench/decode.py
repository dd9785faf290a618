"""``kmm bench decode``: cached incremental greedy decoding against full re-decoding.

The decoder is the ``TextDecoder`` of a captioner preset (``--kind`` coca / cappa / mammut / pali,
``--preset`` tiny / b16; ``--depth``, ``--width``, ... override its sizes) with random, seeded
initial weights, cross-attending to a random context ``[batch, S, C]`` (standard normal): the
image tokens (``(image_size / patch_size)^2`` of width the image encoder's) for CapPa and MaMMUT,
CoCa's caption queries (``num_caption_queries`` of the decoder's width), PaLI's encoder memory
(image tokens + prompt positions, the decoder's width); ``--context_len`` overrides S. CoCa's
decoder is built as ``build_captioner`` does (cross-attention in the multimodal blocks only, one
extra input-only token); its cls position is not used here.

Two greedy decoders of the same weights generate the same ``--length`` tokens per row, both
fully in-graph and compiled as one function (``tf.function(jit_compile=...)`` on TensorFlow,
``jax.jit`` on JAX, the weights passed as arguments through ``keras.StatelessScope``):

  ``cached``  ``TextDecoder.decode(context, method="greedy")``: the library's search, one
              ``TextDecoder.step`` per token over the key / value cache (context keys / values
              computed once).
  ``full``    re-decoding without a cache: a ``keras.ops.fori_loop`` over positions t whose body
              runs the whole decoder stack over the fixed-size token buffer ``[batch, length]``
              (BOS, the tokens so far, PAD after: exactly ``TextDecoder.call`` up to the output
              projection; the causal mask makes positions after t irrelevant), projects position
              t to the vocabulary, bans PAD and BOS as ``TextDecoder.generation_step`` does,
              takes the argmax and writes it at t + 1. A compiled graph needs static shapes, so
              every step runs over all ``length`` positions (a growing prefix would do about
              half the work in total); projecting only position t (rather than all of them,
              as ``decoder(buffer, context)`` would) keeps the baseline from being slowed by
              wasted vocabulary matmuls. The context's cross-attention keys / values are
              recomputed every step, as any cache-free decoder does.

So that every row decodes exactly ``--length`` tokens (a random model may emit EOS at any step
and stop a row early), the decoder is built with ``eos_id = vocab_size``, an id no logit has:
nothing can finish a row, and both decoders time the full length - the worst case of a real
model. ``same_tokens`` says whether the two produce identical ``[batch, length]`` tokens;
``token_agreement`` is the fraction of equal tokens and ``first_mismatch`` the first step where
any row differs (null when identical). The two compute the same function in different orders
(cache attention over ``max_len`` slots vs a full causal pass), so a difference can only come
from float rounding flipping a near-tie argmax (most likely under ``mixed_bfloat16``).

``--beam_size K`` (0: off) also times the cached beam search (``keras_mm.decoders.search``'s
``beam_search`` over ``TextDecoder.generation_step``, the state tiled to ``batch * K`` rows, as
``TextDecoder.decode(method="beam")``) with the tokenizer's EOS (id 2) given a logit of -1e9 so
that no hypothesis can beat a live beam and the search runs all ``length`` steps too.

Timing: each compiled function is called once untimed (trace + compile, reported as
``compile_seconds``) and ``--warmup`` more times; then the modes take turns call by call
(cached, full, beam, cached, ...) for ``--steps`` rounds, so that other load on the machine hits
all alike; each figure is the median call (the tokens copied back to the host, so the call has
finished). ``tokens_per_second`` = batch * length / seconds (beam: output tokens, not beams x
tokens); ``ms_per_token_step`` = seconds / length. ``speedup`` = full seconds / cached seconds.

No FLOPs / MFU figure: decoding one token at a time is memory-bound (every step reads all the
weights and the cache for one token a row), so MFU says little here; tokens/s is the measure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

from keras_mm.beam_jobs import job_flags
from keras_mm.bench.two_tower import _bool_or_auto, device_info

PRESETS = ("tiny", "b16")
KINDS = ("coca", "cappa", "mammut", "pali")
TOKENIZER_EOS_ID = 2   # keras_mm's tokenizer: PAD 0, BOS 1, EOS 2
BANNED_LOGIT = -1e9    # as TextDecoder.generation_step


def build_parser() -> argparse.ArgumentParser:
    parser = job_flags.ArgParser(
        prog="kmm bench decode", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--kind", default="cappa", choices=KINDS,
                        help="captioner whose decoder (and context) is timed")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--length", type=int, default=None,
                        help="tokens generated per row (default: the decoder's max_len)")
    parser.add_argument("--beam_size", type=int, default=4,
                        help="also time cached beam search of this size (0: off)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per mode")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls per mode after the compiling one")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit_compile", type=_bool_or_auto, default="auto",
                        help="true, false or auto (JAX: true; TensorFlow: true on a GPU, "
                             "false on CPU, as Keras' model.compile)")
    parser.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("size overrides")
    for name in ("depth", "width", "heads", "mlp_dim", "vocab_size", "max_len"):
        g.add_argument(f"--{name}", type=int, default=None,
                       help="default: the preset's" + (" (4 x width when --width is given)"
                                                        if name == "mlp_dim" else ""))
    g.add_argument("--context_len", type=int, default=None,
                   help="context tokens S (default: the kind's, see the module docstring)")
    g.add_argument("--context_dim", type=int, default=None,
                   help="context width C (default: the kind's)")
    return parser


def resolve_config(args) -> Dict:
    """``{"decoder": TextDecoder kwargs, "context_len": S, "context_dim": C}`` of the flags.
    Raises ``FlagError`` for inconsistent sizes."""
    from keras_mm.encoders import presets

    cfg = presets.captioner_config(args.kind, args.preset)
    image, dec = cfg["image"], dict(cfg["decoder"])
    for name in ("depth", "width", "heads", "mlp_dim", "vocab_size", "max_len"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise job_flags.FlagError(f"kmm bench decode: --{name} must be >= 1")
            dec[name] = int(value)
    if args.width is not None and args.mlp_dim is None:
        dec["mlp_dim"] = 4 * dec["width"]
    if dec["width"] % dec["heads"]:
        raise job_flags.FlagError(f"kmm bench decode: --width {dec['width']} is not divisible "
                                  f"by --heads {dec['heads']}")
    if dec["vocab_size"] < 4:
        raise job_flags.FlagError("kmm bench decode: --vocab_size must be >= 4 (PAD, BOS, EOS "
                                  "and at least one other token)")
    if args.kind == "coca":        # as models.captioners.build_captioner
        uni = cfg["unimodal_layers"] if args.depth is None else dec["depth"] // 2
        uni = min(uni, dec["depth"] - 1)
        dec["cross_attention"] = f"last_{dec['depth'] - uni}"
    if args.kind in ("coca", "cappa"):
        dec["extra_tokens"] = max(1, dec.get("extra_tokens", 0))
    patches = (image["image_size"] // image["patch_size"]) ** 2
    if args.kind == "coca":
        context_len, context_dim = cfg["num_caption_queries"], dec["width"]
    elif args.kind == "pali":
        context_len, context_dim = patches + cfg["max_prompt_len"], dec["width"]
    else:
        context_len, context_dim = patches, image["width"]
    context_len = args.context_len if args.context_len is not None else context_len
    context_dim = args.context_dim if args.context_dim is not None else context_dim
    if context_len < 1 or context_dim < 1:
        raise job_flags.FlagError("kmm bench decode: --context_len and --context_dim must be "
                                  ">= 1")
    # EOS outside the vocabulary: no row can finish early (module docstring).
    dec["eos_id"] = dec["vocab_size"]
    return {"decoder": dec, "context_len": int(context_len), "context_dim": int(context_dim)}


def build_decoder(decoder_kwargs: Dict, batch_size: int, context_len: int, context_dim: int,
                  seed: int):
    """A built ``TextDecoder`` with seeded random weights and a random context ``[batch_size,
    context_len, context_dim]`` float32 (standard normal)."""
    import keras
    import numpy as np

    from keras_mm.decoders.text_decoder import TextDecoder

    keras.utils.set_random_seed(seed)
    decoder = TextDecoder(**decoder_kwargs, name="decoder")
    rng = np.random.default_rng(seed)
    context = keras.ops.convert_to_tensor(
        rng.standard_normal((batch_size, context_len, context_dim)).astype("float32"))
    ids = keras.ops.ones((batch_size, 2), dtype="int32")
    decoder(ids, context)            # creates the weights (JAX traces loop bodies even eagerly)
    return decoder, context


def _ban(decoder, logits, extra_ids=()):
    """``logits [rows, vocab]`` with PAD, BOS (and ``extra_ids``) set to -1e9."""
    from keras import ops

    ids = [decoder.pad_id, decoder.bos_id, *extra_ids]
    banned = ops.max(ops.one_hot(ops.convert_to_tensor(ids), decoder.vocab_size), axis=0)
    return ops.where(banned[None] > 0, BANNED_LOGIT, ops.cast(logits, "float32"))


def cached_greedy(decoder, length: int) -> Callable:
    """``context -> tokens [batch, length]`` by ``decoder.decode`` (KV cache)."""
    def fn(context):
        return decoder.decode(context, method="greedy", max_length=length)
    return fn


def full_greedy(decoder, length: int) -> Callable:
    """``context -> tokens [batch, length]`` by re-running the decoder stack over the whole
    token buffer for every new token (module docstring)."""
    from keras import ops

    def fn(context):
        batch = ops.shape(context)[0]
        positions = ops.arange(length, dtype="int32")[None, :]                    # [1, T]
        buffer = ops.concatenate(
            [ops.full((batch, 1), decoder.bos_id, dtype="int32"),
             ops.full((batch, length - 1), decoder.pad_id, dtype="int32")], axis=1)  # [B, T]
        out = ops.full((batch, length), decoder.pad_id, dtype="int32")            # [B, T]

        def body(t, carry):
            buffer, out = carry
            padding = ops.not_equal(buffer, decoder.pad_id)      # as TextDecoder.call
            x = decoder.run_blocks(decoder.embed(buffer), context, padding)       # [B, T, W]
            x_t = ops.take(x, ops.reshape(t, (1,)), axis=1)                       # [B, 1, W]
            logits = _ban(decoder, decoder.logits(x_t)[:, 0])                     # [B, V]
            chosen = ops.cast(ops.argmax(logits, axis=-1), "int32")               # [B]
            out = ops.where(ops.equal(positions, t), chosen[:, None], out)
            buffer = ops.where(ops.equal(positions, t + 1), chosen[:, None], buffer)
            return buffer, out

        return ops.fori_loop(0, length, body, (buffer, out))[1]
    return fn


def cached_beam(decoder, length: int, beam_size: int) -> Callable:
    """``context -> tokens [batch, length]`` by cached beam search that never finishes early."""
    from keras_mm.decoders import search

    def step(tokens, state, index):
        logits, state = decoder.step(tokens, state, index)
        return _ban(decoder, logits, (TOKENIZER_EOS_ID,)), state

    def fn(context):
        batch = context.shape[0]
        state = search.tile_for_beams(decoder.init_state(batch, context), beam_size)
        tokens, _ = search.beam_search(step, state, batch_size=batch, beam_size=beam_size,
                                       max_length=length, bos_id=decoder.bos_id,
                                       eos_id=TOKENIZER_EOS_ID, pad_id=decoder.pad_id)
        return tokens
    return fn


def resolve_jit(jit_compile) -> bool:
    import keras

    if jit_compile != "auto":
        return bool(jit_compile)
    if keras.backend.backend() == "jax":
        return True
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def compile_fn(decoder, fn: Callable, jit_compile: bool) -> Callable:
    """``fn(context)`` as one compiled graph: ``tf.function`` (XLA when ``jit_compile``) on
    TensorFlow; on JAX ``jax.jit`` of a pure function of the weights and the context (eager,
    loops still traced by ``lax``, when not ``jit_compile``)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)
    if keras.backend.backend() != "jax":
        raise job_flags.FlagError(f"kmm bench decode: backend {keras.backend.backend()!r} "
                                  "not supported (tensorflow or jax)")
    if not jit_compile:
        return fn
    import jax

    variables = list(decoder.variables)

    def pure(values, context):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(context)

    jitted = jax.jit(pure)
    return lambda context: jitted([v.value for v in variables], context)


def _count(weights) -> int:
    n = 0
    for w in weights:
        size = 1
        for d in w.shape:
            size *= int(d)
        n += size
    return n


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.beam_size < 0:
        raise job_flags.FlagError("kmm bench decode: --batch_size and --steps must be >= 1, "
                                  "--warmup and --beam_size >= 0")
    cfg = resolve_config(args)
    dec = cfg["decoder"]
    length = dec["max_len"] if args.length is None else args.length
    if not 1 <= length <= dec["max_len"]:
        raise job_flags.FlagError(f"kmm bench decode: --length must be in [1, max_len = "
                                  f"{dec['max_len']}], got {length}")
    import keras
    import numpy as np

    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(args.precision)
    try:
        decoder, context = build_decoder(dec, args.batch_size, cfg["context_len"],
                                         cfg["context_dim"], args.seed)
        jit = resolve_jit(args.jit_compile)
        fns = {"cached": cached_greedy(decoder, length), "full": full_greedy(decoder, length)}
        if args.beam_size:
            fns["beam"] = cached_beam(decoder, length, args.beam_size)
        compiled = {name: compile_fn(decoder, fn, jit) for name, fn in fns.items()}

        tokens, compile_seconds = {}, {}
        for name, fn in compiled.items():
            start = time.perf_counter()
            tokens[name] = keras.ops.convert_to_numpy(fn(context))
            compile_seconds[name] = time.perf_counter() - start
            for _ in range(args.warmup):
                keras.ops.convert_to_numpy(fn(context))
        times = {name: [] for name in compiled}
        for _ in range(args.steps):
            for name, fn in compiled.items():
                start = time.perf_counter()
                result = keras.ops.convert_to_numpy(fn(context))  # on the host: finished
                times[name].append(time.perf_counter() - start)
                if not np.array_equal(result, tokens[name]):
                    raise RuntimeError(f"{name}: a repeated call gave different tokens")

        cached, full = tokens["cached"], tokens["full"]
        equal = cached == full                                             # [B, T]
        mismatched_steps = np.flatnonzero(~equal.all(axis=0))
        backend, device, _ = device_info()
        out: Dict = {
            "backend": backend, "device": device, "kind": args.kind, "preset": args.preset,
            "precision": args.precision, "jit_compile": args.jit_compile,
            "jit_compile_resolved": jit, "batch_size": args.batch_size, "length": length,
            "context_len": cfg["context_len"], "context_dim": cfg["context_dim"],
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
            "sizes": {k: dec[k] for k in ("vocab_size", "max_len", "width", "depth", "heads",
                                          "mlp_dim", "cross_attention")},
            "cross_attention_blocks": list(decoder.cross_layers),
            "params": _count(decoder.trainable_weights),
        }
        for name in compiled:
            seconds = statistics.median(times[name])
            out[name] = {"seconds": round(seconds, 6),
                         "seconds_all": [round(t, 6) for t in times[name]],
                         "tokens_per_second": round(args.batch_size * length / seconds, 2),
                         "ms_per_token_step": round(seconds / length * 1e3, 6),
                         "compile_seconds": round(compile_seconds[name], 3)}
        if "beam" in out:
            out["beam"]["beam_size"] = args.beam_size
        out["speedup"] = round(out["full"]["seconds"] / out["cached"]["seconds"], 3)
        out["same_tokens"] = bool(equal.all())
        out["token_agreement"] = round(float(equal.mean()), 6)
        out["first_mismatch"] = int(mismatched_steps[0]) if mismatched_steps.size else None
        return out
    finally:
        keras.config.set_dtype_policy(previous_policy)


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run(sys.argv[1:]), indent=2, sort_keys=True))
