"""Apache Beam jobs that turn raw data into TFRecord datasets (installed as ``keras_mm.beam_jobs``).

Each job is a module with PTransforms and a ``run(argv)`` entry point.
"""
