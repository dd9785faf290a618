"""keras_mm.recipes.clippo: the CLIPPO digits recipe is valid and its rendered prompts fit."""

import pathlib

from keras_mm.pipelines import datasets
from keras_mm.recipes import clippo
from keras_mm.recipes import config as C

TEMPLATES = pathlib.Path(__file__).resolve().parents[3] / "beam_jobs" / "templates"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_clippo_digits_is_valid_and_round_trips():
    cfg = C.validate(clippo.clippo_digits())
    assert cfg.model.kind == "clippo" and cfg.data.input.render_text
    assert C.loads(C.dumps(cfg)) == cfg
    assert C.override(cfg, ["data.input.render_background=127"]).data.input.render_background \
        == 127


def test_every_digits_prompt_fits_the_rendered_page():
    renderer = datasets.text_renderer(clippo.clippo_digits().data.input)
    templates = []
    for name in ("digits_train.txt", "digits_eval.txt"):
        templates += [t for t in (TEMPLATES / name).read_text().splitlines() if t.strip()]
    longest = max(len(t.replace("{}", d)) for t in templates for d in DIGITS)
    assert longest <= renderer.max_chars, (longest, renderer.max_chars)
