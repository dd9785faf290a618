"""Caption metrics against independent pure-Python BLEU-4, ROUGE-L and CIDEr-D written from the papers
(with pycocoevalcap's documented conventions), hand-computed CIDEr-D values, METEOR sanity, Java process
hygiene, bad input; VQA exact-match accuracy."""

import collections
import gc
import math
import shutil
import time

import psutil
import pytest

from keras_mm.evaluation import captioning
from keras_mm.evaluation.captioning import caption_metrics, normalize_answer, vqa_accuracy

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs `java` on PATH")

# Hand-made captions that are already PTB tokens (lower case, no punctuation), so the references below
# see exactly what pycocoevalcap scores.
REFS = {
    "bike": ["a man rides a red bike down the street", "a person riding a bicycle on a street",
             "a man on a red bike"],
    "dogs": ["two dogs play in the snow", "a pair of dogs running through snow"],
    "food": ["a plate of food with broccoli and rice", "a white plate with rice and broccoli on it",
             "some food on a plate"],
    "seven": ["the digit seven written in black ink"],
    "tie": ["one two three four five", "one two three four five six seven"],
}
PREDS = {
    "bike": "a man riding a red bike on the street",
    "dogs": "two dogs running in the snow",
    "food": "a plate with rice and broccoli",
    "seven": "a black seven",
    "tie": "one two three four five six",  # 6 words, references of 5 and 7: the closest-length tie
}


def ngrams(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def ref_bleu4(refs, preds):
    """Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions summed over the corpus, geometric
    mean of p_1..p_4, brevity penalty exp(1 - r / c) when c < r, with r the sum over sentences of the
    reference length closest to the candidate's (pycocoevalcap's "closest"; ties to the shorter)."""
    clipped, total, c, r = [0] * 4, [0] * 4, 0, 0
    for key, pred in preds.items():
        hyp = pred.split()
        ref_words = [ref.split() for ref in refs[key]]
        c += len(hyp)
        r += min((abs(len(rw) - len(hyp)), len(rw)) for rw in ref_words)[1]
        for n in range(1, 5):
            max_ref = collections.Counter()
            for rw in ref_words:
                for gram, count in ngrams(rw, n).items():
                    max_ref[gram] = max(max_ref[gram], count)
            clipped[n - 1] += sum(min(count, max_ref[gram]) for gram, count in ngrams(hyp, n).items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    assert all(clipped), "the example corpus needs a match at every n"
    log_precision = sum(math.log(k / t) for k, t in zip(clipped, total)) / 4
    brevity = 1.0 if c >= r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def lcs_length(a, b):
    """Longest common subsequence by the textbook recursion, memoised."""
    memo = {}

    def lcs(i, j):
        if i == len(a) or j == len(b):
            return 0
        if (i, j) not in memo:
            memo[i, j] = lcs(i + 1, j + 1) + 1 if a[i] == b[j] else max(lcs(i + 1, j), lcs(i, j + 1))
        return memo[i, j]

    return lcs(0, 0)


def ref_rouge_l(refs, preds, beta=1.2):
    """ROUGE-L (Lin 2004) per image: P = LCS / |candidate|, R = LCS / |reference|, the best P and best R
    over the references, F = (1 + beta^2) P R / (R + beta^2 P) (pycocoevalcap, beta = 1.2); mean of images."""
    scores = []
    for key, pred in preds.items():
        hyp = pred.split()
        if not hyp:
            scores.append(0.0)
            continue
        lcs = [lcs_length(ref.split(), hyp) for ref in refs[key]]
        p = max(x / len(hyp) for x in lcs)
        rec = max(x / len(ref.split()) for x, ref in zip(lcs, refs[key]))
        scores.append(0.0 if p == 0 or rec == 0 else (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p))
    return sum(scores) / len(scores)


def ref_cider_d(refs, preds, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015 and coco-caption): for n = 1..4, g^n(s) = tf-idf vector of s's
    n-grams with tf the raw count and idf log(|I| / max(1, df)), df = number of images whose references
    contain the n-gram; per reference s_j,
        CIDEr-D_n = exp(-(l_c - l_s)^2 / (2 sigma^2)) * (min(g_c, g_s) . g_s) / (|g_c| |g_s|)
    (0 if a norm is 0),
    averaged over n and over references, times 10; the corpus value is the mean over images.
    l = number of words (coco-caption counts bigrams, words - 1: the same difference for non-empty
    sentences, and an empty candidate scores 0 either way)."""
    num_images = len(preds)
    df = collections.Counter()
    for key in preds:
        df.update({gram for ref in refs[key] for n in range(1, 5) for gram in ngrams(ref.split(), n)})

    def vectors(words):
        return [{gram: count * math.log(num_images / max(1.0, df[gram]))
                 for gram, count in ngrams(words, n).items()} for n in range(1, 5)]

    def norm(vec):
        return math.sqrt(sum(v * v for v in vec.values()))

    total = 0.0
    for key, pred in preds.items():
        hyp = pred.split()
        g_c = vectors(hyp)
        per_ref = []
        for ref in refs[key]:
            words = ref.split()
            g_s = vectors(words)
            penalty = math.exp(-((len(hyp) - len(words)) ** 2) / (2 * sigma ** 2))
            per_n = []
            for vc, vs in zip(g_c, g_s):
                dot = sum(min(v, vs.get(gram, 0.0)) * vs.get(gram, 0.0) for gram, v in vc.items())
                denominator = norm(vc) * norm(vs)
                per_n.append(penalty * dot / denominator if denominator else 0.0)
            per_ref.append(sum(per_n) / 4)
        total += 10.0 * sum(per_ref) / len(per_ref)
    return total / num_images


def _java_children():
    """Live java processes started by this test process (the tokenizer's or METEOR's JVM)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "java" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


# --- the references themselves ------------------------------------------------------------------------

def test_reference_implementations_on_hand_computed_values():
    """The pure-Python references reproduce values worked out by hand, so they can judge pycocoevalcap."""
    # BLEU-4: candidate "the cat sat on the mat" vs "the cat sat on the mat today": every p_n = 1, c = 6,
    # r = 7, so BLEU = exp(1 - 7/6).
    assert ref_bleu4({"x": ["the cat sat on the mat today"]}, {"x": "the cat sat on the mat"}) == \
        pytest.approx(math.exp(1 - 7 / 6))
    # ROUGE-L: LCS("a b c d", "a c d e") = 3, P = R = 3/4, F = 3/4 for any beta.
    assert ref_rouge_l({"x": ["a b c d"]}, {"x": "a c d e"}) == pytest.approx(0.75)
    # CIDEr-D, see test_cider_hand_computed_corpus.
    assert ref_cider_d({"x": ["red dog"], "y": ["red cat"]}, {"x": "red dog", "y": "red cat"}) == \
        pytest.approx(5.0)


# --- against pycocoevalcap ------------------------------------------------------------------------------

@needs_java
def test_bleu_rouge_cider_match_independent_references():
    scores = caption_metrics(REFS, PREDS, metrics=("bleu4", "rouge_l", "cider"))
    assert list(scores) == ["bleu4", "rouge_l", "cider"]
    assert scores["bleu4"] == pytest.approx(ref_bleu4(REFS, PREDS), rel=1e-6)
    assert scores["rouge_l"] == pytest.approx(ref_rouge_l(REFS, PREDS), rel=1e-9)
    assert scores["cider"] == pytest.approx(ref_cider_d(REFS, PREDS), rel=1e-9)
    assert 0.0 < scores["bleu4"] < 1.0 and 0.0 < scores["rouge_l"] < 1.0 and scores["cider"] > 0.0


@needs_java
def test_brevity_penalty_applies_with_closest_reference_length():
    refs = {"a": ["the cat sat on the mat today"], "b": ["a dog ran across the green field fast"]}
    preds = {"a": "the cat sat on the mat", "b": "a dog ran across the field"}
    scores = caption_metrics(refs, preds, metrics=("bleu4",))
    assert scores["bleu4"] == pytest.approx(ref_bleu4(refs, preds), rel=1e-6)
    refs_full = {"a": ["the cat sat on the mat"], "b": ["a dog ran across the field"]}
    assert caption_metrics(refs_full, preds, metrics=("bleu4",))["bleu4"] == pytest.approx(1.0, rel=1e-6)


@needs_java
def test_cider_hand_computed_corpus():
    """Two images, refs "red dog" / "red cat", candidates equal to them. "red" is in both images' refs:
    idf log(2/2) = 0; "dog", "cat", "red dog", "red cat" have idf log 2. Per image: unigram cosine 1,
    bigram cosine 1, no 3- or 4-grams (0), equal lengths (penalty 1): 10 * (1 + 1 + 0 + 0) / 4 = 5."""
    refs = {"x": ["red dog"], "y": ["red cat"]}
    assert caption_metrics(refs, {"x": "red dog", "y": "red cat"}, metrics=("cider",))["cider"] == \
        pytest.approx(5.0)
    # Swapped candidates share only "red" (idf 0): 0.
    assert caption_metrics(refs, {"x": "red cat", "y": "red dog"}, metrics=("cider",))["cider"] == \
        pytest.approx(0.0, abs=1e-12)


@needs_java
def test_cider_identical_is_high_and_a_wrong_caption_lower():
    """Three images with disjoint 4-word captions: every n-gram has df 1, so a candidate equal to its
    reference has cosine 1 at every n: CIDEr-D = 10 exactly. A wrong caption for one image lowers it."""
    refs = {"1": ["black digit seven here"], "2": ["small red circle below"], "3": ["two green squares left"]}
    identical = {key: caps[0] for key, caps in refs.items()}
    assert caption_metrics(refs, identical, metrics=("cider",))["cider"] == pytest.approx(10.0)
    wrong = dict(identical, **{"3": "a small red circle"})
    score = caption_metrics(refs, wrong, metrics=("cider",))["cider"]
    assert score == pytest.approx(ref_cider_d(refs, wrong), rel=1e-9)
    assert score == pytest.approx(20.0 / 3, rel=1e-9)  # image 3 scores 0: no shared n-gram


@needs_java
def test_meteor_identical_high_unrelated_low_and_no_jvm_left(monkeypatch):
    started = []
    original = captioning._meteor_class

    def recording_class():
        base = original()

        class Recording(base):
            def __init__(self):
                super().__init__()
                started.append(self.meteor_p.pid)

        return Recording

    monkeypatch.setattr(captioning, "_meteor_class", recording_class)
    refs = {key: caps[:1] for key, caps in REFS.items()}
    identical = {key: caps[0] for key, caps in refs.items()}
    unrelated = {key: "purple elephants juggle quietly" for key in refs}
    high = caption_metrics(refs, identical, metrics=("meteor",))["meteor"]
    low = caption_metrics(refs, unrelated, metrics=("meteor",))["meteor"]
    assert high > 0.95 and low < 0.05, (high, low)
    assert len(started) == 2  # a JVM ran for each call ...
    for pid in started:  # ... and is gone (killed and reaped), not left to the garbage collector
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _java_children() == []


@needs_java
def test_all_metrics_with_empty_and_unicode_predictions():
    refs = dict(REFS, cafe=["un café très noir", "café noir"], empty=["a lonely caption"])
    preds = dict(PREDS, cafe="un café très noir", empty="")
    start = time.perf_counter()
    scores = caption_metrics(refs, preds)
    elapsed = time.perf_counter() - start
    assert list(scores) == ["bleu4", "meteor", "rouge_l", "cider"]
    assert all(math.isfinite(v) for v in scores.values())
    assert scores["bleu4"] == pytest.approx(ref_bleu4(refs, preds), rel=1e-6)
    assert scores["rouge_l"] == pytest.approx(ref_rouge_l(refs, preds), rel=1e-9)
    assert scores["cider"] == pytest.approx(ref_cider_d(refs, preds), rel=1e-9)
    assert 0.0 < scores["meteor"] < 1.0
    assert _java_children() == []
    assert elapsed < 60


@needs_java
def test_line_breaks_inside_captions_do_not_shift_images():
    """The PTB tokenizer works line by line; a "\\r" or U+2028 inside a caption must not move later
    captions onto other images."""
    refs = {"1": ["black digit seven here"], "2": ["small red circle below"], "3": ["two green squares left"]}
    preds = {"1": "black digit\rseven here", "2": "small red\u2028circle below",
             "3": b"two green squares left"}
    scores = caption_metrics(refs, preds, metrics=("bleu4", "cider"))
    assert scores["cider"] == pytest.approx(10.0)
    assert scores["bleu4"] == pytest.approx(1.0, rel=1e-6)


@needs_java
def test_a_dying_meteor_jvm_raises_and_leaves_nothing(monkeypatch):
    original = captioning._meteor_class

    def dying_class():
        base = original()

        class Dying(base):
            def compute_score(self, gts, res):
                self.meteor_p.kill()
                self.meteor_p.wait()
                return super().compute_score(gts, res)

        return Dying

    monkeypatch.setattr(captioning, "_meteor_class", dying_class)
    with pytest.raises(RuntimeError, match="METEOR"):
        caption_metrics(REFS, PREDS, metrics=("meteor",))
    gc.collect()  # pycocoevalcap's own __del__ would block here on the lock compute_score left held
    assert _java_children() == []


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)meteor.*`java`.*Install a Java runtime"):
        caption_metrics(REFS, PREDS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown metrics"):
        caption_metrics(REFS, PREDS, metrics=("spice",))
    with pytest.raises(ValueError, match="no references"):
        caption_metrics(REFS, dict(PREDS, other="a caption"))
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics(REFS, {})
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics(dict(REFS, bike=[]), PREDS)


# --- VQA ------------------------------------------------------------------------------------------------

def test_normalize_answer():
    assert normalize_answer("  Seven.  ") == "seven"
    assert normalize_answer("Forty   two!?") == "forty two"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer(b"NINE") == "nine"
    assert normalize_answer(7) == "7"


def test_vqa_accuracy_exact_match_after_normalisation():
    predictions = ["Seven.", "two ", "4", "eight", "the digit 3"]
    answers = ["seven", "Two", "four", "8", "the  digit 3!"]
    assert vqa_accuracy(predictions, answers) == pytest.approx(3 / 5)
    assert vqa_accuracy({"q1": "7", "q2": "1"}, {"q1": 7, "q2": ["one", "1"], "q3": "5"}) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError):
        vqa_accuracy({"q9": "1"}, {"q1": "1"})
    with pytest.raises(ValueError):
        vqa_accuracy([], [])
