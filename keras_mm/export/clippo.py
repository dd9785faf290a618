"""SavedModel export of a CLIPPO model: the two-tower signatures (DESIGN.md), with text rendered
inside the graph.

    from keras_mm.export.clippo import export_clippo
    export_clippo(model, renderer, input_config, eval_templates, "saved_models/clippo_digits/1",
                  class_names=names)

``embed_text`` / ``classify`` / ``classify_classes`` take raw strings like the two-tower export;
each string is rendered with the :class:`~keras_mm.pipelines.ops.render_text.TextRenderer` the
model was trained with (its glyph table is a constant of the SavedModel: no font file and no
Python at serving time) and embedded by the same ViT as the images. ``keras_mm_export.json``
records the renderer's layout instead of a vocabulary.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import tensorflow as tf

from keras_mm.export import two_tower
from keras_mm.pipelines.datasets import InputConfig
from keras_mm.pipelines.ops import text as text_ops


class ClippoExportModule(two_tower.TwoTowerExportModule):
    """``TwoTowerExportModule`` whose text path renders strings instead of tokenizing them.

    ``tokenizer`` is the renderer (a tracked tf.Module, saved with the export)."""

    def __init__(self, model, renderer, input_config: InputConfig,
                 eval_templates: Sequence[str], class_names: Optional[Sequence[str]] = None):
        super().__init__(model, renderer, input_config, eval_templates,
                         name="clippo_export", class_names=class_names)

    def _build(self, model) -> int:
        size = self.image_size
        pixels = tf.zeros([1, size, size, 3])
        try:
            image_dim = int(model.embed_image(pixels).shape[-1])
            text_dim = int(model.embed_text(self.tokenizer(tf.constant(["a"]))).shape[-1])
        except Exception as e:
            raise ValueError(f"the CLIPPO encoder does not take [1, {size}, {size}, 3] images "
                             f"(input_config.image_size={size}): {e}") from e
        if image_dim != text_dim:
            raise ValueError(f"image embeddings have {image_dim} dims, text {text_dim}")
        return image_dim

    def _check_texts(self, text, name: str):
        ok = tf.strings.length(text_ops.normalize_text(text)) > 0
        message = tf.strings.format(f"{name}[{{}}] is empty (or only whitespace)",
                                    two_tower._first_bad(ok))
        return two_tower._check(ok, message, text)

    def _text_embedding(self, text):
        images = self.tokenizer(text)                                        # [N, S, S, 3]
        return self._model.obj.embed_text(images, training=False)           # [N, D]

    def _text_info(self) -> Dict[str, Any]:
        renderer = self.tokenizer
        return {"renderer": {"font_size": float(renderer.font_size),
                             "cell_size": list(renderer.cell_size),
                             "lines": int(renderer.lines),
                             "chars_per_line": int(renderer.chars_per_line),
                             "max_chars": int(renderer.max_chars)}}

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info.pop("add_bos", None)
        info["max_len"] = int(self.tokenizer.max_chars)
        return info

def export_clippo(model, renderer, input_config: InputConfig, eval_templates: Sequence[str],
                  export_dir: str, *, class_names: Optional[Sequence[str]] = None,
                  warmup: bool = True, overwrite: bool = False) -> str:
    """Writes a CLIPPO model as a TF Serving version folder (see ``export_two_tower``)."""
    module = ClippoExportModule(model, renderer, input_config, eval_templates,
                                class_names=class_names)
    return two_tower.write_export(module, export_dir, warmup=warmup, overwrite=overwrite)
