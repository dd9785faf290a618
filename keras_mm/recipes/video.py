"""Video recipes on moving digits (``kmm data video --source moving-digits``): 8 frames of
32 x 32, clips of 1-2 real digits moving left / right / up / down, captions naming digits and
motion, two-segment transcripts.

* ``tubevit_moving_digits``: the video-text two-tower model (CLIP softmax loss) with a tiny
  TubeViT video tower (``model.video.tubes="clip8"``: four sparse tube shapes, 98 tokens,
  ``keras_mm.encoders.presets.TUBE_SETS``).
* ``tubevit_from_frames_moving_digits``: TubeViT started from a frame-average run (the paper's
  image-to-video initialisation; ``--set model.init_checkpoint=RUN``). The plain
  ``tubevit_moving_digits`` starts from one too with ``--set model.init_checkpoint=RUN --set
  model.video.init_position_table=false``: the run's learned position table is dropped and the
  fixed 3-D tube positions (in time as well as space) stay.
* ``frame_average_moving_digits``: the same with the frame-averaging tower (the tiny ViT, patch
  8, on every frame, embeddings averaged over time): the baseline that sees every frame but not
  their order, so it cannot tell "moves left" from "moves right".
* ``mammut_video_moving_digits``: MaMMUT on clips (TubeViT with the learned image position
  embeddings + gated fixed tube embeddings; one decoder for the contrastive and captioning
  passes).
* ``mvgpt_moving_digits``: MV-GPT, generating the future utterance from the frames and the
  current one, with the backward (BOS-B) objective; ``--set model.video.mvgpt_backward=false``
  is the forward-only ablation and ``model.video.mvgpt_use_frames=false`` the no-frames one.

Clips are never flipped (the captions and the probe label say left / right) nor cropped
(digits near the border would leave the frame); all 8 frames are used (uniform sampling of 8
from 8). Evaluation: text <-> video retrieval on the first 256 test clips, the motion probe
(logistic regression of the primary digit's direction on frozen clip embeddings), captioning
metrics of the generated captions (MaMMUT) and of the generated future utterance (MV-GPT).
"""

from keras_mm.pipelines.datasets import InputConfig
from keras_mm.recipes.config import (CaptionerConfig, DataConfig, EvalConfig, ExperimentConfig,
                                     ExportConfig, ModelConfig, OptimizerConfig, TrainConfig,
                                     VideoConfig)

VIDEO_FOLDER = "runs/demo/moving_digits"


def _video(name, kind, *, encoder="tubevit", tasks, steps=1500, lr=5e-4, add_bos=False,
           transcripts=False, loss="softmax", video=None):
    return ExperimentConfig(
        name=name,
        data=DataConfig(folder=VIDEO_FOLDER, input=InputConfig(
            image_size=32, num_frames=8, temporal_sampling="uniform",
            eval_temporal_sampling="uniform", video_augment="none", video_flip=False,
            eval_mode="resize", batch_size=64, shuffle_buffer=4096, add_bos=add_bos,
            max_text_len=24, train_caption="random", transcripts=transcripts,
            max_current_len=16)),
        model=ModelConfig(kind=kind, preset="tiny", loss=loss, captioner=CaptionerConfig(),
                          video=video or VideoConfig(encoder=encoder, tubes="clip8")),
        # lr 1e-3 left both towers near chance after 1000 steps (pair accuracy 0.04 at batch
        # 64), as it collapses the image towers on the 32 x 32 digits (recipes.two_tower).
        optimizer=OptimizerConfig(lr=lr, end_lr=lr / 100, weight_decay=1e-4, warmup_steps=200,
                                  clip=1.0),
        train=TrainConfig(steps=steps, steps_per_epoch=250, checkpoint_every=250, log_every=50,
                          out_dir=f"runs/demo/{name}"),
        eval=EvalConfig(split="test", batch_size=128, tasks=tasks, gallery_size=256,
                        probe_max_train=4096),
        export=ExportConfig(name=name),
    )


def tubevit_moving_digits():
    """TubeViT-tiny (clip8 tubes) + tiny text tower, CLIP loss, 1500 steps of 64 clips."""
    return _video("tubevit_moving_digits", "video_two_tower",
                  tasks=("retrieval", "motion_probe"))


def tubevit_from_frames_moving_digits():
    """TubeViT's image-to-video path: ``tubevit_moving_digits`` with the image tube's learned
    position table (``model.video.image_position_embedding``), to be started from a
    frame-average run with ``--set model.init_checkpoint=RUN``: its ViT blocks, head, text
    tower and logit scale load as they are and its 2-D patch embedding is inflated into every
    tube (``keras_mm.models.video.initialize_video_tower``). ``kmm demo --model video`` runs
    it from its frame-average baseline. A fair baseline continues the frame-average run for the
    same steps: ``frame_average_moving_digits`` with the same ``model.init_checkpoint``."""
    cfg = _video("tubevit_from_frames_moving_digits", "video_two_tower",
                 tasks=("retrieval", "motion_probe"))
    cfg.model.video.image_position_embedding = True
    return cfg


def frame_average_moving_digits():
    """The frame-averaging baseline of ``tubevit_moving_digits`` (same text tower, loss and
    schedule; the tiny ViT on each frame, averaged)."""
    return _video("frame_average_moving_digits", "video_two_tower", encoder="frame_average",
                  tasks=("retrieval", "motion_probe"))


def mammut_video_moving_digits():
    """MaMMUT video: TubeViT-tiny (image position embeddings + gated tube embeddings) and one
    4-block decoder (cross-attention in blocks 1 and 3), equal loss weights."""
    return _video("mammut_video_moving_digits", "video_mammut", add_bos=True,
                  tasks=("retrieval", "motion_probe", "captioning"))


def mvgpt_moving_digits():
    """MV-GPT: TubeViT-tiny frames + current utterance -> 2-block multimodal encoder ->
    decoder of the future utterance; forward + backward (BOS-B) generation losses."""
    return _video("mvgpt_moving_digits", "mvgpt", add_bos=True, transcripts=True,
                  tasks=("next_utterance",))
