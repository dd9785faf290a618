"""kmm train with train.jit_compile=true: the train step is XLA-compiled (string record ids must
stay out of it) for the two-tower and the LIMoE recipes."""

import json

import pytest

from keras_mm.beam_jobs import label_as_text
from keras_mm.recipes import config as C
from keras_mm.training import trainer


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["siglip_digits", "limoe_digits"])
def test_jit_compiled_training(tmp_path_factory, recipe):
    folder = tmp_path_factory.getbasetemp() / "jit_digits"
    if not (folder / "tokenizer.model").exists():
        label_as_text.run(["--source", "digits", "--out", str(folder), "--vocab_size", "400",
                           "--limit", "400"])
    out = tmp_path_factory.mktemp(recipe)
    cfg = C.override(C.get_recipe(recipe), [
        f"data.folder={folder}", f"train.out_dir={out}", "train.steps=4",
        "train.steps_per_epoch=2", "train.checkpoint_every=2", "train.jit_compile=true",
        "optimizer.warmup_steps=1", "data.input.batch_size=16", "eval.max_examples=32"])
    summary, model = trainer.train(cfg, verbose=0)
    assert model.jit_compile and summary["train_steps"] == 4
    assert json.load(open(out / "summary.json"))["metrics"]["zero_shot_top1"] >= 0.0
