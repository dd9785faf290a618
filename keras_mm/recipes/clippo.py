"""CLIPPO recipes: one ViT for images and rendered text (Tschannen et al. 2023).

``model.kind = "clippo"``: ``keras_mm.models.clippo.build_clippo(model.preset, model.loss,
image_size=data.input.image_size, embed_dim=model.embed_dim)``; the data has
``input.render_text=True`` (captions rendered as ``text_images``, no tokenizer) and evaluation
goes through ``keras_mm.evaluation.clippo``.
"""

from keras_mm.pipelines.datasets import InputConfig
from keras_mm.recipes.config import (DataConfig, EvalConfig, ExperimentConfig, ExportConfig,
                                     ModelConfig, OptimizerConfig, TrainConfig)


def clippo_digits():
    """CLIPPO-tiny (ViT tiny: 64 px, patch 8, MAP head) on the label-as-text digits.

    The 8x8 digits are upscaled to 64x64 (one digit pixel a patch; never cropped or flipped) and
    the captions rendered at 64x64: 7 px DejaVu Sans Mono in 8x4 cells, 8 lines of 16
    characters, so every digits prompt fits. Softmax (CLIP) loss, t = 10 at init.

    Learning rate: at 3e-4..5e-4 (batch 32..128) each modality collapses to one point within
    ~50 steps (loss stuck at ln(batch)): the rendered prompts differ only in a few glyphs, so at
    init the shared ViT embeds all of them almost identically (cosine 0.999) and the loss first
    removes the remaining variation. At 1e-4 it escapes: zero-shot top-1 0.95 on the test
    digits after 2000 steps of batch 32 (val 0.74 at step 1000, 0.92 at 1250).
    """
    return ExperimentConfig(
        name="clippo_digits",
        data=DataConfig(folder="runs/demo/digits", input=InputConfig(
            image_size=64, augment="none", eval_mode="resize", batch_size=32,
            shuffle_buffer=2048, render_text=True)),
        model=ModelConfig(kind="clippo", preset="tiny", loss="softmax"),
        optimizer=OptimizerConfig(lr=1e-4, end_lr=1e-6, weight_decay=1e-4, warmup_steps=100,
                                  clip=1.0),
        train=TrainConfig(steps=2000, steps_per_epoch=250, checkpoint_every=500, log_every=50,
                          out_dir="runs/demo/clippo_digits"),
        eval=EvalConfig(split="test", batch_size=256, tasks=("zero_shot", "retrieval")),
        export=ExportConfig(name="clippo_digits"),
    )
