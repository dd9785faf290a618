"""`kmm bench video` stays runnable, and its FLOP count follows the hand computation."""

import pytest

from keras_mm.beam_jobs import job_flags
from keras_mm.bench import video as bench_video


def test_tiny_video_bench_run():
    out = bench_video.run(["--steps", "1", "--warmup", "0", "--batch_size", "2",
                           "--num_clips", "16", "--num_batches", "2"])
    assert out["num_frames"] == 8 and out["image_size"] == 32 and out["tubes"] == "clip8"
    assert out["pipeline"]["clips_per_second"] > 0 and out["pipeline"]["clips"] == 16
    for name in ("tubevit", "frame_average"):
        r = out["train_step"][name]
        assert r["clips_per_second"] > 0 and r["step_time_ms"] > 0 and r["params"] > 0
        assert r["mfu"] is None                                   # no GPU here


def test_flops_match_a_hand_count():
    sizes = bench_video.resolve(bench_video.build_parser().parse_args([]))
    model = bench_video.build_model(sizes, "tubevit")
    w, m, depth = 192, 768, 4                                    # the tiny preset
    # clip8 tubes on 8 x 32 x 32: 32 + 16 + 18 + 32 tokens with kernels 4x8x8, 8x4x4, 2x6x6,
    # 1x8x8 (preset docstring); 6 FLOPs per multiply-add of training, 3 input channels.
    n = 98
    embed = 6 * 3 * w * (32 * 256 + 16 * 128 + 18 * 72 + 32 * 64)
    blocks = 6 * depth * (4 * w * w + 2 * w * m) * n + 12 * depth * n * n * w
    assert bench_video.video_tower_flops(model, sizes, "tubevit") == pytest.approx(embed + blocks)
    frame = bench_video.build_model(sizes, "frame_average")
    per_frame = (6 * depth * (4 * w * w + 2 * w * m) * 16 + 12 * depth * 16 * 16 * w
                 + 6 * 64 * 3 * w * 16)                          # 16 patches of 8 x 8
    assert bench_video.video_tower_flops(frame, sizes, "frame_average") == pytest.approx(
        8 * per_frame)


def test_bad_flags():
    with pytest.raises(job_flags.FlagError, match="encoders"):
        bench_video.run(["--encoders", "3dcnn"])
    with pytest.raises(job_flags.FlagError):
        bench_video.run(["--batch_size", "0", "--skip_pipeline"])
