"""SavedModel export and serving.

Modules (import them explicitly; importing this package imports nothing):

- ``keras_mm.export.serve``: ``kmm serve``, a local server that speaks TF Serving's REST API
  (for development and tests; production uses the ``tensorflow/serving`` docker image).
- ``keras_mm.export.warmup``: TF Serving warm-up requests
  (``assets.extra/tf_serving_warmup_requests``) for an export directory.
"""
