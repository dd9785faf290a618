"""Video models from preset names (issue 7): the video-text two-tower model, MaMMUT video and
MV-GPT, each with a TubeViT video tower (``encoder="tubevit"``) or the frame-averaging baseline
(``encoder="frame_average"``: a ViT on every frame, embeddings averaged over time).

Every model reads its video at the batch key ``"video"`` (``[B, T, H, W, 3]`` float).

The video tower of a preset is ``presets.tubevit_config`` of the family's image preset (tiny:
16 x 64 x 64, b16 / l16: 32 x 224 x 224) with ``video_overrides``. The frame-average tower is a
``ViTEncoder`` of the same transformer sizes on frames of the video's ``H x W``, whose patches
are the TubeViT's 2-D image tube (the first tube with temporal kernel 1; tiny: 8 x 8) unless
``video_overrides`` gives ``patch_size``; the TubeViT-only keys (``video_size``'s T, ``tubes``,
``temperature``, ``image_position_embedding``, ``image_tube``, ``tube_impl``,
``position_gate_init``) do not apply to it. Both towers get the same pooling and projection
head, so the two differ only in how they see time.
"""

from __future__ import annotations

from keras_mm.decoders.text_decoder import TextDecoder
from keras_mm.encoders import presets
from keras_mm.encoders.frame_average import FrameAverageEncoder
from keras_mm.encoders.text import TextEncoder
from keras_mm.encoders.tubevit import TubeViTEncoder
from keras_mm.encoders.vit import ViTEncoder
from keras_mm.layers.tube_embedding import normalize_tubes
from keras_mm.models.mammut import MaMMUTModel
from keras_mm.models.mvgpt import MVGPTModel
from keras_mm.models.two_tower import TwoTowerModel

VIDEO_ENCODERS = ("tubevit", "frame_average")
_TUBE_ONLY = ("video_size", "tubes", "temperature", "image_position_embedding", "image_tube",
              "tube_impl", "position_gate_init")
_FRAME_ONLY = ("patch_size", "image_size", "pos_embedding", "patch_impl", "patch_sizes",
               "base_patch_size", "position_crop", "stem")


def frame_vit_config(tubevit_kwargs):
    """``ViTEncoder`` kwargs of the frame-average tower matching ``TubeViTEncoder`` kwargs
    (module docstring); ViT-only keys among them (``patch_size``...) are kept."""
    cfg = dict(tubevit_kwargs)
    _, height, width = cfg["video_size"]
    image_tubes = [kernel for kernel, _, _ in normalize_tubes(cfg["tubes"]) if kernel[0] == 1]
    for key in _TUBE_ONLY:
        cfg.pop(key, None)
    if "patch_size" not in cfg:
        if not image_tubes:
            raise ValueError("the tubes have no 2-D image tube (temporal kernel 1): give "
                             "patch_size in video_overrides for the frame-average encoder")
        cfg["patch_size"] = list(image_tubes[0][1:])
    cfg.setdefault("image_size", [height, width])
    return cfg


def video_encoder(vit_preset, encoder="tubevit", overrides=None, name="video_encoder", **head):
    """A video tower: ``TubeViTEncoder`` or ``FrameAverageEncoder(ViTEncoder)`` of the tubevit
    preset ``vit_preset`` with ``head`` (pooling / projection kwargs) and then ``overrides``."""
    if encoder not in VIDEO_ENCODERS:
        raise ValueError(f"encoder must be one of {VIDEO_ENCODERS}, got {encoder!r}")
    if vit_preset not in presets.TUBEVIT:
        raise ValueError(f"no video (tubevit) preset {vit_preset!r}; valid: "
                         f"{', '.join(presets.names('tubevit'))}")
    cfg = presets.tubevit_config(vit_preset, **head)
    cfg.update(overrides or {})
    if encoder == "tubevit":
        frame_keys = sorted(set(cfg) & set(_FRAME_ONLY))
        if frame_keys:
            raise ValueError(f"{frame_keys} are options of the frame-average encoder, not of "
                             "TubeViT")
        return TubeViTEncoder(**cfg, name=name)
    frame = ViTEncoder(**frame_vit_config(cfg), name="frame_encoder")
    return FrameAverageEncoder(frame, name=name)


def build_video_two_tower(preset="tiny", loss="softmax", *, encoder="tubevit", vocab_size=None,
                          max_len=None, style=None, chunked=False, video_overrides=None,
                          text_overrides=None, log_scale_init=None, bias_init=None):
    """A video-text ``TwoTowerModel(visual_key="video")``: batches ``{"video" [B, T, H, W, 3],
    "text" [B, L]}``.

    Text tower, embedding width and style (SigLIP for ``loss="sigmoid"``, CLIP for softmax) as
    ``build_two_tower``. The video tower pools by MAP (SigLIP style) or by the mean of its
    tokens (CLIP style: TubeViT has no class token), with a linear projection to the embedding
    width where it differs from the tower's (always for CLIP, bias-free).
    """
    style = style or ("siglip" if loss == "sigmoid" else "clip")
    text_overrides = dict(text_overrides or {})
    if vocab_size is not None:
        text_overrides["vocab_size"] = int(vocab_size)
    if max_len is not None:
        text_overrides["max_len"] = int(max_len)
    cfg = presets.two_tower_config(preset, style=style, text_overrides=text_overrides)
    embed = cfg["embed_dim"]
    vit_preset = presets.TWO_TOWER[preset]["image"]
    width = dict(presets.TUBEVIT.get(vit_preset, {}), **(video_overrides or {})).get("width")
    if style == "siglip":
        head = dict(pool="map", output_dim=embed if embed != width else None)
    else:
        head = dict(pool="gap", output_dim=embed, head_bias=False)
    video = video_encoder(vit_preset, encoder, video_overrides, **head)
    text = TextEncoder(**cfg["text"], name="text_encoder")
    return TwoTowerModel(video, text, loss=loss, chunked=chunked, log_scale_init=log_scale_init,
                         bias_init=bias_init, visual_key="video",
                         name=f"video_two_tower_{preset}")


def _decoder_kwargs(kind, preset, vocab_size, max_len, decoder_overrides):
    decoder_overrides = dict(decoder_overrides or {})
    if vocab_size is not None:
        decoder_overrides["vocab_size"] = int(vocab_size)
    if max_len is not None:
        decoder_overrides["max_len"] = int(max_len) - 1
    entry = presets.captioner_config(kind, preset, decoder_overrides)
    return entry, presets.CAPTIONER[kind][preset]["image"]


def build_video_mammut(preset="tiny", *, encoder="tubevit", vocab_size=None, max_len=None,
                       video_overrides=None, decoder_overrides=None, **model_kwargs):
    """MaMMUT video: ``MaMMUTModel(visual_key="video")`` with the MaMMUT video encoder
    (``TubeViTEncoder(image_position_embedding=True)``, MAP-pooled for the contrastive
    embedding) or the frame-average baseline, and the decoder of
    ``build_captioner("mammut", preset)`` (cross-attention in every other block, ``max_len - 1``
    positions). Batches ``{"video", "text" [B, L] with BOS/EOS}``. ``model_kwargs`` go to
    ``MaMMUTModel`` (``contrastive="focal"``, ``blind=True``...)."""
    entry, vit_preset = _decoder_kwargs("mammut", preset, vocab_size, max_len,
                                        decoder_overrides)
    head = dict(pool="map")
    if encoder == "tubevit":
        head["image_position_embedding"] = True
    video = video_encoder(vit_preset, encoder, video_overrides, **head)
    decoder = TextDecoder(**entry["decoder"], name="decoder")
    return MaMMUTModel(video, decoder, **model_kwargs, visual_key="video",
                       name=f"video_mammut_{preset}")


def build_mvgpt(preset="tiny", *, encoder="tubevit", vocab_size=None, max_len=None,
                max_current_len=None, video_overrides=None, decoder_overrides=None,
                **model_kwargs):
    """An ``MVGPTModel``: batches ``{"video", "current" [B, P], "future" [B, L]}``.

    Sizes are the PaLI-style captioner's preset (``presets.CAPTIONER["pali"]``: a decoder
    cross-attending in every block and an ``encoder_depth``-block multimodal encoder) with the
    preset's video tower (mean-pooled; only its tokens are used). ``max_len`` is L (the future
    utterance with BOS / EOS) and ``max_current_len`` is P (default ``max_len``); the decoder
    and the encoder's text positions get ``max(L - 1, P)``. The decoder gets one extra token,
    BOS-B. ``model_kwargs`` go to ``MVGPTModel`` (``backward=False``, ``use_frames=False``,
    ``forward_weight``, ``backward_weight``, ``encoder_depth``...)."""
    entry, vit_preset = _decoder_kwargs("pali", preset, None, None, decoder_overrides)
    decoder_kwargs = entry["decoder"]
    if vocab_size is not None:
        decoder_kwargs["vocab_size"] = int(vocab_size)
    future_len = int(max_len) if max_len is not None else decoder_kwargs["max_len"] + 1
    current_len = int(max_current_len) if max_current_len is not None else future_len
    length = max(future_len - 1, current_len)
    decoder_kwargs["max_len"] = length
    decoder_kwargs["extra_tokens"] = max(1, decoder_kwargs.get("extra_tokens", 0))
    model_kwargs.setdefault("encoder_depth", entry["encoder_depth"])
    use_frames = model_kwargs.get("use_frames", True)
    video = (video_encoder(vit_preset, encoder, video_overrides, pool="gap") if use_frames
             else None)
    decoder = TextDecoder(**decoder_kwargs, name="decoder")
    return MVGPTModel(video, decoder, max_text_len=length, **model_kwargs,
                      name=f"mvgpt_{preset}")


def initialize_video_tower(model, variables, *, resize="bilinear", position_table=True):
    """Initialises a built video model from another run's variables (``{path: array}``,
    ``keras_mm.training.checkpoint.read_model_variables``): TubeViT's image-to-video path.

    Variables are matched by their path below the model (``video_encoder/...``,
    ``text_encoder/...``, ``logits/...``); a frame-average tower's ``frame_encoder/`` level is
    dropped, so its transformer blocks, final norm, pooling head and projection load into a
    TubeViT tower of the same sizes, its learned position table into the image tube of a
    TubeViT with ``image_position_embedding=True`` (the MaMMUT video variant: the image tube's
    tokens are then exactly the image ViT's), and its 2-D patch embedding is inflated into
    every tube (``SparseTubeEmbedding.initialize_from_patch_embedding``: the kernel spread over
    the tube's frames and resized to its spatial size; a static clip gives the 2-D embedding's
    tokens). A frame-average or TubeViT tower of the same shape loads as is.

    ``position_table=False`` drops the source's learned position table instead: a plain TubeViT
    (fixed 3-D sin-cos tube positions, which place tokens in time as well as in space) then
    starts from the rest of the image model; a target's own learned table keeps its
    initialisation.

    Every variable of the source's video tower must be used, and every variable of the target's
    video tower must be set (the TubeViT position gate excepted: it starts at 0); outside the
    video tower (text tower, logit scale, decoder), variables of equal path and shape are
    copied and the rest keep their initialisation.

    Returns:
      ``{"copied": [paths], "inflated": [paths], "kept": [paths], "dropped": [paths]}``
      (target paths; "dropped": the source's, relative to its model).

    Raises:
      ValueError: a path of both with different shapes (another preset or vocabulary), a
        video-tower variable with no counterpart, or no video tower in the source.
    """
    import numpy as np

    from keras_mm.layers.tube_embedding import SparseTubeEmbedding

    tower = "video_encoder/"
    prefix = next((p[:p.index(tower)] for p in variables if tower in p), None)
    if prefix is None:
        raise ValueError("the source checkpoint has no video tower (no 'video_encoder/' "
                         "variables): initialise from a video model's run")
    source = {}
    for path, value in variables.items():
        rel = path[len(prefix):] if path.startswith(prefix) else path
        source[rel.replace(tower + "frame_encoder/", tower)] = np.asarray(value)
    table = tower + "position_embedding/"
    dropped = [] if position_table else sorted(k for k in source if k.startswith(table))
    for key in dropped:
        del source[key]
    used = set()
    report = {"copied": [], "inflated": [], "kept": [], "dropped": dropped}
    own = model.name + "/"
    pending = []
    for variable in model.variables:
        rel = variable.path[len(own):] if variable.path.startswith(own) else variable.path
        rel = rel.replace(tower + "frame_encoder/", tower)
        if rel in source:
            value = source[rel]
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(f"{rel}: the checkpoint's shape {tuple(value.shape)} differs "
                                 f"from the model's {tuple(variable.shape)} (another preset, "
                                 "tube set or tokenizer)")
            pending.append((variable, value))
            used.add(rel)
            report["copied"].append(variable.path)
        elif rel.startswith(tower + "tube_embedding/"):
            report["inflated"].append(variable.path)
        elif (rel.startswith(tower) and not rel.endswith("position_gate")
              and not (dropped and rel.startswith(table))):
            raise ValueError(f"{rel}: the checkpoint's video tower has no such variable (its "
                             "architecture differs: pooling, depth, or a position table that "
                             "needs model.video.image_position_embedding=true)")
        else:
            report["kept"].append(variable.path)
    patch = {k: tower + f"patch_embedding/{k}" for k in ("kernel", "bias")}
    tubes = [layer for layer in model._flatten_layers() if isinstance(layer, SparseTubeEmbedding)]
    if report["inflated"]:
        if patch["kernel"] not in source or len(tubes) != 1:
            raise ValueError("the model's tubes need a 2-D patch embedding to inflate, and the "
                             "checkpoint has none")
        used.update(k for k in patch.values() if k in source)
    unused = sorted(k for k in source if k.startswith(tower) and k not in used)
    if unused:
        raise ValueError(f"the checkpoint's video tower has variables the model lacks: "
                         f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} (its "
                         "architecture differs; a learned position table needs "
                         "model.video.image_position_embedding=true)")
    for variable, value in pending:
        variable.assign(value)
    if report["inflated"]:
        tubes[0].initialize_from_patch_embedding(source[patch["kernel"]],
                                                 source.get(patch["bias"]), resize=resize)
    return report
