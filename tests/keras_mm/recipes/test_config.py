"""keras_mm.recipes.config: typed configs, --set overrides, JSON files, named recipes."""

import dataclasses
import json
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest

from keras_mm.pipelines.datasets import InputConfig
from keras_mm.recipes import config as C


def base():
    return C.ExperimentConfig()


# ------------------------------------------------------------------------------------- structure
def test_experiment_nests_one_dataclass_per_concern_and_embeds_input_config():
    config = base()
    assert isinstance(config.data, C.DataConfig)
    assert isinstance(config.data.input, InputConfig)  # the pipelines' own class
    assert isinstance(config.model, C.ModelConfig)
    assert isinstance(config.optimizer, C.OptimizerConfig)
    assert isinstance(config.train, C.TrainConfig)
    assert isinstance(config.eval, C.EvalConfig)
    assert isinstance(config.export, C.ExportConfig)
    for field in ("lr", "weight_decay", "warmup_steps", "total_steps", "clip", "accumulation", "b1",
                  "b2"):
        assert hasattr(config.optimizer, field)
    for field in ("steps", "checkpoint_every", "keep", "log_every", "seed", "precision",
                  "jit_compile", "strategy", "tpu", "out_dir"):
        assert hasattr(config.train, field)


def test_choices_match_the_training_modules():
    from keras_mm.training import mixed_precision, strategy

    assert C.STRATEGIES == strategy.KINDS
    assert C.PRECISIONS == mixed_precision.PRECISIONS
    hints = C._fields(C.TrainConfig)
    assert hints["strategy"].__args__ == strategy.KINDS
    assert hints["precision"].__args__ == mixed_precision.PRECISIONS


# ------------------------------------------------------------------------------------- overrides
def test_override_parses_each_type():
    config = C.override(base(), [
        "train.steps=2e3",
        "train.checkpoint_every=1_000",
        "optimizer.lr=3e-4",
        "optimizer.clip=none",
        "optimizer.total_steps=4000",
        "train.jit_compile=yes",
        "model.chunked=TRUE",
        "model.lit=0",
        "model.loss=softmax",
        "train.strategy=mirrored",
        "train.tpu=grpc://10.0.0.2:8470",
        "train.devices=/cpu:0,/cpu:1",
        "data.input.crop_scale=(0.5, 1)",
        "data.input.crop_ratio=[0.75, 1.25]",
        "eval.tasks=zero_shot, retrieval",
        "data.folder='/data/my digits'",
        "name=\"none\"",
    ])
    assert config.train.steps == 2000 and isinstance(config.train.steps, int)
    assert config.train.checkpoint_every == 1000
    assert config.optimizer.lr == 3e-4
    assert config.optimizer.clip is None
    assert config.optimizer.total_steps == 4000
    assert config.train.jit_compile is True and config.model.chunked is True
    assert config.model.lit is False
    assert config.model.loss == "softmax" and config.train.strategy == "mirrored"
    assert config.train.tpu == "grpc://10.0.0.2:8470"
    assert config.train.devices == ("/cpu:0", "/cpu:1")
    assert config.data.input.crop_scale == (0.5, 1.0)
    assert all(isinstance(v, float) for v in config.data.input.crop_scale)
    assert config.data.input.crop_ratio == (0.75, 1.25)
    assert config.eval.tasks == ("zero_shot", "retrieval")
    assert config.data.folder == "/data/my digits"
    assert config.name == "none"  # quoted: the word, not None


def test_override_returns_a_copy():
    original = base()
    changed = C.override(original, ["train.steps=10", "data.input.image_size=32"])
    assert changed.train.steps == 10 and changed.data.input.image_size == 32
    assert original.train.steps == 1000 and original.data.input.image_size == 224


def test_override_section_with_json_object_merges():
    config = C.override(base(), ["model.loss=softmax", 'model={"preset": "s16", "lit": true}',
                                 'data={"input": {"image_size": 64}}'])
    assert config.model.preset == "s16" and config.model.lit is True
    assert config.model.loss == "softmax"              # kept: merged, not replaced
    assert config.data.input.image_size == 64
    assert config.data.input.batch_size == 256


def test_override_order_does_not_matter_for_cross_field_checks():
    # accumulation 4 does not divide checkpoint_every 500; both set: fine in either order.
    for assignments in (["optimizer.accumulation=4", "train.checkpoint_every=400"],
                        ["train.checkpoint_every=400", "optimizer.accumulation=4"]):
        config = C.override(base(), assignments)
        assert config.optimizer.accumulation == 4 and config.train.checkpoint_every == 400


@pytest.mark.parametrize("assignment, message", [
    ("train.stepz=1", r"train\.stepz: unknown field of TrainConfig; valid fields: steps, "
                      r"steps_per_epoch, checkpoint_every"),
    ("trian.steps=1", r"trian: unknown field of ExperimentConfig \(in trian\.steps\); valid fields: "
                      r"name, data, model, optimizer, train, eval, export"),
    ("data.input.imagesize=3", r"data\.input\.imagesize: unknown field of InputConfig; valid "
                               r"fields: image_size"),
    ("train.steps=abc", r"train\.steps='abc': expected int"),
    ("train.steps=1.5", r"train\.steps='1\.5': expected int"),
    ("optimizer.lr=fast", r"optimizer\.lr='fast': expected float"),
    ("train.jit_compile=maybe", r"train\.jit_compile='maybe': expected bool \(true/false\)"),
    ("model.loss=hinge", r"model\.loss='hinge': expected one of 'sigmoid', 'softmax'"),
    ("train.strategy=gpu", r"expected one of 'one_device', 'mirrored', 'multi_worker', 'tpu'"),
    ("train.steps=none", r"train\.steps='none': expected int"),
    ("data.input.crop_scale=1,2,3", r"data\.input\.crop_scale='1,2,3': expected tuple \(float, "
                                    r"float\) \(2 items, got 3\)"),
    ("train.steps.value=1", r"train\.steps\.value: train\.steps is a field of type int, not a "
                            r"section"),
    ("train.steps", r"override 'train\.steps' is not path\.to\.field=value"),
    ("train..steps=1", r"empty field name"),
    ('model={"presets": "s16"}', r"model\.presets: unknown field of ModelConfig"),
    ('model=[1]', r"model='\[1\]': expected ModelConfig"),
    ("data.input.image_size=-1", r"data\.input: InputConfig: image_size must be positive"),
    ("optimizer.lr=0", r"optimizer: lr must be > 0"),
    ("train.steps_per_epoch=7", r"train: steps_per_epoch \(7\) must divide steps \(1000\)"),
    ("optimizer.accumulation=3", r"train\.checkpoint_every \(500\) must be a multiple of "
                                 r"optimizer\.accumulation \(3\)"),
    ("eval.tasks=zero_shot,probe", r"eval\.tasks: unknown \['probe'\]; valid: zero_shot, "
                                   r"retrieval, linear_probe, few_shot"),
    ("eval.every_steps=0", r"eval\.every_steps must be positive or none"),
    ("eval.shots=5,0", r"eval\.shots must be positive"),
])
def test_bad_overrides_name_the_path_and_what_is_valid(assignment, message):
    with pytest.raises(C.ConfigError, match=message):
        C.override(base(), [assignment])


def test_parse_value_of_other_types():
    assert C.parse_value("[1, 2]", List[int]) == [1, 2]
    assert C.parse_value("1,2,3", Tuple[int, ...]) == (1, 2, 3)
    assert C.parse_value("", Tuple[str, ...]) == ()
    assert C.parse_value('{"a": 1}', Dict[str, int]) == {"a": 1}
    assert C.parse_value("null", Optional[Tuple[str, ...]]) is None
    with pytest.raises(C.ConfigError, match=r"x\[1\]='b': expected int"):
        C.parse_value("1,b", Tuple[int, ...], "x")


# ----------------------------------------------------------------------------- dicts and files
def test_dict_and_json_round_trip_preserve_types(tmp_path):
    config = C.override(base(), ["train.devices=a,b", "optimizer.no_decay=bias$,embed"])
    data = C.to_dict(config)
    assert data["train"]["devices"] == ["a", "b"]                 # JSON-ready
    json.dumps(data)
    assert C.from_dict(C.ExperimentConfig, data) == config        # tuples back
    path = C.save(config, tmp_path / "sub" / "config.json")
    saved = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert saved["__config__"] == "keras_mm.recipes.config:ExperimentConfig"
    loaded = C.load(path)
    assert loaded == config
    assert isinstance(loaded.data.input, InputConfig)
    assert loaded.data.input.crop_scale == (0.08, 1.0)
    assert not list(tmp_path.glob("sub/*.tmp-*"))                 # atomic write left nothing


def test_from_dict_is_partial_and_strict():
    config = C.from_dict(C.ExperimentConfig, {"train": {"steps": 10, "checkpoint_every": 5}})
    assert config.train.steps == 10 and config.model == C.ModelConfig()
    with pytest.raises(C.ConfigError, match=r"train\.stepz: unknown field of TrainConfig"):
        C.from_dict(C.ExperimentConfig, {"train": {"stepz": 10}})
    with pytest.raises(C.ConfigError, match=r"train\.steps='10': expected int"):
        C.from_dict(C.ExperimentConfig, {"train": {"steps": "10"}})
    with pytest.raises(C.ConfigError, match=r"train\.jit_compile=1: expected bool"):
        C.from_dict(C.ExperimentConfig, {"train": {"jit_compile": 1}})
    with pytest.raises(C.ConfigError, match=r"train\.steps=True: expected int"):
        C.from_dict(C.ExperimentConfig, {"train": {"steps": True}})
    with pytest.raises(C.ConfigError, match=r"train=3: expected TrainConfig \(JSON object\)"):
        C.from_dict(C.ExperimentConfig, {"train": 3})


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(C.ConfigError, match=r"bad\.json: config is not valid JSON"):
        C.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"train": {"steps": -1}}')
    with pytest.raises(C.ConfigError, match=r"wrong\.json: train: steps must be >= 1"):
        C.load(wrong)


def test_load_uses_the_recorded_class(tmp_path):
    @dataclasses.dataclass
    class Small:
        steps: int = 1

    path = C.save(C.TrainConfig(steps=7, checkpoint_every=7), tmp_path / "train.json")
    assert C.load(path) == C.TrainConfig(steps=7, checkpoint_every=7)
    assert C.loads('{"steps": 3}', cls=Small) == Small(steps=3)


# ---------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", C.recipe_names())
def test_every_named_recipe_builds_a_valid_experiment(name):
    config = C.get_recipe(name)
    assert isinstance(config, C.ExperimentConfig)
    assert C.loads(C.dumps(config)) == config


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(C.ConfigError, match="unknown recipe 'nope'; available: .*default"):
        C.get_recipe("nope")


def test_recipes_package_import_has_no_side_effects():
    code = ("import sys, keras_mm.recipes; "
            "print(sorted(m for m in sys.modules if m.startswith('keras_mm.recipes.') "
            "or m.split('.')[0] in ('keras', 'tensorflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
