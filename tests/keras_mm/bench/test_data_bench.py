"""`kmm bench data` stays runnable: a tiny run gives positive figures for every setting."""

import io

import numpy as np
from PIL import Image

from keras_mm.bench import data as bench_data
from keras_mm.pipelines import features


def test_photo_records_are_distinct_real_jpegs():
    records = bench_data.photo_records(6)
    hashes = set()
    for r in records:
        image = np.asarray(Image.open(io.BytesIO(r[features.IMAGE_ENCODED])))
        assert image.shape == (r[features.IMAGE_HEIGHT], r[features.IMAGE_WIDTH], 3)
        assert min(image.shape[:2]) >= 256
        assert image.std() > 10  # a photo, not a flat fill
        hashes.add(image.tobytes())
    assert len(hashes) == len(records)


def test_tiny_bench_run(tmp_path):
    out = bench_data.run(["--skip_beam", "--num_photos", "8", "--batch_size", "4",
                          "--num_batches", "2", "--warmup", "1", "--image_size", "64",
                          "--workdir", str(tmp_path)])
    assert [r["augment"] for r in out["tf_data"]] == ["crop_flip", "randaugment"]
    for r in out["tf_data"]:
        assert r["examples_per_second"] > 0 and r["batches"] == 2 and r["batch_size"] == 4
