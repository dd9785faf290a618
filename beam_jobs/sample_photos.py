"""sample-photos: 14 real photos that ship inside scikit-image and scikit-learn, with captions
written by hand for this project (no package ships real image-caption text).

Photos: scikit-image 0.26's bundled ``skimage.data`` images (astronaut, chelsea, coffee, rocket,
camera, coins, moon, horse, clock, page, text, hubble_deep_field; the grayscale ones and the
binary horse silhouette are converted to RGB) and scikit-learn's ``load_sample_images``
(china, flower). All load offline. Each has 2-3 lower-case captions describing what is visible.

``--source sample-photos`` writes them all into the ``test`` split with ids ``photo-<name>``,
as lossless RGB PNGs: a small real-photo test set for captioners and zero-shot retrieval.

    kmm data image-text --source sample-photos --out runs/sample_photos
"""

from __future__ import annotations

import io
from typing import List, Tuple

import apache_beam as beam
import numpy as np

from keras_mm.beam_jobs import records as rec

SPLIT = "test"

# (name, package, loader, captions). Captions were written looking at each image.
PHOTOS: Tuple[Tuple[str, str, str, Tuple[str, ...]], ...] = (
    ("astronaut", "skimage", "astronaut", (
        "a smiling woman astronaut in an orange spacesuit",
        "an astronaut posing next to an american flag and a model space shuttle",
        "a portrait of an astronaut in an orange suit with a black helmet in front of her")),
    ("chelsea", "skimage", "chelsea", (
        "a close up of a tabby cat's face with green eyes",
        "a brown striped cat with long white whiskers")),
    ("coffee", "skimage", "coffee", (
        "a cup of espresso on a red saucer with a spoon",
        "a red coffee cup and saucer on a wooden table")),
    ("rocket", "skimage", "rocket", (
        "a white rocket on a launch pad at dusk",
        "a rocket standing between tall steel towers under a dark blue sky",
        "a rocket on the launch pad with bright lights at its base")),
    ("camera", "skimage", "camera", (
        "a black and white photo of a man looking through a camera on a tripod",
        "a cameraman in a dark coat filming on a grassy field")),
    ("coins", "skimage", "coins", (
        "rows of old coins on a dark background",
        "a black and white photo of ancient greek coins")),
    ("moon", "skimage", "moon", (
        "a grey close up of the surface of the moon with small craters",
        "a black and white image of the lunar surface")),
    ("horse", "skimage", "horse", (
        "a black silhouette of a horse on a white background",
        "the outline of a standing horse facing right")),
    ("clock", "skimage", "clock", (
        "a motion blurred photo of a round clock on a grey wall",
        "a blurry wall clock")),
    ("page", "skimage", "page", (
        "a page of a book about region based segmentation",
        "a grey photo of printed text with a heading and a line of code")),
    ("text", "skimage", "text", (
        "handwritten equations on lined paper",
        "a close up of mathematical notes written in pen")),
    ("hubble_deep_field", "skimage", "hubble_deep_field", (
        "the hubble deep field full of distant galaxies",
        "a black sky with many small colourful galaxies and stars")),
    ("china", "sklearn", "china.jpg", (
        "a chinese pagoda with red pillars above a lake",
        "a tall temple tower among green trees overlooking a lake")),
    ("flower", "sklearn", "flower.jpg", (
        "an orange dahlia flower in front of dark green leaves",
        "a round orange flower with many petals")),
)
NAMES = tuple(name for name, *_ in PHOTOS)


def photo_id(name: str) -> str:
    return f"photo-{name}"


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 / bool ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` -> uint8 ``[H, W, 3]``
    (bool: True white; alpha dropped)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or bool image, got {image.dtype}")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def load_photo(name: str) -> np.ndarray:
    """One photo as uint8 ``[H, W, 3]`` RGB (offline)."""
    entry = {n: (package, loader) for n, package, loader, _ in PHOTOS}
    if name not in entry:
        raise ValueError(f"unknown sample photo {name!r}; one of {NAMES}")
    package, loader = entry[name]
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return to_rgb(load_sample_image(loader))
    import skimage.data

    return to_rgb(getattr(skimage.data, loader)())


def sample_photos() -> List[Tuple[str, np.ndarray, List[str]]]:
    """Every photo: ``(name, uint8 [H, W, 3] RGB, [captions])``."""
    return [(name, load_photo(name), list(captions)) for name, _, _, captions in PHOTOS]


def _candidate(name: str) -> rec.Candidate:
    from PIL import Image

    captions = next(c for n, _, _, c in PHOTOS if n == name)
    buf = io.BytesIO()
    Image.fromarray(load_photo(name), mode="RGB").save(buf, format="PNG")
    return rec.Candidate(id=photo_id(name), captions=tuple(captions), split=SPLIT,
                         source=f"keras_mm.beam_jobs.sample_photos:{name}",
                         image_bytes=buf.getvalue())


class ReadSamplePhotos(beam.PTransform):
    """The bundled photos -> ``(candidates, no dead letters)``, pinned to the test split."""

    def expand(self, pbegin):
        candidates = (pbegin | "PhotoNames" >> beam.Create(list(NAMES))
                      | "SpreadPhotos" >> beam.Reshuffle()
                      | "LoadPhotos" >> beam.Map(_candidate))
        dead = pbegin | "NoSourceDeadLetters" >> beam.Create([])
        return candidates, dead
