"""Evaluation of trained models on frozen embeddings (DESIGN.md, run summary contract).

Modules (import them explicitly; this package imports nothing):

  embeddings     batched embedding of an eval dataset (images, captions, labels, ids) and of strings
  zero_shot      class names x eval templates -> prompt-ensembled classifier; top-1 / top-5
  retrieval      image->text and text->image Recall@K (COCO protocol; identical items are true
                 pairs)
  linear_probe   logistic-regression linear probe and big_vision-style closed-form few-shot
  captioning     COCO caption metrics (pycocoevalcap: BLEU-4, METEOR, ROUGE-L, CIDEr) and VQA accuracy
  caption_samples  predicted / reference captions and their images in TensorBoard

Evaluators never import model classes: they take
``embed_image(images [B, S, S, 3] float32) -> [B, D]`` and
``embed_text(token_ids [B, L] int32) -> [B, D]`` callables (anything returning arrays/tensors).
Metric names follow DESIGN.md's summary contract; accuracies and recalls are fractions in [0, 1].
"""
