"""Two-tower recipes: SigLIP / CLIP / LiT on the bundled digits (demo, tests) and at paper scale.

Each function returns a complete ExperimentConfig; ``--set path=value`` overrides any field.
"""

from keras_mm.pipelines.datasets import InputConfig
from keras_mm.recipes.config import (DataConfig, EvalConfig, ExperimentConfig, ExportConfig,
                                     ModelConfig, OptimizerConfig, TrainConfig)


def _digits_input(**overrides):
    """8x8 digits upscaled to 32x32; never cropped or flipped (a flipped 2 is no 2)."""
    values = dict(image_size=32, augment="none", eval_mode="resize", max_text_len=16,
                  batch_size=128, shuffle_buffer=2048)
    values.update(overrides)
    return InputConfig(**values)


def siglip_digits():
    """SigLIP, tiny towers (patch 8 on 32x32), label-as-text digits: the demo recipe."""
    return ExperimentConfig(
        name="siglip_digits",
        data=DataConfig(folder="runs/demo/digits", input=_digits_input()),
        model=ModelConfig(kind="two_tower", preset="tiny", loss="sigmoid"),
        # lr 1e-3 collapses the tiny towers on these near-identical 32x32 digits; 5e-4 does not.
        optimizer=OptimizerConfig(lr=5e-4, end_lr=1e-5, weight_decay=1e-4, warmup_steps=60,
                                  clip=1.0),
        train=TrainConfig(steps=600, steps_per_epoch=100, checkpoint_every=200, log_every=20,
                          out_dir="runs/demo/siglip_digits"),
        eval=EvalConfig(split="test", batch_size=256, tasks=("zero_shot", "retrieval")),
        export=ExportConfig(name="siglip_digits"),
    )


def clip_digits():
    """CLIP's softmax loss (temperature 0.07, scale clipped at 100), otherwise siglip_digits."""
    cfg = siglip_digits()
    cfg.name = "clip_digits"
    cfg.model.loss = "softmax"
    cfg.train.out_dir = "runs/demo/clip_digits"
    cfg.export.name = "clip_digits"
    return cfg


def siglip_b16():
    """SigLIP B/16 at paper scale (224px, 64 tokens, batch 32k on a pod; override the batch)."""
    return ExperimentConfig(
        name="siglip_b16",
        data=DataConfig(folder="", input=InputConfig(
            image_size=224, augment="crop_flip", crop_scale=(0.9, 1.0), max_text_len=64,
            batch_size=32_768, shuffle_buffer=250_000)),
        model=ModelConfig(kind="two_tower", preset="b16", loss="sigmoid", chunked=True),
        optimizer=OptimizerConfig(lr=1e-3, end_lr=0.0, weight_decay=1e-4, warmup_steps=5000,
                                  clip=1.0, b2=0.95),
        train=TrainConfig(steps=100_000, checkpoint_every=1000, log_every=100,
                          precision="mixed_bfloat16", jit_compile=True, strategy="tpu",
                          out_dir="runs/siglip_b16"),
        eval=EvalConfig(split="validation", tasks=("zero_shot", "retrieval")),
        export=ExportConfig(name="siglip_b16"),
    )
