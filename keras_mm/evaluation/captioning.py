"""Caption metrics as COCO reports them (pycocoevalcap) and exact-match VQA accuracy.

``caption_metrics`` runs the COCO caption evaluation (Chen et al. 2015, "Microsoft COCO Captions: Data
Collection and Evaluation Server"; the ``pycocoevalcap`` package) on a dict of references and a dict of
predictions, one caption per image:

1. every caption goes through the Stanford PTBTokenizer (lower-cased, punctuation removed), as COCO's
   ``COCOEvalCap.evaluate`` does;
2. ``bleu4``: corpus-level BLEU-4 (Papineni et al. 2002) with the closest reference length for the brevity
   penalty (the 4th value of ``Bleu(4)``);
3. ``meteor``: METEOR 1.5 (Denkowski & Lavie 2014), corpus-level, through its Java jar;
4. ``rouge_l``: ROUGE-L (Lin 2004), LCS-based F-measure with beta = 1.2, averaged over images;
5. ``cider``: CIDEr-D (Vedantam et al. 2015): tf-idf n-grams 1..4 with document frequencies from the
   references of the evaluated corpus, clipping, a Gaussian length penalty (sigma = 6), x 10.

Scores are on pycocoevalcap's raw scale (CIDEr 1.0 is the "100" of papers), as DESIGN.md's summary contract
says. SPICE is not computed (it needs a Stanford CoreNLP download).

Java: the tokenizer and METEOR are Java programs (pycocoevalcap ships the jars); ``java`` (8 or later) must
be on PATH, otherwise a RuntimeError says so. METEOR starts a JVM that loads a paraphrase table (a few
seconds); it is started only when asked for and always terminated before ``caption_metrics`` returns.

Robustness beyond pycocoevalcap: captions may be bytes (UTF-8) or contain any Unicode; line breaks of any
kind inside a caption are replaced by spaces (the tokenizer works line by line, and a stray "\\r" or
U+2028 would otherwise shift every later caption onto the wrong image); an empty prediction is scored as
an empty caption (0 on every metric for that image), not an error.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import string
from typing import Dict, Iterable, List, Mapping, Sequence, Union

METRICS = ("bleu4", "meteor", "rouge_l", "cider")

_INSTALL_JAVA = (
    "Install a Java runtime (8 or later) and put `java` on PATH, e.g. `apt-get install default-jre-headless` "
    "(Debian/Ubuntu), `brew install openjdk` (macOS) or `conda install openjdk`.")


def _as_text(caption) -> str:
    """A caption as one line of text: bytes decoded as UTF-8, every kind of line break a space."""
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    if not isinstance(caption, str):
        raise TypeError(f"caption_metrics: captions must be str or bytes, got {type(caption).__name__}")
    return " ".join(caption.splitlines())


def _require_java(metrics: Sequence[str]) -> None:
    if shutil.which("java") is None:
        needs = ", ".join(metrics)
        raise RuntimeError(
            f"caption_metrics ({needs}): pycocoevalcap runs Java for the COCO PTBTokenizer, which every "
            f"caption metric uses, and for METEOR, but no `java` executable was found on PATH. "
            + _INSTALL_JAVA)


def _tokenize(captions_per_image: Dict[int, List[str]]) -> Dict[int, List[str]]:
    """COCO PTB tokenization. Input {id: [caption, ...]}; pycocoevalcap wants {id: [{"caption": str}]}
    and returns {id: [tokenized caption, ...]} (lower-cased, punctuation tokens removed, space-joined)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {key: [{"caption": c} for c in caps] for key, caps in captions_per_image.items()}
    try:
        tokenized = PTBTokenizer().tokenize(wrapped)
    except FileNotFoundError as error:  # java vanished between the check and the call
        raise RuntimeError(f"caption_metrics: the PTBTokenizer could not run Java ({error}). "
                           + _INSTALL_JAVA) from error
    except PermissionError as error:
        raise RuntimeError(
            "caption_metrics: pycocoevalcap's PTBTokenizer writes a temporary file next to its jar "
            f"(inside the installed package) and could not: {error}. Install pycocoevalcap into a "
            "writable environment (e.g. a virtualenv).") from error
    for key, caps in captions_per_image.items():
        if len(tokenized.get(key, ())) != len(caps):
            raise RuntimeError(
                f"caption_metrics: the PTBTokenizer returned {len(tokenized.get(key, ()))} captions for an "
                f"image that has {len(caps)}; its output is misaligned with the input.")
    return tokenized


def _meteor_class():
    from pycocoevalcap.meteor.meteor import Meteor

    class ClosableMeteor(Meteor):
        """pycocoevalcap's Meteor (1.2) starts ``java -jar meteor-1.5.jar - - -stdio`` in ``__init__`` and has
        no close(): only ``__del__`` kills the JVM, when the object happens to be garbage collected, and it
        first takes ``self.lock``, which ``compute_score`` leaves held if it raised: ``__del__`` would then
        block forever. ``close`` ends the process without the lock, and ``__del__`` calls ``close``."""

        def close(self):
            process = getattr(self, "meteor_p", None)
            self.meteor_p = None
            if process is None:
                return ""
            for stream in (process.stdin, process.stdout):
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
            if process.poll() is None:
                process.kill()
            process.wait()
            errors = ""
            with contextlib.suppress(OSError, ValueError):
                errors = process.stderr.read().decode("utf-8", errors="replace")
                process.stderr.close()
            return errors

        def __del__(self):
            self.close()

    return ClosableMeteor


def _meteor(gts: Dict[int, List[str]], res: Dict[int, List[str]]) -> float:
    try:
        meteor = _meteor_class()()
    except FileNotFoundError as error:
        raise RuntimeError(f"caption_metrics (meteor): METEOR could not start Java ({error}). "
                           + _INSTALL_JAVA) from error
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as error:  # the JVM died: an empty reply line, or a broken pipe
        stderr = meteor.close()
        raise RuntimeError(f"caption_metrics (meteor): the METEOR Java process failed: {error}; its "
                           f"stderr: {stderr.strip()[-2000:]}") from error
    finally:
        meteor.close()
    return float(score)


def caption_metrics(
    references: Mapping[str, Union[Sequence[str], str]],
    predictions: Mapping[str, str],
    metrics: Iterable[str] = METRICS,
) -> Dict[str, float]:
    """COCO caption metrics of ``predictions`` against ``references``.

    Args:
        references: {image id: [reference caption, ...]} (a single str is one reference). Raw text: it is
            PTB-tokenized here. Every predicted id must be present; references of ids without a prediction
            are ignored (they do not enter CIDEr's document frequencies either).
        predictions: {image id: predicted caption} (raw text; may be empty).
        metrics: the subset of ("bleu4", "meteor", "rouge_l", "cider") to compute; leaving out METEOR
            (a JVM start and a few seconds) is the fast path.

    Returns:
        {metric: float} for the requested metrics, on pycocoevalcap's raw scale.

    Raises:
        ValueError: an unknown metric, no predictions, a predicted id without references, or an image whose
            reference list is empty.
        RuntimeError: Java is missing or one of the Java programs failed.
    """
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"caption_metrics: unknown metrics {unknown}; choose from {METRICS}")
    if not predictions:
        raise ValueError("caption_metrics: no predictions to evaluate")
    missing = [key for key in predictions if key not in references]
    if missing:
        raise ValueError(
            f"caption_metrics: {len(missing)} predicted ids have no references, e.g. {missing[:5]}")

    # pycocoevalcap keys: small ints in the predictions' order (ids of any type and order stay out of it).
    gts_raw, res_raw = {}, {}
    for index, key in enumerate(predictions):
        refs = references[key]
        refs = [refs] if isinstance(refs, (str, bytes)) else list(refs)
        if not refs:
            raise ValueError(f"caption_metrics: image {key!r} has no reference captions")
        gts_raw[index] = [_as_text(r) for r in refs]
        res_raw[index] = [_as_text(predictions[key])]

    _require_java(metrics)
    gts = _tokenize(gts_raw)
    res = _tokenize(res_raw)

    results = {}
    if "bleu4" in metrics:
        from pycocoevalcap.bleu.bleu import Bleu

        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram totals
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        results["bleu4"] = float(bleu[3])
    if "meteor" in metrics:
        results["meteor"] = _meteor(gts, res)
    if "rouge_l" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        results["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        from pycocoevalcap.cider.cider import Cider

        results["cider"] = float(Cider().compute_score(gts, res)[0])
    return {m: results[m] for m in metrics}


_TRAILING_PUNCTUATION = string.punctuation


def normalize_answer(answer) -> str:
    """Lower-case, trim, collapse runs of whitespace to one space, strip trailing punctuation ("Seven." ->
    "seven"). Bytes are decoded as UTF-8; other values (an int answer) go through str()."""
    if isinstance(answer, bytes):
        answer = answer.decode("utf-8", errors="replace")
    answer = " ".join(str(answer).lower().split())
    return answer.rstrip(_TRAILING_PUNCTUATION).rstrip()


def vqa_accuracy(predictions, answers) -> float:
    """Exact-match accuracy of answers after ``normalize_answer``.

    The project's digit QA has exactly one ground-truth answer per question, so this is plain exact match,
    not the VQA v2 min(#annotators agreeing / 3, 1) score averaged over annotator subsets (which needs ten
    human answers per question).

    Args:
        predictions: predicted answers, a sequence, or a {question id: answer} mapping.
        answers: the ground truth, aligned with ``predictions``: a sequence of the same length, or a mapping
            holding every predicted id. An entry may also be a list of accepted answers (a hit if any
            matches).

    Returns:
        The fraction of questions answered correctly, in [0, 1].
    """
    if isinstance(predictions, Mapping):
        if not isinstance(answers, Mapping):
            raise TypeError("vqa_accuracy: predictions is a mapping, so answers must be one too")
        missing = [key for key in predictions if key not in answers]
        if missing:
            raise ValueError(f"vqa_accuracy: {len(missing)} ids have no answer, e.g. {missing[:5]}")
        pairs = [(predictions[key], answers[key]) for key in predictions]
    else:
        predictions, answers = list(predictions), list(answers)
        if len(predictions) != len(answers):
            raise ValueError(f"vqa_accuracy: {len(predictions)} predictions but {len(answers)} answers")
        pairs = list(zip(predictions, answers))
    if not pairs:
        raise ValueError("vqa_accuracy: no predictions to evaluate")
    hits = 0
    for predicted, truth in pairs:
        accepted = list(truth) if isinstance(truth, (list, tuple, set, frozenset)) else [truth]
        hits += normalize_answer(predicted) in {normalize_answer(a) for a in accepted}
    return hits / len(pairs)
