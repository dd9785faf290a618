"""keras-mm: multimodal pretraining (CLIP, SigLIP, LiT, LIMoE, CoCa, ...) for TensorFlow / Keras 3.

Importing the package is cheap on purpose: Beam workers import ``keras_mm.pipelines`` and
``keras_mm.beam_jobs`` without pulling in Keras. Import submodules explicitly.
"""

__version__ = "0.1.0"
