"""LiT: a two-tower model whose image tower is a locked digit classifier beats from-scratch
training at equal steps on zero-shot accuracy (the LiT paper's claim, at digit scale)."""

import keras
import pytest

from keras_mm.beam_jobs import label_as_text
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.pipelines import datasets
from keras_mm.recipes import config as C
from keras_mm.training import trainer


@pytest.mark.slow
def test_lit_beats_from_scratch_at_equal_steps(tmp_path):
    folder = str(tmp_path / "digits")
    label_as_text.run(["--source", "digits", "--out", folder, "--vocab_size", "400"])
    # 30 steps of each two-tower run after 100 classifier steps: LiT 0.85 zero-shot, from
    # scratch 0.10 (after 150 classifier steps, 50 two-tower steps gave 0.93 / 0.10 in 1.3x
    # the test's time, and 100 steps 0.96 / 0.10)
    steps = ["train.steps=30", "train.steps_per_epoch=15", "train.checkpoint_every=30",
             "optimizer.warmup_steps=12"]
    cfg = C.override(C.get_recipe("siglip_digits"), [f"data.folder={folder}"] + steps)
    keras.utils.set_random_seed(0)
    # Supervised pre-training of the image tower on the training split's labels only.
    tokenizer = trainer.load_tokenizer(cfg)
    train = datasets.train_dataset(folder, cfg.data.input, tokenizer=tokenizer).map(
        lambda b: (b["image"], b["label"]))
    vit = ViTEncoder(image_size=32, patch_size=8, width=192, depth=4, heads=3, mlp_dim=768,
                     pool="gap", name="vit")
    images = keras.Input((32, 32, 3))
    classifier = keras.Model(images, keras.layers.Dense(10)(vit(images)))
    classifier.compile(optimizer=keras.optimizers.Adam(5e-4), metrics=["accuracy"],
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    classifier.fit(train, steps_per_epoch=100, epochs=1, verbose=0)
    path = str(tmp_path / "digit_classifier.keras")
    classifier.save(path)

    results = {}
    for name, extra in (("lit", ["model.lit=true", f"model.init_checkpoint={path}"]),
                        ("scratch", [])):
        run_cfg = C.override(cfg, [f"train.out_dir={tmp_path / name}"] + extra)
        summary, model = trainer.train(run_cfg, verbose=0)
        results[name] = summary["metrics"]["zero_shot_top1"]
        if name == "lit":
            assert model.lock_image and not model.image_encoder.trainable
    assert results["lit"] > results["scratch"] + 0.2, results
    assert results["lit"] > 0.7, results
