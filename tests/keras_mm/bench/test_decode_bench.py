"""`kmm bench decode`: cached (KV) greedy decoding gives exactly the tokens of full re-decoding,
and the bench stays runnable with sane figures."""

import json

import numpy as np
import pytest

from keras_mm import cli
from keras_mm.beam_jobs import job_flags
from keras_mm.bench import decode as bench_decode

SMALL = ["--width", "32", "--depth", "2", "--heads", "2", "--vocab_size", "50", "--max_len", "8",
         "--batch_size", "2", "--length", "6", "--steps", "2", "--warmup", "1"]


def _teacher_forced_argmax(decoder, context, tokens):
    """The greedy choice at every position given ``tokens [B, T]`` as the prefix, from one
    plain ``decoder(ids, context)`` call (no cache, no search code), in NumPy: PAD and BOS
    excluded as in generation."""
    from keras import ops

    bos = np.full((tokens.shape[0], 1), decoder.bos_id, "int32")
    ids = np.concatenate([bos, tokens[:, :-1]], axis=1)
    logits = ops.convert_to_numpy(decoder(ops.convert_to_tensor(ids), context)).copy()
    logits[..., [decoder.pad_id, decoder.bos_id]] = -np.inf
    return logits.argmax(-1)


@pytest.mark.both_backends
@pytest.mark.parametrize("kind", ["cappa", "coca"])
def test_cached_and_full_decoding_give_the_call_tokens(kind):
    args = bench_decode.build_parser().parse_args(SMALL + ["--kind", kind])
    cfg = bench_decode.resolve_config(args)
    decoder, context = bench_decode.build_decoder(cfg["decoder"], 3, cfg["context_len"],
                                                  cfg["context_dim"], seed=1)
    jit = bench_decode.resolve_jit("auto")
    length = 7
    cached = np.asarray(bench_decode.compile_fn(
        decoder, bench_decode.cached_greedy(decoder, length), jit)(context))
    full = np.asarray(bench_decode.compile_fn(
        decoder, bench_decode.full_greedy(decoder, length), jit)(context))
    assert cached.shape == full.shape == (3, length)
    # No row stops early (EOS is outside the vocabulary), PAD / BOS are never chosen, and the
    # random model does not emit one constant token (else the check would be vacuous).
    assert cached.min() >= 2 and cached.max() < 50
    assert len(np.unique(cached)) > 2
    reference = _teacher_forced_argmax(decoder, context, cached)
    np.testing.assert_array_equal(cached, reference)
    np.testing.assert_array_equal(full, reference)


@pytest.mark.both_backends
def test_tiny_decode_bench_through_the_cli(capsys):
    assert cli.main(["bench", "decode", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same_tokens"] is True, out
    assert out["token_agreement"] == 1.0 and out["first_mismatch"] is None
    assert out["batch_size"] == 2 and out["length"] == 6 and out["params"] > 0
    assert out["kind"] == "cappa" and out["cross_attention_blocks"] == [0, 1]
    assert out["backend"] and out["device"]
    for mode in ("cached", "full", "beam"):
        r = out[mode]
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 2
        # The JSON rounds seconds to 1 us (5e-7 s of error, 1e-4 ms once divided by 6 tokens
        # and scaled), tokens/s to 2 decimals and ms to 6.
        assert r["tokens_per_second"] == pytest.approx(2 * 6 / r["seconds"], rel=2e-3, abs=0.01)
        assert r["ms_per_token_step"] == pytest.approx(r["seconds"] / 6 * 1e3, rel=1e-3,
                                                       abs=1e-4)
    assert out["beam"]["beam_size"] == 4
    assert out["speedup"] == pytest.approx(out["full"]["seconds"] / out["cached"]["seconds"],
                                           rel=1e-2)


def test_beam_off_and_defaults():
    out = bench_decode.run(SMALL + ["--beam_size", "0", "--steps", "1", "--warmup", "0",
                                    "--length", "3"])
    assert "beam" not in out and out["same_tokens"] is True and out["length"] == 3
    args = bench_decode.build_parser().parse_args([])
    cfg = bench_decode.resolve_config(args)
    # cappa tiny: 2 blocks cross-attending to the 8 x 8 image tokens of the tiny ViT (width 192)
    assert cfg["decoder"]["depth"] == 2 and cfg["decoder"]["max_len"] == 16
    assert (cfg["context_len"], cfg["context_dim"]) == (64, 192)
    assert cfg["decoder"]["eos_id"] == cfg["decoder"]["vocab_size"]
    b16 = bench_decode.resolve_config(bench_decode.build_parser().parse_args(
        ["--preset", "b16", "--kind", "coca"]))
    assert b16["decoder"]["cross_attention"] == "last_12" and b16["context_len"] == 256


@pytest.mark.parametrize("flags", [
    ["--preset", "huge"], ["--kind", "clip"], ["--batch_size", "0"], ["--steps", "0"],
    ["--length", "17"], ["--length", "0"], ["--beam_size", "-1"], ["--width", "31"],
    ["--jit_compile", "maybe"], ["--depth", "0"], ["--batch_size", "x"],
])
def test_bad_flags(flags, capsys):
    with pytest.raises(job_flags.FlagError):
        bench_decode.run(flags)
    assert cli.main(["bench", "decode", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kmm: error: ") and len(err.strip().splitlines()) == 1


def test_help(capsys):
    assert cli.main(["bench", "decode", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--beam_size" in text and "--length" in text and "kmm bench decode" in text
    assert "decode" in cli.BENCHES
