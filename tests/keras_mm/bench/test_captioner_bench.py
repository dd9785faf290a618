"""`kmm bench captioner` stays runnable, and its matmul FLOP count follows hand computations."""

import json

import keras
import numpy as np
import pytest

from keras_mm import cli
from keras_mm.beam_jobs import job_flags
from keras_mm.bench import captioner as bench_captioner
from keras_mm.bench import two_tower as tt

JAX_ONLY = pytest.mark.skipif(keras.backend.backend() != "jax", reason="FLOPs are counted on JAX")


def test_tiny_captioner_bench_runs(capsys):
    assert cli.main(["bench", "captioner", "--kinds", "cappa", "--steps", "1", "--warmup", "0",
                     "--batch_size", "2", "--max_len", "6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "tiny" and out["batch_size"] == 2 and set(out) >= {"cappa"}
    r = out["cappa"]
    assert r["examples_per_second"] > 0 and r["step_time_ms"] > 0 and r["params"] > 0
    assert r["caption_tokens"] == 6
    assert r["mfu"] is None                                      # no GPU here
    assert (r["train_gflops_per_example"] is None) == (keras.backend.backend() != "jax")


@pytest.mark.parametrize("kind", bench_captioner.KINDS)
def test_random_batch_is_what_each_model_takes(kind):
    model = bench_captioner.build_model(kind, "tiny", max_len=6)
    batch = bench_captioner.random_batch(model, kind, 3, seed=0)
    assert batch["image"].shape == (3, 64, 64, 3) and batch["text"].shape == (3, 6)
    assert (batch["text"][:, 0] == 1).all() and (batch["text"][:, -1] == 2).all()
    assert (batch["text"][:, 1:-1] >= 4).all()
    if kind == "pali":
        assert batch["prompt"].shape == (3, model.max_prompt_len)
    else:
        assert "prompt" not in batch
    outputs = model(batch)                                       # the model takes it as is
    assert outputs["logits"].shape[:2] == (3, 5)


def test_matmul_flops_of_a_jaxpr_match_a_hand_count():
    import jax
    import jax.numpy as jnp

    def f(x, w, a, b, img, kernel):
        y = x @ w                                                      # 2 * 5*7 * 3
        z = jnp.einsum("bij,bjk->bik", a, b)                           # 2 * 4*6*8 * 2
        conv = jax.lax.conv_general_dilated(img, kernel, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # conv: 2 * (1*6*6*4 outputs) * (3*3*2 per output)

        def body(carry, _):
            return carry @ jnp.ones((7, 7)), None                      # 2 * 5*7 * 7, x 3
        carry, _ = jax.lax.scan(body, y, None, length=3)
        inner = jax.jit(lambda u: u @ jnp.ones((7, 2)))(carry)         # nested: 2 * 5*2 * 7
        return inner.sum() + z.sum() + conv.sum()

    args = (np.ones((5, 3)), np.ones((3, 7)), np.ones((4, 6, 2)), np.ones((4, 2, 8)),
            np.ones((1, 8, 8, 2)), np.ones((3, 3, 2, 4)))
    jaxpr = jax.make_jaxpr(f)(*args)
    expected = (2 * 35 * 3 + 2 * 192 * 2 + 2 * 144 * 18 + 3 * 2 * 35 * 7 + 2 * 10 * 7)
    assert bench_captioner.count_matmul_flops(jaxpr) == expected

    def loop(x):
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))
    with pytest.raises(ValueError, match="while"):
        bench_captioner.count_matmul_flops(jax.make_jaxpr(loop)(np.ones((2, 2))))


@JAX_ONLY
@pytest.mark.both_backends
def test_traced_flops_of_a_two_tower_match_its_analytical_count():
    """The jaxpr count of a SigLIP two-tower equals kmm bench two-tower's formula up to the
    B x B logits and the MAP probe's single-query attention the formula rounds away."""
    args = tt.build_parser().parse_args(["--width", "64", "--depth", "2", "--heads", "2",
                                         "--mlp_dim", "128", "--image_size", "32",
                                         "--patch_size", "8", "--vocab_size", "100",
                                         "--max_len", "12"])
    sizes = dict(tt.resolve_sizes(args), preset="tiny")
    model = tt.build_ours(sizes)
    images, tokens = tt.random_batch(sizes, 4, seed=0)
    traced = 3 * bench_captioner.forward_flops(model, {"image": images, "text": tokens}) / 4
    assert traced == pytest.approx(tt.train_flops_per_example(sizes), rel=0.02)


def test_bad_flags():
    with pytest.raises(job_flags.FlagError, match="kinds"):
        bench_captioner.run(["--kinds", "coca,blip"])
    with pytest.raises(job_flags.FlagError, match="repeats"):
        bench_captioner.run(["--kinds", "coca,coca"])
    with pytest.raises(job_flags.FlagError, match="batch_size"):
        bench_captioner.run(["--batch_size", "0"])
    with pytest.raises(job_flags.FlagError, match="max_len"):
        bench_captioner.run(["--max_len", "2"])
