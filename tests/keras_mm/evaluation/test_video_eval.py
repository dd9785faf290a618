"""Video evaluation: the retrieval gallery, the motion probe on frozen clip embeddings and
MV-GPT's next-utterance scores, on hand-made clips whose answers are known."""

import numpy as np
import pytest

from keras_mm.evaluation import linear_probe, video

T, S, D = 2, 4, 8


def _clips(labels, seed=0, signal=3.0):
    """Clips whose first D pixels hold a one-hot of the label (times ``signal``) plus noise."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    clips = rng.normal(size=(n, T, S, S, 3)).astype("float32") * 0.3
    flat = clips.reshape(n, -1)
    for i, y in enumerate(labels):
        if y >= 0:
            flat[i, y] += signal
    return flat.reshape(clips.shape)


def _embed(clips):
    return np.asarray(clips).reshape(len(clips), -1)[:, :D]


def _batches(clips, labels=None, texts=None, batch=4, prefix="c"):
    out = []
    for start in range(0, len(clips), batch):
        b = {"video": clips[start:start + batch],
             "id": np.array([f"{prefix}{i:04d}".encode()
                             for i in range(start, min(start + batch, len(clips)))])}
        if labels is not None:
            b["label"] = np.asarray(labels[start:start + batch], np.int64)
        if texts is not None:
            b["texts"] = texts[start:start + batch]
            b["num_texts"] = np.ones(len(b["texts"]), np.int32)
        out.append(b)
    return out


def test_motion_probe_reads_the_motion_and_drops_unlabelled_clips():
    rng = np.random.default_rng(1)
    train_y = rng.integers(0, 4, 120)
    train_y[:10] = -1                         # no motion class: must be left out
    val_y, test_y = rng.integers(0, 4, 40), rng.integers(0, 4, 60)
    sets = [(_clips(y, seed=i), y) for i, y in enumerate((train_y, val_y, test_y))]
    out = video.evaluate_motion_probe(_embed, *[_batches(c, y) for c, y in sets])
    assert out["motion_probe_top1"] >= 0.95
    assert out["num_train"] == 110
    # The same probe on the embeddings computed directly (an independent path).
    keep = train_y >= 0
    direct = linear_probe.linear_probe(
        _embed(sets[0][0])[keep], train_y[keep], _embed(sets[1][0]), val_y,
        _embed(sets[2][0]), test_y, prefix="motion_probe")
    assert out["motion_probe_top1"] == pytest.approx(direct["motion_probe_top1"])
    # Clips without motion in the embedding: the probe is near chance.
    blind = video.evaluate_motion_probe(
        lambda v: _embed(_clips(np.full(len(v), -1), seed=len(v))),
        *[_batches(c, y) for c, y in sets])
    assert blind["motion_probe_top1"] < 0.5


def test_motion_probe_needs_labels():
    clips = _clips([0, 1, 2, 3])
    with pytest.raises(ValueError, match="label"):
        video.evaluate_motion_probe(_embed, _batches(clips), _batches(clips), _batches(clips))
    with pytest.raises(ValueError, match="no clip has a motion label"):
        unlabelled = _batches(clips, [-1] * 4)
        video.evaluate_motion_probe(_embed, unlabelled, unlabelled, unlabelled)


def test_retrieval_uses_the_first_gallery_clips_only():
    n = 10
    clips = _clips(np.arange(n) % D, seed=3, signal=5.0)
    # Caption i is the one-hot of clip i's label as "token ids" (embedded as given).
    texts = np.zeros((n, 1, D), np.int32)
    for i in range(n):
        texts[i, 0, i % D] = 7
    embed_text = lambda ids: np.asarray(ids, np.float32)         # noqa: E731
    out = video.evaluate_video_retrieval(_embed, embed_text, _batches(clips, texts=texts),
                                         gallery_size=6)
    assert out["num_images"] == 6 and out["num_texts"] == 6
    assert out["retrieval_t2i_r1"] == 1.0 and out["retrieval_i2t_r1"] == 1.0
    # Clips 0 and 8 share label 0 (identical caption): both count as true pairs.
    out = video.evaluate_video_retrieval(_embed, embed_text, _batches(clips, texts=texts),
                                         gallery_size=None)
    assert out["num_images"] == n and out["retrieval_t2i_r1"] == 1.0
    with pytest.raises(ValueError, match="gallery needs 20 clips"):
        video.evaluate_video_retrieval(_embed, embed_text, _batches(clips, texts=texts),
                                       gallery_size=20)


def test_video_batches_need_video():
    with pytest.raises(ValueError, match="'video'"):
        list(video.as_image_batches([{"image": np.zeros((1, S, S, 3))}]))


class _Tokenizer:
    """Ids are indices into a word list; detokenize joins the words up to id 0."""

    words = ["", "the", "small", "9", "moves", "down", "up", "4", "left"]

    def detokenize(self, ids):
        import tensorflow as tf

        texts = [" ".join(self.words[i] for i in row if i) for row in np.asarray(ids)]
        return tf.constant(texts)


def _ids(text):
    words = _Tokenizer.words
    row = [words.index(w) for w in text.split()]
    return row + [0] * (6 - len(row))


def test_next_utterance_scores_the_generated_future():
    futures = ["the small 9 moves down", "the 4 moves left", "the small 9 moves up", ""]
    batches = [{"video": np.zeros((4, T, S, S, 3), np.float32),
                "current": np.zeros((4, 3), np.int32),
                "transcript/future": np.array([f.encode() for f in futures])}]
    perfect = video.evaluate_next_utterance(
        lambda v, c: np.array([_ids(f) for f in futures]), batches, _Tokenizer())
    assert perfect["next_exact_match"] == 1.0
    assert perfect["next_count"] == 3.0                  # the clip without a future is skipped
    assert perfect["next_bleu4"] > 0.9
    wrong = ["the small 9 moves up", "the 4 moves left", "the small 9 moves down", ""]
    half = video.evaluate_next_utterance(
        lambda v, c: np.array([_ids(f) for f in wrong]), batches, _Tokenizer())
    assert half["next_exact_match"] == pytest.approx(1 / 3)
    assert half["next_cider"] < perfect["next_cider"]
    with pytest.raises(ValueError, match="transcript/future"):
        video.evaluate_next_utterance(lambda v, c: None, [{"video": 0, "current": 0}],
                                      _Tokenizer())


def test_blind_retrieval_ceiling_by_hand():
    """Clips: A "x up", B "x down", C "x down", D "y up"; a model blind to up/down ties A, B and
    C for every x caption. "x up" (1 true of 3 tied) 1/3, "x down" (2 of 3) 2/3 for B and for
    C, "y up" 1 (no "y down" in the gallery): mean (1/3 + 2/3 + 2/3 + 1) / 4 = 2/3. A model
    that sees everything (identity alternative) gets 1."""
    def flip(c):
        return c.replace("up", "DOWN").replace("down", "up").replace("DOWN", "down")

    gallery = [["x up"], ["x down"], ["x down"], ["y up"]]
    assert video.blind_retrieval_r1_ceiling(gallery, flip) == pytest.approx(2 / 3)
    assert video.blind_retrieval_r1_ceiling(gallery, lambda c: c) == 1.0
    # a second caption shared by every clip is true for all of them: R@1 1 for that query
    shared = [caps + ["digits"] for caps in gallery]
    assert video.blind_retrieval_r1_ceiling(shared, flip) == pytest.approx((2 / 3 * 4 + 4) / 8)
    with pytest.raises(ValueError, match="no captions"):
        video.blind_retrieval_r1_ceiling([], flip)
