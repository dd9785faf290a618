"""Test data for the Beam job tests: images in every awkward mode, files, tars, dataset reading.

Images are smooth synthetic pictures (so JPEG loss stays small and comparisons can be tight),
different for every seed (so de-duplication by pixels never merges two test images by accident).
Expected pixels are computed here from the arrays the images were made from, with the textbook
formulas (alpha over white, CMYK -> RGB), never by the code under test.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Tuple

import numpy as np
from PIL import Image


class Images:
    """Makes test images (arrays and encoded bytes) and the pixels a job should produce."""

    @staticmethod
    def smooth(seed: int, height: int = 40, width: int = 56, channels: int = 3) -> np.ndarray:
        """A smooth uint8 [height, width, channels] picture, different for every seed."""
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width].astype(np.float64)
        planes = []
        for c in range(channels):
            a, b = rng.uniform(-2, 2, 2)
            base = rng.uniform(60, 190)
            planes.append(base + a * (x - width / 2) + b * (y - height / 2)
                          + 20 * np.sin(x / 7 + c + seed) * np.cos(y / 9))
        return np.clip(np.stack(planes, -1), 0, 255).round().astype(np.uint8)

    @staticmethod
    def encode(array: np.ndarray, fmt: str, mode: str = None, **kwargs) -> bytes:
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
        buf = io.BytesIO()
        if fmt == "JPEG":
            kwargs.setdefault("quality", 95)
        image.save(buf, format=fmt, **kwargs)
        return buf.getvalue()

    def png(self, seed: int, **kw) -> Tuple[bytes, np.ndarray]:
        """(RGB PNG bytes, expected RGB pixels)."""
        arr = self.smooth(seed, **kw)
        return self.encode(arr, "PNG"), arr

    def jpeg(self, seed: int, **kw) -> Tuple[bytes, np.ndarray]:
        arr = self.smooth(seed, **kw)
        return self.encode(arr, "JPEG"), arr

    def webp(self, seed: int, **kw) -> Tuple[bytes, np.ndarray]:
        """Lossless WebP."""
        arr = self.smooth(seed, **kw)
        return self.encode(arr, "WEBP", lossless=True), arr

    def rgba_png(self, seed: int) -> Tuple[bytes, np.ndarray]:
        """(RGBA PNG with a varying alpha, expected pixels: composited on white)."""
        rgb = self.smooth(seed).astype(np.float64)
        h, w = rgb.shape[:2]
        alpha = np.tile(np.linspace(0, 255, w), (h, 1)).round()
        alpha[: h // 3] = 0      # fully transparent band -> white
        alpha[-h // 3:] = 255    # opaque band -> the colour itself
        rgba = np.concatenate([rgb, alpha[..., None]], -1).astype(np.uint8)
        a = alpha[..., None] / 255.0
        expected = rgb * a + 255.0 * (1.0 - a)
        return self.encode(rgba, "PNG", "RGBA"), np.clip(expected.round(), 0, 255).astype(
            np.uint8)

    def gray_jpeg(self, seed: int) -> Tuple[bytes, np.ndarray]:
        """(grayscale JPEG, expected RGB: the grey value in all three channels)."""
        gray = self.smooth(seed, channels=1)[..., 0]
        return self.encode(gray, "JPEG", "L"), np.repeat(gray[..., None], 3, -1)

    def cmyk_jpeg(self, seed: int) -> Tuple[bytes, np.ndarray]:
        """(CMYK JPEG, expected RGB: R = (255 - C)(255 - K)/255, likewise G from M, B from Y)."""
        cmyk = self.smooth(seed, channels=4)
        cmyk[..., 3] //= 3  # keep black moderate so the colours carry information
        c, m, y, k = (cmyk[..., i].astype(np.float64) for i in range(4))
        rgb = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)],
                       -1) / 255.0
        return self.encode(cmyk, "JPEG", "CMYK"), rgb.round().astype(np.uint8)

    def truncated_jpeg(self, seed: int) -> bytes:
        """A real JPEG cut after 60% of its bytes."""
        data, _ = self.jpeg(seed)
        return data[: int(len(data) * 0.6)]

    def corrupt_jpeg(self, seed: int = 0) -> bytes:
        """A real JPEG whose header segments (after the SOI marker) are overwritten with noise."""
        data = bytearray(self.jpeg(seed)[0])
        data[2:202] = np.random.default_rng(seed).integers(0, 256, 200, dtype=np.uint8).tobytes()
        return bytes(data)

    @staticmethod
    def decode(data: bytes) -> Tuple[str, np.ndarray]:
        """(PIL format, RGB pixels) of encoded bytes."""
        image = Image.open(io.BytesIO(data))
        fmt, mode = image.format, image.mode
        assert mode == "RGB", f"written image has mode {mode}, expected RGB"
        return fmt, np.asarray(image)


def assert_close(actual: np.ndarray, expected: np.ndarray, lossless: bool, what: str = ""):
    """Exact (up to 1 for alpha rounding) for lossless sources, JPEG-close otherwise."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    if lossless:
        assert diff.max() <= 1, f"{what}: lossless pixels differ by up to {diff.max()}"
    else:
        assert diff.mean() < 2.0 and diff.max() <= 12, (
            f"{what}: JPEG pixels differ too much (mean {diff.mean():.2f}, max {diff.max()})")


def write_tar(path: Path, members: Iterable[Tuple[str, bytes]], mode: str = "w") -> Path:
    """A tar file with the given (name, data) members, in order."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_jsonl(path: Path, rows: Iterable) -> Path:
    """JSON lines; a str row is written as is (to make bad lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
             for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_dataset(out: str) -> Dict[str, Dict]:
    """Every record of a dataset folder, by id, decoded with features.deserialize."""
    import tensorflow as tf

    from keras_mm.pipelines import features

    records = {}
    for path in sorted(tf.io.gfile.glob(f"{out}/*.tfrecord-*")):
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            record = features.deserialize(serialized, features.IMAGE_TEXT)
            assert record["id"] not in records, f"id {record['id']} written twice"
            records[record["id"]] = record
    return records


def dead_by_id(out: str) -> Dict[str, str]:
    from keras_mm.beam_jobs import dataset_writer

    letters = dataset_writer.read_dead_letters(out)
    return {d["id"]: d["reason"] for d in letters}
