"""Captioner evaluation: generate captions (and answers) for an eval split and score them.

    metrics, samples = evaluate_captions(model, caption_eval_dataset(...), tokenizer)

Captions come from the model's in-graph search (``CaptionerMixin.generate``: greedy, beam or
sampling), detokenized with the dataset's SentencePiece model, and are scored against every
reference caption of the image with pycocoevalcap (``keras_mm.evaluation.captioning``: CIDEr,
BLEU-4, METEOR, ROUGE-L on its raw scale). The PaLI-style model captions with its captioning
prompt and answers every question of the scenes (``evaluate_vqa``: exact match).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import keras
import numpy as np

from keras_mm.evaluation import captioning as caption_metrics_lib


def _strings(values) -> List[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for v in np.asarray(values).reshape(-1)]


def generate_function(model, *, method="greedy", beam_size=4, length_penalty=0.6,
                      max_length=None, with_prompt=False, prompt_key="prompt"):
    """A callable ``(images[, prompt]) -> token ids [B, T]`` numpy, compiled once on TF.

    With ``with_prompt`` the second argument goes to ``model.generate`` as ``prompt_key``
    (``"prompt"`` for the PaLI-style model, ``"current"`` for MV-GPT's present utterance)."""
    kwargs = dict(method=method, beam_size=beam_size, length_penalty=length_penalty,
                  max_length=max_length)

    def run(images, prompt=None):
        if with_prompt:
            return model.generate(images, **{prompt_key: prompt}, **kwargs)
        return model.generate(images, **kwargs)

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(run, reduce_retracing=True)
        return lambda images, prompt=None: compiled(images, prompt).numpy()
    return lambda images, prompt=None: keras.ops.convert_to_numpy(run(images, prompt))


def _prompt_ids(tokenizer, texts, max_prompt_len):
    """Prompts as the training pipeline tokenizes them (no BOS, EOS-terminated)."""
    return tokenizer.tokenize(texts, max_prompt_len, add_bos=False, add_eos=True).numpy()


def evaluate_captions(model, dataset, tokenizer, *, method="greedy", beam_size=4,
                      length_penalty=0.6, max_length=None, prompt: Optional[str] = None,
                      max_prompt_len: int = 16, max_examples: Optional[int] = None,
                      metrics=caption_metrics_lib.METRICS) -> Tuple[Dict[str, float], Dict]:
    """Captions every image of ``dataset`` (``pipelines.datasets.caption_eval_dataset``).

    Args:
        prompt: the PaLI-style model's captioning prompt (None for the other captioners).
    Returns:
        ``(metrics, samples)``: ``{"cider", "bleu4", "meteor", "rouge_l"}`` and
        ``{"ids", "predictions", "references", "images"}`` of the first batch (TensorBoard).
    """
    generate = generate_function(model, method=method, beam_size=beam_size,
                                 length_penalty=length_penalty, max_length=max_length,
                                 with_prompt=prompt is not None)
    predictions, references, samples, count = {}, {}, None, 0
    for batch in dataset:
        images = batch["image"]
        prompt_ids = None
        if prompt is not None:
            prompt_ids = _prompt_ids(tokenizer, [prompt] * int(images.shape[0]), max_prompt_len)
        tokens = generate(images, prompt_ids)
        texts = _strings(tokenizer.detokenize(tokens).numpy())
        ids = _strings(batch["id"].numpy())
        refs = batch["texts"].numpy()
        for i, key in enumerate(ids):
            predictions[key] = texts[i]
            references[key] = [r for r in _strings(refs[i]) if r]
        if samples is None:
            samples = {"ids": ids, "predictions": texts, "images": images.numpy(),
                       "references": [references[k] for k in ids]}
        count += len(ids)
        if max_examples and count >= max_examples:
            break
    scores = caption_metrics_lib.caption_metrics(references, predictions, metrics=metrics)
    return scores, samples


def evaluate_vqa(model, dataset, tokenizer, *, max_prompt_len: int = 16,
                 max_length: Optional[int] = None,
                 max_examples: Optional[int] = None) -> Dict[str, float]:
    """Greedy answers of the PaLI-style model to every question of every scene; exact match after
    ``captioning.normalize_answer``. Returns ``{"vqa_accuracy", "vqa_questions"}``."""
    generate = generate_function(model, max_length=max_length, with_prompt=True)
    predicted, expected, count = [], [], 0
    for batch in dataset:
        questions, answers = batch["questions"].numpy(), batch["answers"].numpy()
        images = batch["image"].numpy()
        for j in range(questions.shape[1]):
            asked = [i for i in range(questions.shape[0]) if questions[i, j]]
            if not asked:
                continue
            prompt_ids = _prompt_ids(tokenizer, [questions[i, j] for i in asked], max_prompt_len)
            tokens = generate(images[asked], prompt_ids)
            predicted += _strings(tokenizer.detokenize(tokens).numpy())
            expected += _strings([answers[i, j] for i in asked])
        count += images.shape[0]
        if max_examples and count >= max_examples:
            break
    if not expected:
        raise ValueError("vqa: the eval split has no questions (records need 'questions' and "
                         "'answers'; `kmm data image-text --source digit-scenes` writes them)")
    return {"vqa_accuracy": caption_metrics_lib.vqa_accuracy(predicted, expected),
            "vqa_questions": float(len(expected))}
