"""`kmm bench flexivit` stays runnable: a tiny run gives the table's keys and sane figures."""

import json

import numpy as np
import pytest

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import flexivit as bench_flexivit

SMALL = ["--steps", "2", "--batch_size", "8", "--width", "16", "--depth", "1", "--heads", "2",
         "--mlp_dim", "32", "--image_size", "24", "--patch_sizes", "4,8", "--eval_limit", "32",
         "--timing_repeats", "1"]


def test_tiny_flexivit_bench_run():
    out = bench_flexivit.run(SMALL)
    json.dumps(out)                                      # printable as JSON
    assert out["patch_sizes"] == [4, 8] and out["train_steps"] == 2
    assert out["eval_examples"] == 32 and out["train_examples"] > 1000
    assert out["sizes"] == {"width": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
    flexi = out["flexivit"]
    assert flexi["base_patch_size"] == 4                # the bench default: the smallest size
    assert sum(flexi["patch_size_counts"].values()) == 2
    assert set(flexi["per_patch_size"]) == set(out["fixed"]) == {"4", "8"}
    for result in list(flexi["per_patch_size"].values()) + list(out["fixed"].values()):
        assert 0.0 <= result["accuracy"] <= 1.0 and result["examples_per_second"] > 0
    for result in out["fixed"].values():
        assert result["params"] > 0 and result["train_seconds"] > 0
    rows = out["table"]
    assert [r["patch_size"] for r in rows] == [4, 8]
    assert [r["tokens"] for r in rows] == [36, 9]
    for r in rows:
        assert r["gap_points"] == pytest.approx(
            100 * (r["flexivit_accuracy"] - r["fixed_accuracy"]), abs=0.02)
    assert out["max_shortfall_points"] >= 0 and isinstance(out["within_2_points"], bool)
    assert out["total_seconds"] > 0


def test_digits_split_by_sample_id():
    x_train, y_train, x_eval, y_eval = bench_flexivit.digits_data(16)
    assert x_train.shape[1:] == (16, 16, 3) and len(x_train) + len(x_eval) == 1797
    assert x_train.min() >= -1.0 - 1e-6 and x_train.max() <= 1.0 + 1e-6
    assert 0.15 < len(x_eval) / 1797 < 0.25 and set(np.unique(y_eval)) == set(range(10))
    # the same ids as the label-as-text job: record i is digits-{i:04d}
    from keras_mm.beam_jobs.dataset_writer import assign_split
    train_ids = [i for i in range(1797) if assign_split(f"digits-{i:04d}", (0.8, 0.1, 0.1))
                 == "train"]
    from sklearn.datasets import load_digits
    np.testing.assert_array_equal(y_train, load_digits().target[train_ids])


def test_bad_flags():
    with pytest.raises(job_flags.FlagError):
        bench_flexivit.run(["--patch_sizes", "4,x"])
    with pytest.raises(job_flags.FlagError, match="exceed"):
        bench_flexivit.run(["--patch_sizes", "8,64", "--image_size", "48"])
    with pytest.raises(job_flags.FlagError, match="preset"):
        bench_flexivit.run(["--preset", "huge"])
