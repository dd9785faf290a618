"""Video evaluation (issue 7): text <-> video retrieval on a clip gallery, the motion probe and
MV-GPT's future-utterance generation.

* Retrieval: the first ``gallery_size`` clips of a split (256 by default) and every caption of
  each, scored as :mod:`keras_mm.evaluation.retrieval` scores images (COCO protocol; identical
  captions and identical clips count as true pairs, DESIGN.md). ``retrieval_t2i_r1`` is
  text -> video R@1.
* Retrieval ceiling of a frame-averaging model (moving digits):
  ``retrieval_t2i_r1_frame_average_ceiling`` = :func:`blind_retrieval_r1_ceiling` with the
  time-reversed captions: the best text -> video R@1 a model that cannot tell a clip from its
  reversal can reach on the same gallery (the text for the "2x the frame-averaging baseline"
  comparison).
* Motion probe: multinomial logistic regression of the clips' motion class (``label``, the
  primary digit's direction on moving-digits) on FROZEN clip embeddings
  (:func:`keras_mm.evaluation.linear_probe.linear_probe`: fit on the probe's training clips, C
  chosen on validation clips, scored on the test clips) -> ``motion_probe_top1``. The same probe
  on a frame-averaging model (each frame embedded alone, averaged over time: it sees every frame
  but not their order) is reported beside it as ``motion_probe_frame_average_top1``.
* Next utterance (MV-GPT): the future utterance generated from the frames and the current
  utterance, scored against the true future utterance with pycocoevalcap (CIDEr, BLEU-4, METEOR,
  ROUGE-L), plus the exact-match rate.

Video batches carry ``"video"`` ``[B, T, H, W, 3]`` where image batches carry ``"image"``; the
image evaluators are reused through :func:`as_image_batches`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np

from keras_mm.evaluation import captioning as caption_metrics_lib
from keras_mm.evaluation import embeddings as emb
from keras_mm.evaluation import linear_probe as probe_lib
from keras_mm.evaluation import retrieval as retrieval_lib

DEFAULT_GALLERY = 256
FUTURE = "transcript/future"


def as_image_batches(dataset: Iterable[Dict[str, Any]]):
    """Video batches -> the same batches with the clips under ``"image"`` as well (the image
    evaluators read that key; a clip is hashed and embedded whole)."""
    for batch in dataset:
        if "video" not in batch:
            raise ValueError(f"video eval batches need 'video', got keys {sorted(batch)}")
        yield {**batch, "image": batch["video"]}


def _take(dataset, max_batches: Optional[int]):
    return dataset if max_batches is None else itertools.islice(dataset, max_batches)


def evaluate_video_retrieval(embed_video: emb.EmbedFn, embed_text: emb.EmbedFn, dataset, *,
                             gallery_size: Optional[int] = DEFAULT_GALLERY,
                             **kwargs) -> Dict[str, Any]:
    """Video <-> text Recall@1/5/10 over the first ``gallery_size`` clips of ``dataset`` (an eval
    dataset with every caption: ``texts`` ``[B, K, L]`` and ``num_texts``). ``i2t`` is
    video -> text, ``t2i`` text -> video. Raises ValueError when the split has fewer clips than
    the gallery."""
    out = retrieval_lib.evaluate_retrieval_dataset(
        embed_video, embed_text, as_image_batches(dataset), max_examples=gallery_size, **kwargs)
    if gallery_size is not None and out["num_images"] < gallery_size:
        raise ValueError(f"the retrieval gallery needs {gallery_size} clips, the split has only "
                         f"{out['num_images']}")
    return out


def blind_retrieval_r1_ceiling(clip_captions: Sequence[Sequence[str]],
                               alternative: Callable[[str], str]) -> float:
    """The best expected text -> video R@1 of a model that cannot tell a clip from the one that
    ``alternative`` describes (e.g. ``moving_digits.time_reversed_caption``: a frame-averaging
    model cannot tell a clip from its time reversal), on the gallery of ``clip_captions`` (the
    captions of each clip) with the protocol of :func:`evaluate_video_retrieval`.

    Such a model at its best ranks first, for a caption ``q``, every clip that has ``q`` or
    ``alternative(q)`` among its captions, tied; of those, the clips that have ``q`` are true
    pairs. With ties broken at random a query scores R@1 = true / tied in expectation; the
    ceiling is the mean over every caption of every clip."""
    sets = [set(captions) for captions in clip_captions]
    scores = []
    for captions in sets:
        for q in captions:
            true = sum(q in other for other in sets)
            tied = sum(q in other or alternative(q) in other for other in sets)
            scores.append(true / tied)
    if not scores:
        raise ValueError("the gallery has no captions")
    return float(np.mean(scores))


def clip_embeddings(embed_video: emb.EmbedFn, dataset,
                    max_examples: Optional[int] = None):
    """``(embeddings [N, D], labels [N])`` of a labelled video dataset (clips with label -1, no
    motion class, are dropped)."""
    data = emb.embed_dataset(embed_video, as_image_batches(dataset), max_examples=max_examples)
    if data["labels"] is None:
        raise ValueError("the motion probe needs clips with a 'label' (the motion class)")
    keep = data["labels"] >= 0
    if not keep.any():
        raise ValueError("no clip has a motion label (all labels are -1)")
    return data["image_emb"][keep], data["labels"][keep]


def evaluate_motion_probe(embed_video: emb.EmbedFn, train_dataset, val_dataset, test_dataset, *,
                          max_train: Optional[int] = None, prefix: str = "motion_probe",
                          **kwargs) -> Dict[str, Any]:
    """The motion probe on frozen clip embeddings: ``{prefix}_top1`` (test accuracy),
    ``{prefix}_val_top1``, ``{prefix}_c`` and the clip counts. ``kwargs`` go to
    :func:`~keras_mm.evaluation.linear_probe.linear_probe`."""
    train = clip_embeddings(embed_video, train_dataset, max_train)
    val = clip_embeddings(embed_video, val_dataset)
    test = clip_embeddings(embed_video, test_dataset)
    return probe_lib.linear_probe(*train, *val, *test, prefix=prefix, **kwargs)


def _strings(values):
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for v in np.asarray(values).reshape(-1)]


def evaluate_next_utterance(generate: Callable, dataset, tokenizer, *,
                            max_examples: Optional[int] = None,
                            metrics=caption_metrics_lib.METRICS) -> Dict[str, float]:
    """MV-GPT: generates the future utterance of every clip and scores it.

    Args:
      generate: ``(video [B, T, H, W, 3], current ids [B, P]) -> token ids [B, T']`` numpy.
      dataset: batches with ``video``, ``current`` (ids) and ``transcript/future`` (the true
        future utterance, strings ``[B]``), as ``pipelines.datasets.video_caption_eval_dataset``
        yields them with ``transcripts=True``.
      tokenizer: detokenizes the generated ids.

    Returns:
      ``{"next_cider", "next_bleu4", "next_meteor", "next_rouge_l", "next_exact_match",
      "next_count"}``.
    """
    predictions, references, count = {}, {}, 0
    for batch in dataset:
        for key in ("video", "current", FUTURE):
            if key not in batch:
                raise ValueError(f"next-utterance batches need {key!r}, got {sorted(batch)}")
        tokens = generate(batch["video"], batch["current"])
        texts = _strings(emb.to_numpy(tokenizer.detokenize(tokens)))
        truth = _strings(emb.to_numpy(batch[FUTURE]))
        for i, (text, ref) in enumerate(zip(texts, truth)):
            if not ref.strip():
                continue
            predictions[count + i] = text.strip()
            references[count + i] = [ref]
        count += len(texts)
        if max_examples and count >= max_examples:
            break
    if not references:
        raise ValueError("next utterance: no clip has a future utterance (records need "
                         "'transcript/future')")
    scores = caption_metrics_lib.caption_metrics(references, predictions, metrics=metrics)
    out = {f"next_{k}": float(v) for k, v in scores.items()}
    exact = [caption_metrics_lib.normalize_answer(predictions[k]) ==
             caption_metrics_lib.normalize_answer(references[k][0]) for k in references]
    out["next_exact_match"] = float(np.mean(exact))
    out["next_count"] = float(len(references))
    return out
