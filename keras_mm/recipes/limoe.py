"""LIMoE recipes: the digits demo (one sparse MoE transformer for digits and their descriptions)
and the paper's B/16 and L/16 layouts.

``limoe_digits`` is ``siglip_digits`` (same data, loss, optimizer, steps) with the two towers
replaced by one LIMoE-tiny transformer of the same width, depth and MLP size: 4 experts in blocks
1 and 3, top-1, capacity factor 1.0, BPR, LIMoE's local and global entropy losses. Per token it
computes what the dense tiny tower computes, so the two are compared at equal per-token compute.
"""

from keras_mm.pipelines.datasets import InputConfig
from keras_mm.recipes.config import (DataConfig, EvalConfig, ExperimentConfig, ExportConfig,
                                     ModelConfig, MoeConfig, OptimizerConfig, TrainConfig)
from keras_mm.recipes.two_tower import siglip_digits


def limoe_digits():
    cfg = siglip_digits()
    cfg.name = "limoe_digits"
    cfg.model = ModelConfig(kind="limoe", preset="tiny", loss="sigmoid",
                            moe=MoeConfig(capacity_factor=1.0, bpr=True))
    cfg.train.out_dir = "runs/demo/limoe_digits"
    cfg.export = ExportConfig(name="limoe_digits")
    return cfg


def _paper(preset):
    return ExperimentConfig(
        name=f"limoe_{preset}",
        data=DataConfig(folder="", input=InputConfig(
            image_size=224, augment="crop_flip", crop_scale=(0.9, 1.0), max_text_len=64,
            batch_size=16_384, shuffle_buffer=250_000)),
        model=ModelConfig(kind="limoe", preset=preset, loss="softmax",
                          moe=MoeConfig(capacity_factor=1.0, bpr=True)),
        optimizer=OptimizerConfig(lr=1e-3, end_lr=0.0, weight_decay=1e-4, warmup_steps=10_000,
                                  clip=1.0, b2=0.95),
        train=TrainConfig(steps=200_000, checkpoint_every=1000, log_every=100,
                          precision="mixed_bfloat16", jit_compile=True, strategy="tpu",
                          out_dir=f"runs/limoe_{preset}"),
        eval=EvalConfig(split="validation", tasks=("zero_shot", "retrieval")),
        export=ExportConfig(name=f"limoe_{preset}"),
    )


def limoe_b16():
    """LIMoE-B/16: 8 experts every other block, top-1, capacity factor 1.0, BPR, CLIP loss."""
    return _paper("b16")


def limoe_l16():
    """LIMoE-L/16: 32 experts every other block (24 blocks), otherwise as limoe_b16."""
    return _paper("l16")
