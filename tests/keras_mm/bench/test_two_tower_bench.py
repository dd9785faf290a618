"""`kmm bench two-tower` stays runnable: a tiny run gives positive figures for both models."""

import pytest

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import two_tower as bench_two_tower

SMALL = ["--steps", "2", "--warmup", "1", "--batch_size", "4", "--width", "32", "--depth", "1",
         "--heads", "2", "--mlp_dim", "64", "--image_size", "32", "--vocab_size", "100",
         "--max_len", "8"]


def test_tiny_two_tower_bench_run():
    out = bench_two_tower.run(SMALL)
    assert out["preset"] == "tiny" and out["batch_size"] == 4
    assert out["precision"] == "float32" and out["backend"] and out["device"]
    for name in ("ours", "keras_hub"):
        r = out[name]
        assert r["examples_per_second"] > 0 and r["step_time_ms"] > 0 and r["params"] > 0
        assert len(r["step_time_ms_all"]) == 2
    # same sizes -> the same parameter count
    assert out["ours"]["params"] == out["keras_hub"]["params"]
    assert out["ratio"] > 0
    assert out["mfu"] is None or out["mfu"] > 0  # null on CPU


def test_skip_keras_hub_and_bad_flags():
    out = bench_two_tower.run(SMALL + ["--skip_keras_hub", "--steps", "1"])
    assert "keras_hub" not in out and "ratio" not in out and out["ours"]["examples_per_second"] > 0
    with pytest.raises(job_flags.FlagError):
        bench_two_tower.run(["--preset", "huge"])
    with pytest.raises(job_flags.FlagError):
        bench_two_tower.run(["--jit_compile", "maybe"])


def test_flops_formula_b16():
    sizes = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072,
                 vocab_size=32000, max_len=64, embed_dim=768)
    flops = bench_two_tower.train_flops_per_example(sizes)
    # ViT-B/16 forward ~17.6 GMACs = ~35 GFLOPs, x3 for training = ~105; the 12-layer text
    # tower over 64 tokens adds 6 x 85M x 64 = ~33
    assert 130e9 < flops < 150e9
    assert bench_two_tower.peak_tflops("NVIDIA H100 80GB HBM3", "mixed_bfloat16") == 989.0
    assert bench_two_tower.peak_tflops("NVIDIA A100-SXM4-40GB", "mixed_bfloat16") == 312.0
    assert bench_two_tower.peak_tflops("CPU", "float32") is None
