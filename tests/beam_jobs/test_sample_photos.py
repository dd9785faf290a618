"""sample-photos: the bundled photos load offline, have hand-written captions, and the job writes
them all to the test split unchanged (pixels compared with the packages' own loaders)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from keras_mm.beam_jobs import image_text, sample_photos
from tests.beam_jobs.image_samples import read_dataset

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "horse",
           "clock", "page", "text", "hubble_deep_field")
SKLEARN = {"china": "china.jpg", "flower": "flower.jpg"}


def _from_package(name):
    """The photo straight from its package, made RGB here (grey / bool -> 3 equal channels)."""
    if name in SKLEARN:
        from sklearn.datasets import load_sample_image

        return load_sample_image(SKLEARN[name])
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.dtype == bool:
        image = np.where(image, 255, 0).astype(np.uint8)
    return np.dstack([image] * 3) if image.ndim == 2 else image


@pytest.fixture(scope="module")
def photos():
    return sample_photos.sample_photos()


def test_every_photo_loads_as_rgb_with_captions(photos):
    names = [name for name, _, _ in photos]
    assert sorted(names) == sorted(SKIMAGE + tuple(SKLEARN))
    for name, image, captions in photos:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 150 and image.std() > 10, name   # a real picture
        np.testing.assert_array_equal(image, _from_package(name))
        assert 2 <= len(captions) <= 3 and len(set(captions)) == len(captions), name
        assert all(c.strip() == c and len(c.split()) >= 3 and c == c.lower() for c in captions)
    assert len({image.tobytes() for _, image, _ in photos}) == len(photos)


def test_unknown_photo_is_an_error():
    with pytest.raises(ValueError, match="unknown sample photo"):
        sample_photos.load_photo("lena")


def test_job_writes_every_photo_to_the_test_split(tmp_path, photos):
    out = str(tmp_path / "photos")
    s = image_text.run(["--source", "sample-photos", "--out", out])
    assert s["splits"] == {"train": 0, "validation": 0, "test": len(photos)}
    assert s["consistent"] is True and s["dead_letters"]["total"] == 0
    records = read_dataset(out)
    assert set(records) == {f"photo-{name}" for name, _, _ in photos}
    for name, image, captions in photos:
        record = records[f"photo-{name}"]
        decoded = np.asarray(Image.open(io.BytesIO(record["image/encoded"])).convert("RGB"))
        np.testing.assert_array_equal(decoded, image)
        assert record["texts"] == captions and record["questions"] == []
