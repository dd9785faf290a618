"""Builds a captioner from a preset name: ``build_captioner("coca", "tiny", vocab_size=V,
max_len=L)`` (``keras_mm.encoders.presets.captioner_config``).

``max_len`` is the pipeline's token length L (BOS .. EOS); the decoder gets ``L - 1`` positions
(teacher forcing drops one token, ``keras_mm.models.captioning``).
"""

from __future__ import annotations

from keras_mm.decoders.text_decoder import TextDecoder
from keras_mm.encoders import presets
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.models.cappa import CapPaModel
from keras_mm.models.coca import CoCaModel
from keras_mm.models.mammut import MaMMUTModel
from keras_mm.models.pali import PaLIModel

CAPTIONERS = {"coca": CoCaModel, "cappa": CapPaModel, "mammut": MaMMUTModel,
              "pali": PaLIModel}


def build_captioner(kind, preset="tiny", *, vocab_size=None, max_len=None,
                    decoder_overrides=None, image_overrides=None, **model_kwargs):
    """A captioner model of ``kind`` (coca, cappa, mammut, pali); ``model_kwargs`` go to the
    model class (e.g. ``blind=True``, ``contrastive="focal"``, ``parallel_fraction=0.5``)."""
    if kind not in CAPTIONERS:
        raise ValueError(f"unknown captioner {kind!r}; valid: {', '.join(sorted(CAPTIONERS))}")
    decoder_overrides = dict(decoder_overrides or {})
    if vocab_size is not None:
        decoder_overrides["vocab_size"] = int(vocab_size)
    if max_len is not None:
        decoder_overrides["max_len"] = int(max_len) - 1
    cfg = {**presets.captioner_config(kind, preset, decoder_overrides, image_overrides),
           **model_kwargs}
    decoder_kwargs = cfg.pop("decoder")
    image = ViTEncoder(**cfg.pop("image"), name="image_encoder")
    cfg.pop("name", None)
    if kind == "coca":
        uni = cfg["unimodal_layers"]
        decoder_kwargs["cross_attention"] = f"last_{decoder_kwargs['depth'] - uni}"
        decoder_kwargs["max_len"] += 1            # the cls token after the text
    if kind in ("coca", "cappa"):
        decoder_kwargs["extra_tokens"] = max(1, decoder_kwargs.get("extra_tokens", 0))
    decoder = TextDecoder(**decoder_kwargs, name="decoder")
    return CAPTIONERS[kind](image, decoder, **cfg, name=f"{kind}_{preset}")
