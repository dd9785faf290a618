"""TF Serving warm-up requests: written as PredictionLogs that run against the export."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # noqa: F401  (SentencePiece ops for the in-process check)
from tensorflow_serving.apis import prediction_log_pb2

from keras_mm.export import serve, warmup
from tests.keras_mm.export import DIM, MAX_LEN, png, save_test_export, train_test_tokenizer

SIGNATURES = {"serving_default", "embed_image", "embed_text", "classify", "tokenize", "echo"}


@pytest.fixture(scope="module")
def pristine_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "digits" / "1"
    return save_test_export(str(path), train_test_tokenizer(), seed=1)


@pytest.fixture
def export_dir(pristine_export, tmp_path):
    """A fresh copy per test (the tests write into assets.extra/)."""
    return str(shutil.copytree(pristine_export, tmp_path / "digits" / "1"))


def read_logs_independently(export_dir):
    """The file as TF Serving reads it: a plain TFRecord of PredictionLog protos."""
    path = os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests")
    logs = []
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    return logs


def inputs_of(log):
    return {k: tf.make_ndarray(v) for k, v in log.predict_log.request.inputs.items()}


def test_default_requests_one_per_signature_run_against_the_export(export_dir):
    path = warmup.write_warmup_requests(export_dir)
    assert path == os.path.join(export_dir, "assets.extra", "tf_serving_warmup_requests")
    logs = read_logs_independently(export_dir)
    requests = {log.predict_log.request.model_spec.signature_name: log for log in logs}
    assert len(logs) == len(requests) == len(SIGNATURES)
    assert set(requests) == SIGNATURES
    assert {log.predict_log.request.model_spec.name for log in logs} == {"digits"}

    signatures = tf.saved_model.load(export_dir).signatures
    for name, log in requests.items():
        inputs = inputs_of(log)
        outputs = signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        for value in outputs.values():
            assert value.shape[0] >= 1
            if value.dtype.is_floating:
                assert np.all(np.isfinite(value.numpy()))
    image = inputs_of(requests["embed_image"])["image_bytes"]
    assert image.shape == (1,)
    assert tf.io.decode_jpeg(image[0]).shape[-1] == 3  # a real JPEG
    classify = inputs_of(requests["classify"])
    assert classify["image_bytes"].shape == (1,) and classify["labels"].shape == (2,)
    text = inputs_of(requests["embed_text"])["text"]
    assert text.dtype == object and text.shape == (1,)
    assert signatures["embed_text"](text=tf.constant(text))["embedding"].shape == (1, DIM)
    assert signatures["tokenize"](text=tf.constant(text))["ids"].shape == (1, MAX_LEN)

    # The package's reader and replayer agree with the independent parse.
    assert [log.SerializeToString() for log in warmup.read_warmup_requests(export_dir)] == [
        log.SerializeToString() for log in logs]
    assert warmup.run_warmup_requests(export_dir) == len(SIGNATURES)


def test_given_inputs_replace_the_defaults_and_are_validated(export_dir):
    images = [png(1), png(2)]
    labels = ["zero", "one", "seven"]
    warmup.write_warmup_requests(
        export_dir, {"classify": {"image_bytes": images, "labels": labels}}, model_name="m")
    logs = {log.predict_log.request.model_spec.signature_name: log
            for log in read_logs_independently(export_dir)}
    assert set(logs) == SIGNATURES
    classify = inputs_of(logs["classify"])
    assert classify["image_bytes"].tolist() == images
    assert [x.decode() for x in classify["labels"]] == labels

    with pytest.raises(ValueError, match="no signature 'nope'"):
        warmup.build_warmup_requests(export_dir, {"nope": {"text": ["a"]}})
    with pytest.raises(ValueError, match="takes inputs"):
        warmup.build_warmup_requests(export_dir, {"classify": {"image_bytes": images}})
    with pytest.raises(ValueError, match="shape"):
        warmup.build_warmup_requests(export_dir, {"embed_text": {"text": [["a"], ["b"]]}})
    with pytest.raises(ValueError, match="tensor"):
        warmup.build_warmup_requests(export_dir, {"embed_text": {"text": [1.5]}})


def test_a_failing_request_is_not_written(export_dir):
    with pytest.raises(ValueError, match="embed_image.*Unknown image file format"):
        warmup.write_warmup_requests(export_dir,
                                     {"embed_image": {"image_bytes": [b"not an image"]}})
    assert not os.path.exists(warmup.warmup_path(export_dir))


def test_kmm_serve_replays_warmup_and_rejects_a_version_whose_warmup_fails(export_dir):
    base = os.path.dirname(export_dir)
    warmup.write_warmup_requests(export_dir)
    server, _ = serve.build_server("digits", base, "127.0.0.1", 0,
                                   file_system_poll_wait_seconds=0)
    try:
        model = server.api.models["digits"]
        assert model.versions == [1]
        assert model.get().warmup_requests == len(SIGNATURES)
    finally:
        server.shutdown()
        server.server_close()

    warmup.write_warmup_requests(export_dir, {"embed_image": {"image_bytes": [b"x"]}},
                                 verify=False)
    with pytest.raises(RuntimeError, match="warm-up request"):
        serve.build_server("digits", base, "127.0.0.1", 0, file_system_poll_wait_seconds=0)
