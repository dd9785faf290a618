"""Encoder presets by name, resolved here and nowhere else.

Families:

* ``"vit"`` - image towers (``ViTEncoder`` kwargs), sizes of Dosovitskiy et al. 2021 Table 1:

  ====== ===== ===== ===== ===== ======= =========
  name   image patch width depth heads   mlp_dim
  ====== ===== ===== ===== ===== ======= =========
  tiny   64    8     192   4     3       768
  s16    224   16    384   12    6       1536
  b16    224   16    768   12    12      3072
  l16    224   16    1024  24    16      4096
  ====== ===== ===== ===== ===== ======= =========

* ``"text"`` - text towers (``TextEncoder`` kwargs). We follow SigLIP (Zhai et al. 2023) and LiT:
  the text tower has the image tower's width / depth / heads / MLP (big_vision ``txt.variant`` =
  the image variant), 64 tokens and a 32k vocabulary, bidirectional and pooled at the last token.
  Reasons: SigLIP is the method of the demo and of the benchmark against keras-hub's
  ``SigLIPBackbone`` (same sizes), and equal widths let one embedding width serve both towers.
  CLIP (Radford et al. 2021) instead used a 63M-parameter text transformer (width 512, 8 heads,
  12 layers, 77 tokens, 49 408 BPE tokens, causal, pooled at EOS) for every image tower up to
  ViT-B/16; that exact tower is the extra preset ``clip_b16``.
  ``tiny`` has 16 tokens and a 1000-token vocabulary (the tokenizer job's default size); give
  ``vocab_size=`` from the trained tokenizer.

* ``"two_tower"`` - an image preset, a text preset and the shared embedding width;
  ``two_tower_config(name, style)`` adds the heads and pooling of SigLIP (MAP image pooling with
  no image projection - the MAP output is the embedding - and a linear text head, as big_vision's
  ``out_dim=(None, width)`` and keras-hub) or CLIP (class token and EOS pooling, bias-free linear
  projections on both towers).

* ``"tubevit"`` - video towers (``TubeViTEncoder`` kwargs; Piergiovanni et al. 2023). ``b16``
  and ``l16`` are the ViT-B / ViT-L sizes on 32 frames of 224 x 224 with the paper's four tubes
  (Sec. 4.1, ``keras_mm.layers.tube_embedding.PAPER_TUBES``; 539 tokens). ``tiny`` is ours: the
  tiny ViT on 16 frames of 64 x 64, with the paper's tubes scaled down (kernels, strides and
  offsets halved, but the 4 x 4 spatial kernel kept and the first tube 4 x 8 x 8, so that
  tubes 1 and 4 cover the tiny ViT's 8 px patches; 176 tokens):

  ==== ============ ============ =========== ========== ========== =========
  tube b16 kernel   b16 stride   b16 offset  tiny kern. tiny strd. tiny off.
  ==== ============ ============ =========== ========== ========== =========
  1    8 x 8 x 8    16 x 32 x 32 0           4 x 8 x 8  8 x 16 x16 0
  2    16 x 4 x 4   6 x 32 x 32  (4, 8, 8)   8 x 4 x 4  3 x 16 x16 (2, 4, 4)
  3    4 x 12 x 12  16 x 32 x 32 (0, 16, 16) 2 x 6 x 6  8 x 16 x16 (0, 8, 8)
  4    1 x 16 x 16  32 x 16 x 16 0           1 x 8 x 8  16 x 8 x 8 0
  ==== ============ ============ =========== ========== ========== =========

  The MaMMUT video variant is the override ``image_position_embedding=True``. Named tube sets
  (``tube_set(name)``, ``TUBE_SETS``) swap the tubes of a preset: "paper", "tiny" and "clip8",
  ours for 8 frames of 32 x 32 (the moving-digits clips; 98 tokens): 4 x 8 x 8 at stride
  4 x 8 x 8; 8 x 4 x 4 at stride 8 x 8 x 8, offset (0, 2, 2); 2 x 6 x 6 at stride 4 x 8 x 8,
  offset (1, 4, 4); 1 x 8 x 8 image patches at stride 4 x 8 x 8 (frames 0 and 4).

Every getter returns a fresh dict; keyword overrides replace preset values, so
``vit_config("b16", pool="map", remat=True)`` is the ViT-B/16 with a MAP head and
gradient checkpointing.

Architecture options of later papers are overrides too:

* ViT-22B (Dehghani et al. 2023) blocks: ``vit22b_style(vit_config("b16"))`` =
  ``vit_config("b16", block="parallel", qk_norm=True, qkv_bias=False)`` - parallel attention +
  MLP on one shared norm, QK normalisation, no QKV biases, norms without centring or bias
  (RMSNorm), MLP biases kept.
* FlexiViT (Beyer et al. 2023): ``vit_config("b16", patch_sizes=(8, 10, 12, 16, 20, 24, 32))``
  trains with one random patch size per step (``keras_mm.encoders.vit.FlexiPatchSizeCallback``).
"""

from __future__ import annotations

import copy

VIT = {
    "tiny": dict(image_size=64, patch_size=8, width=192, depth=4, heads=3, mlp_dim=768),
    "s16": dict(image_size=224, patch_size=16, width=384, depth=12, heads=6, mlp_dim=1536),
    "b16": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_dim=3072),
    "l16": dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16, mlp_dim=4096),
}

_PAPER_TUBES = [[[8, 8, 8], [16, 32, 32], [0, 0, 0]],
                [[16, 4, 4], [6, 32, 32], [4, 8, 8]],
                [[4, 12, 12], [16, 32, 32], [0, 16, 16]],
                [[1, 16, 16], [32, 16, 16], [0, 0, 0]]]
_TINY_TUBES = [[[4, 8, 8], [8, 16, 16], [0, 0, 0]],
               [[8, 4, 4], [3, 16, 16], [2, 4, 4]],
               [[2, 6, 6], [8, 16, 16], [0, 8, 8]],
               [[1, 8, 8], [16, 8, 8], [0, 0, 0]]]
# 8 frames of 32 x 32 (the moving-digits clips), patch 8: 32 + 16 + 18 + 32 = 98 tokens.
_CLIP8_TUBES = [[[4, 8, 8], [4, 8, 8], [0, 0, 0]],
                [[8, 4, 4], [8, 8, 8], [0, 2, 2]],
                [[2, 6, 6], [4, 8, 8], [1, 4, 4]],
                [[1, 8, 8], [4, 8, 8], [0, 0, 0]]]
# Named tube sets (``model.video.tubes`` in the recipes).
TUBE_SETS = {"paper": _PAPER_TUBES, "tiny": _TINY_TUBES, "clip8": _CLIP8_TUBES}
TUBEVIT = {
    "tiny": dict(video_size=[16, 64, 64], tubes=_TINY_TUBES, width=192, depth=4, heads=3,
                 mlp_dim=768),
    "b16": dict(video_size=[32, 224, 224], tubes=_PAPER_TUBES, width=768, depth=12, heads=12,
                mlp_dim=3072),
    "l16": dict(video_size=[32, 224, 224], tubes=_PAPER_TUBES, width=1024, depth=24, heads=16,
                mlp_dim=4096),
}

TEXT = {
    "tiny": dict(vocab_size=1000, max_len=16, width=192, depth=4, heads=3, mlp_dim=768),
    "s16": dict(vocab_size=32_000, max_len=64, width=384, depth=12, heads=6, mlp_dim=1536),
    "b16": dict(vocab_size=32_000, max_len=64, width=768, depth=12, heads=12, mlp_dim=3072),
    "l16": dict(vocab_size=32_000, max_len=64, width=1024, depth=24, heads=16, mlp_dim=4096),
    "clip_b16": dict(vocab_size=49_408, max_len=77, width=512, depth=12, heads=8, mlp_dim=2048,
                     causal=True, pool="eos", layer_norm_epsilon=1e-5),
}

TWO_TOWER = {
    "tiny": dict(image="tiny", text="tiny", embed_dim=192),
    "s16": dict(image="s16", text="s16", embed_dim=384),
    "b16": dict(image="b16", text="b16", embed_dim=768),
    "l16": dict(image="l16", text="l16", embed_dim=1024),
    "clip_b16": dict(image="b16", text="clip_b16", embed_dim=512, style="clip"),
}

# LIMoE (Mustafa et al. 2022): the ViT sizes above for the shared one-tower transformer, top-1
# routing, capacity factor 1.0, Batch Priority Routing, MoE in every other block (V-MoE's
# "Every-2", which LIMoE builds on). B/16 has 8 experts and L/16 32, the paper's main models.
# tiny (4 experts, 2 of 4 blocks sparse) is the digits demo's, with the dense tiny sizes so the
# per-token compute equals the dense two-tower tiny model's. tau (the global entropy threshold,
# in experts) and the loss weights are our defaults for these sizes.
LIMOE = {
    "tiny": dict(encoder=dict(image_size=64, patch_size=8, vocab_size=1000, max_len=16,
                              width=192, depth=4, heads=3, mlp_dim=768, num_experts=4,
                              moe_every=2, group_size=512),
                 losses=dict(local_entropy_weight=0.05, global_entropy_weight=0.05,
                             global_entropy_tau=4.0)),
    "b16": dict(encoder=dict(image_size=224, patch_size=16, vocab_size=32_000, max_len=64,
                             width=768, depth=12, heads=12, mlp_dim=3072, num_experts=8,
                             moe_every=2, group_size=1024),
                losses=dict(local_entropy_weight=0.01, global_entropy_weight=0.01,
                            global_entropy_tau=4.0)),
    "l16": dict(encoder=dict(image_size=224, patch_size=16, vocab_size=32_000, max_len=64,
                             width=1024, depth=24, heads=16, mlp_dim=4096, num_experts=32,
                             moe_every=2, group_size=1024),
                losses=dict(local_entropy_weight=0.01, global_entropy_weight=0.01,
                            global_entropy_tau=8.0)),
}

# Captioners (CoCa, CapPa, MaMMUT, PaLI-style): an image preset and a text decoder
# (``TextDecoder`` kwargs). b16 sizes: CoCa-Base (Yu et al. 2022 Table 1: ViT-B encoder, 12
# unimodal + 12 multimodal decoder layers of width 768, 256 captioning queries); CapPa B/16
# (Tschannen et al. 2023: a 6-layer decoder of the encoder's width, cross-attending everywhere);
# MaMMUT (Kuo et al. 2023: one 12-layer decoder, cross-attention in every other layer);
# PaLI-style: a 6-layer encoder over visual + prompt tokens and a 6-layer decoder. ``tiny`` is
# the digit-scenes demo's (64 px images; 16 tokens; give ``vocab_size`` of the tokenizer).
_TINY_DECODER = dict(vocab_size=1000, max_len=16, width=192, heads=3, mlp_dim=768)
_B16_DECODER = dict(vocab_size=32_000, max_len=64, width=768, heads=12, mlp_dim=3072)
CAPTIONER = {
    "coca": {
        "tiny": dict(image="tiny", decoder=dict(_TINY_DECODER, depth=4), unimodal_layers=2,
                     num_caption_queries=16, pooler_heads=3),
        "b16": dict(image="b16", decoder=dict(_B16_DECODER, depth=24), unimodal_layers=12,
                    num_caption_queries=256, pooler_heads=12),
    },
    "cappa": {
        "tiny": dict(image="tiny", decoder=dict(_TINY_DECODER, depth=2, cross_attention="all")),
        "b16": dict(image="b16", decoder=dict(_B16_DECODER, depth=6, cross_attention="all")),
    },
    "mammut": {
        "tiny": dict(image="tiny", decoder=dict(_TINY_DECODER, depth=4,
                                                cross_attention="every_other")),
        "b16": dict(image="b16", decoder=dict(_B16_DECODER, depth=12,
                                              cross_attention="every_other")),
    },
    "pali": {
        "tiny": dict(image="tiny", decoder=dict(_TINY_DECODER, depth=2, cross_attention="all"),
                     encoder_depth=2, max_prompt_len=16),
        "b16": dict(image="b16", decoder=dict(_B16_DECODER, depth=6, cross_attention="all"),
                    encoder_depth=6, max_prompt_len=32),
    },
}

FAMILIES = {"vit": VIT, "tubevit": TUBEVIT, "text": TEXT, "two_tower": TWO_TOWER,
            "limoe": LIMOE,
            **{f"captioner_{kind}": table for kind, table in CAPTIONER.items()}}
STYLES = ("siglip", "clip")


def names(family):
    """The preset names of a family (``"vit"``, ``"tubevit"``, ``"text"``, ``"two_tower"``...)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown preset family {family!r}; valid: {sorted(FAMILIES)}")
    return sorted(FAMILIES[family])


def _lookup(family, name):
    table = FAMILIES[family]
    if name not in table:
        raise ValueError(f"unknown {family} preset {name!r}; valid names: "
                         f"{', '.join(sorted(table))}")
    return copy.deepcopy(table[name])


def vit_config(name, **overrides):
    """``ViTEncoder`` kwargs of an image preset, with overrides."""
    return {**_lookup("vit", name), **overrides}


def tube_set(name):
    """The tube specs of a named tube set (``TUBE_SETS``: "paper", "tiny", "clip8")."""
    if name not in TUBE_SETS:
        raise ValueError(f"unknown tube set {name!r}; valid: {', '.join(sorted(TUBE_SETS))}")
    return copy.deepcopy(TUBE_SETS[name])


def tubevit_config(name, **overrides):
    """``TubeViTEncoder`` kwargs of a video preset, with overrides (e.g.
    ``tubevit_config("b16", image_position_embedding=True)`` for MaMMUT's video encoder)."""
    return {**_lookup("tubevit", name), **overrides}


VIT22B_STYLE = dict(block="parallel", qk_norm=True, qkv_bias=False)


def vit22b_style(config, **overrides):
    """``ViTEncoder`` kwargs with ViT-22B's blocks (``VIT22B_STYLE``) and then ``overrides``,
    e.g. ``vit22b_style(vit_config("b16"))``; returns a new dict."""
    return {**copy.deepcopy(config), **VIT22B_STYLE, **overrides}


def text_config(name, **overrides):
    """``TextEncoder`` kwargs of a text preset, with overrides."""
    return {**_lookup("text", name), **overrides}


def two_tower_config(name, style=None, image_overrides=None, text_overrides=None):
    """``{"image": ViTEncoder kwargs, "text": TextEncoder kwargs, "embed_dim": int}``.

    ``style="siglip"``: image pooled by MAP with no projection (embedding width = image width),
    text bidirectional, pooled at the last token, linear head to ``embed_dim``.
    ``style="clip"``: image pooled at the class token, text causal pooled at EOS, both with a
    bias-free linear projection to ``embed_dim``. Default: the preset's style (``clip_b16``:
    CLIP, the others: SigLIP).
    """
    entry = _lookup("two_tower", name)
    style = style or entry.pop("style", "siglip")
    entry.pop("style", None)
    if style not in STYLES:
        raise ValueError(f"unknown two-tower style {style!r}; valid: {', '.join(STYLES)}")
    embed = entry["embed_dim"]
    image = vit_config(entry["image"])
    text = text_config(entry["text"])
    if style == "siglip":
        if embed != image["width"]:
            image.update(output_dim=embed)
        image.update(pool="map")
        text.update(causal=False, pool="last", output_dim=embed)
    else:
        image.update(pool="cls", output_dim=embed, head_bias=False)
        text.update(causal=True, pool="eos", output_dim=embed, head_bias=False)
    image.update(image_overrides or {})
    text.update(text_overrides or {})
    return {"image": image, "text": text, "embed_dim": embed}


def limoe_config(name, **overrides):
    """``OneTowerEncoder`` kwargs of a LIMoE preset, with overrides."""
    return {**_lookup("limoe", name)["encoder"], **overrides}


def limoe_loss_weights(name):
    """``LIMoEModel`` auxiliary-loss kwargs of a LIMoE preset."""
    return dict(_lookup("limoe", name)["losses"])


def captioner_config(kind, name, decoder_overrides=None, image_overrides=None):
    """``{"image": ViTEncoder kwargs, "decoder": TextDecoder kwargs, **model kwargs}`` of a
    captioner preset (``kind`` in coca / cappa / mammut / pali). The image encoder keeps its
    tokens for the decoder (no head); MaMMUT pools it by MAP for its contrastive embedding."""
    if kind not in CAPTIONER:
        raise ValueError(f"unknown captioner {kind!r}; valid: {', '.join(sorted(CAPTIONER))}")
    entry = _lookup(f"captioner_{kind}", name)
    entry["image"] = vit_config(entry["image"], pool="map" if kind == "mammut" else "gap",
                                **(image_overrides or {}))
    entry["decoder"].update(decoder_overrides or {})
    return entry
