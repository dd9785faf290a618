"""`kmm bench moe` stays runnable: expert counts grow the parameters, not the per-token compute."""

import pytest

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import moe as bench_moe


def test_tiny_moe_bench_run():
    out = bench_moe.run(["--experts", "1,4", "--steps", "1", "--warmup", "0",
                         "--batch_size", "4", "--image_size", "32", "--group_size", "64"])
    rows = {r["experts"]: r for r in out["results"]}
    assert sorted(rows) == [1, 4]
    assert rows[1]["moe_blocks"] == rows[4]["moe_blocks"] == [1, 3]
    for r in rows.values():
        assert r["step_time_ms"] > 0 and r["examples_per_second"] > 0
        assert r["mfu"] is None or r["mfu"] > 0
    # 4 experts: 3 more expert MLPs in each of the 2 MoE blocks (+ routers) than 1 expert.
    mlp = 2 * 192 * 768 + 768 + 192
    assert rows[4]["params"] - rows[1]["params"] == 2 * (3 * mlp + 3 * 192)
    assert out["train_gflops_per_example"] > 0 and out["capacity_factor"] == 1.0


def test_bad_flags():
    with pytest.raises(job_flags.FlagError):
        bench_moe.run(["--experts", "4,x"])
    with pytest.raises(job_flags.FlagError):
        bench_moe.run(["--capacity_factor", "0"])
