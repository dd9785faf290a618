"""kmm serve: TF Serving's REST contract over a real SavedModel with tensorflow-text ops.

Reference numbers come from the same SavedModel loaded in-process and called directly.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_text  # noqa: F401  (SentencePiece ops for the in-process reference)

from keras_mm.export import serve
from tests.keras_mm.export import DIM, MAX_LEN, jpeg, png, save_test_export, train_test_tokenizer

MODEL = "siglip_test"


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def call(server, method: str, path: str, body=None, headers=None):
    """One request on a fresh connection -> (status, parsed JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(data)
    finally:
        connection.close()


def predict(server, body, model=MODEL, version=None):
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    return call(server, "POST", path, body)


@pytest.fixture(scope="module")
def sp_model():
    return train_test_tokenizer()


@pytest.fixture(scope="module")
def base_path(tmp_path_factory, sp_model):
    base = tmp_path_factory.mktemp("saved_models") / MODEL
    save_test_export(str(base / "1"), sp_model, seed=1)
    save_test_export(str(base / "2"), sp_model, seed=2)
    (base / "README").write_text("not a version folder")
    (base / "10.tmp").mkdir()  # not an integer: ignored
    return base


@pytest.fixture(scope="module")
def reference(base_path):
    """The served (newest) and the older version, loaded in-process."""
    return {v: tf.saved_model.load(str(base_path / str(v))).signatures for v in (1, 2)}


@pytest.fixture(scope="module")
def server(base_path):
    server, thread = serve.build_server(MODEL, str(base_path), "127.0.0.1", 0)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


IMAGES = [png(1), jpeg(2), png(3, size=40)]
TEXTS = ["a photo of the number seven.", "東京の写真", "Café drawing of a TWO", ""]
LABELS = ["zero", "one", "seven", "a drawing of a nine"]


def run_reference(signatures, name, **inputs):
    outputs = signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def test_status_serves_the_newest_version(server):
    ok = {"version": "2", "state": "AVAILABLE",
          "status": {"error_code": "OK", "error_message": ""}}
    assert call(server, "GET", f"/v1/models/{MODEL}") == (200, {"model_version_status": [ok]})
    assert call(server, "GET", f"/v1/models/{MODEL}/versions/2") == (
        200, {"model_version_status": [ok]})
    status, body = call(server, "GET", f"/v1/models/{MODEL}/versions/1")
    assert status == 404 and "version 1" in body["error"]
    status, body = call(server, "GET", "/v1/models/nope")
    assert status == 404 and "nope" in body["error"]


def test_metadata_lists_signatures_with_dtypes_and_shapes(server):
    status, body = call(server, "GET", f"/v1/models/{MODEL}/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": MODEL, "signature_name": "", "version": "2"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "embed_image", "embed_text", "classify", "tokenize",
            "echo"} <= set(defs)
    classify = defs["classify"]
    assert classify["method_name"] == "tensorflow/serving/predict"
    assert set(classify["inputs"]) == {"image_bytes", "labels"}
    image = classify["inputs"]["image_bytes"]
    assert image["dtype"] == "DT_STRING"
    assert image["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    scores = classify["outputs"]["scores"]
    assert scores["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in scores["tensor_shape"]["dim"]] == ["-1", "-1"]
    embedding = defs["embed_text"]["outputs"]["embedding"]
    assert [d["size"] for d in embedding["tensor_shape"]["dim"]] == ["-1", str(DIM)]
    assert defs["tokenize"]["outputs"]["ids"]["dtype"] == "DT_INT32"
    assert call(server, "GET", f"/v1/models/{MODEL}/versions/2/metadata") == (200, body)
    assert call(server, "GET", f"/v1/models/{MODEL}/versions/1/metadata")[0] == 404


def test_row_format_b64_images_match_the_saved_model(server, reference):
    want = run_reference(reference[2], "embed_image", image_bytes=IMAGES)["embedding"]
    older = run_reference(reference[1], "embed_image", image_bytes=IMAGES)["embedding"]
    assert not np.allclose(want, older, atol=1e-3)  # the versions differ: the check means something

    # Default signature, bare values (one input) -> bare values (one output).
    status, body = predict(server, {"instances": [b64(x) for x in IMAGES]})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["predictions"]), want, rtol=0, atol=1e-6)
    # Named signature, named inputs, explicit version.
    status, body = predict(server, {"signature_name": "embed_image",
                                    "instances": [{"image_bytes": b64(x)} for x in IMAGES]},
                           version=2)
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["predictions"]), want, rtol=0, atol=1e-6)
    # Web-safe base64 without padding is accepted too.
    websafe = base64.urlsafe_b64encode(IMAGES[2]).decode().rstrip("=")
    status, body = predict(server, {"instances": [{"b64": websafe}]})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["predictions"]), want[2:], rtol=0, atol=1e-6)
    # Only the newest version is loaded (TF Serving's default policy).
    status, body = predict(server, {"instances": [b64(IMAGES[0])]}, version=1)
    assert status == 404 and "Specific" in body["error"]


def test_columnar_format_and_classify_match_the_saved_model(server, reference):
    want = run_reference(reference[2], "classify", image_bytes=IMAGES, labels=LABELS)["scores"]
    assert want.shape == (len(IMAGES), len(LABELS))
    status, body = predict(server, {"signature_name": "classify",
                                    "inputs": {"image_bytes": [b64(x) for x in IMAGES],
                                               "labels": LABELS}})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["outputs"]), want, rtol=0, atol=1e-6)
    # Columnar, one input given bare.
    want_text = run_reference(reference[2], "embed_text", text=TEXTS)["embedding"]
    status, body = predict(server, {"signature_name": "embed_text", "inputs": TEXTS})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["outputs"]), want_text, rtol=0, atol=1e-6)


def test_text_and_multi_output_signatures(server, reference):
    want_text = run_reference(reference[2], "embed_text", text=TEXTS)["embedding"]
    status, body = predict(server, {"signature_name": "embed_text", "instances": TEXTS})
    assert status == 200, body
    np.testing.assert_allclose(np.array(body["predictions"]), want_text, rtol=0, atol=1e-6)

    want = run_reference(reference[2], "tokenize", text=TEXTS)
    status, body = predict(server, {"signature_name": "tokenize",
                                    "instances": [{"text": t} for t in TEXTS]})
    assert status == 200, body
    rows = body["predictions"]
    assert [sorted(r) for r in rows] == [["ids", "length", "normalized"]] * len(TEXTS)
    assert [r["ids"] for r in rows] == want["ids"].tolist()
    assert all(len(r["ids"]) == MAX_LEN for r in rows)
    assert [r["length"] for r in rows] == want["length"].tolist()
    assert [r["normalized"] for r in rows] == [s.decode("utf-8") for s in want["normalized"]]
    assert rows[1]["normalized"] == "東京の写真"  # UTF-8 strings, not b64

    status, body = predict(server, {"signature_name": "tokenize", "inputs": {"text": TEXTS}})
    assert status == 200, body
    assert body["outputs"]["ids"] == want["ids"].tolist()
    assert body["outputs"]["length"] == want["length"].tolist()


def test_string_outputs_utf8_or_b64(server):
    raw = b"\xff\xfe not utf-8"
    status, body = predict(server, {"signature_name": "echo",
                                    "inputs": {"text": [b64(raw), "héllo"]}})
    assert status == 200, body
    out = body["outputs"]
    assert out["text"] == [b64(raw), "héllo"]                 # UTF-8 when valid, else b64
    assert out["text_bytes"] == [b64(raw), b64("héllo".encode())]  # *_bytes: always b64


GOOD = {"signature_name": "embed_text", "instances": ["one"]}
BAD_REQUESTS = [
    # (method, path, body, status, substring of the error)
    ("POST", f"/v1/models/{MODEL}:predict", '{"instances": [', 400, "JSON Parse error"),
    ("POST", f"/v1/models/{MODEL}:predict", "[1, 2]", 400, "JSON object"),
    ("POST", f"/v1/models/{MODEL}:predict", b"\xff\xfe", 400, "UTF-8"),
    ("POST", f"/v1/models/{MODEL}:predict", "", 400, "empty request body"),
    ("POST", "/v1/models/nope:predict", GOOD, 404, "Servable not found"),
    ("POST", f"/v1/models/{MODEL}/versions/7:predict", GOOD, 404, "Servable not found"),
    ("POST", f"/v1/models/{MODEL}/labels/stable:predict", GOOD, 404, "label"),
    ("POST", f"/v1/models/{MODEL}:predict", {"signature_name": "nope", "instances": ["a"]},
     400, "not found in signature def"),
    ("POST", f"/v1/models/{MODEL}:predict", {"signature_name": 3, "instances": ["a"]},
     400, "signature_name"),
    ("POST", f"/v1/models/{MODEL}:predict", {"signature_name": "embed_text"}, 400, "instances"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": [], "inputs": []}, 400, "exactly one"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": []}, 400, "empty"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": {"image_bytes": []}}, 400, "list"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "instances": [{"txt": "a"}]}, 400, "alias not found"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "inputs": {"text": ["a"], "extra": ["b"]}},
     400, "alias not found"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "classify", "inputs": {"image_bytes": [b64(png(1))]}},
     400, "missing input"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "classify", "instances": [b64(png(1))]}, 400, "2 inputs"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "classify",  # row format needs a shared batch dimension
      "instances": [{"image_bytes": b64(png(1)), "labels": ["a", "b"]}]}, 400, "shape"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "instances": [1, 2]}, 400, "DT_STRING"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "instances": [None]}, 400, "DT_STRING"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "inputs": [["a"], ["b"]]}, 400, "shape [2, 1]"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "inputs": "a"}, 400, "shape []"),
    ("POST", f"/v1/models/{MODEL}:predict",
     {"signature_name": "embed_text", "inputs": [["a"], ["b", "c"]]}, 400, "ragged"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "not base64!!"}]},
     400, "base64"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": [{"b64": 12}]}, 400, "base64"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(b"hello, not an image")]},
     400, "Unknown image file format"),
    ("POST", f"/v1/models/{MODEL}:predict", {"instances": [b64(png(1)), b64(b"")]},
     400, "empty string"),
    ("POST", f"/v1/models/{MODEL}:classify", GOOD, 400, ":predict"),
    ("GET", f"/v1/models/{MODEL}:predict", None, 400, "Malformed request"),
    ("POST", f"/v1/models/{MODEL}", GOOD, 400, "Malformed request"),
    ("GET", f"/v1/models/{MODEL}/versions/x", None, 400, "Malformed request"),
    ("DELETE", f"/v1/models/{MODEL}", None, 400, "Malformed request"),
    ("GET", "/", None, 404, "/v1/models/"),
]


@pytest.mark.parametrize("method,path,body,status,needle", BAD_REQUESTS,
                         ids=[f"{i}-{case[4]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_json_error_and_the_server_keeps_answering(
        server, reference, method, path, body, status, needle):
    got_status, got = call(server, method, path, body)
    assert (got_status, sorted(got)) == (status, ["error"]), got
    assert needle in got["error"]
    want = run_reference(reference[2], "embed_text", text=["one"])["embedding"]
    ok_status, ok = predict(server, GOOD)
    assert ok_status == 200, ok
    np.testing.assert_allclose(np.array(ok["predictions"]), want, rtol=0, atol=1e-6)


def test_request_size_is_bounded(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        connection.putrequest("POST", f"/v1/models/{MODEL}:predict")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(serve.DEFAULT_MAX_REQUEST_BYTES + 1))
        connection.endheaders(b"{}")
        response = connection.getresponse()
        assert response.status == 413
        assert "exceeds the limit" in json.loads(response.read())["error"]
        assert response.getheader("Connection") == "close"
    finally:
        connection.close()
    assert predict(server, GOOD)[0] == 200


def test_keep_alive_connection_serves_several_requests(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        for body, want in [(GOOD, 200), ('{"x"', 400), (GOOD, 200)]:
            connection.request("POST", f"/v1/models/{MODEL}:predict",
                               body=body if isinstance(body, str) else json.dumps(body))
            response = connection.getresponse()
            json.loads(response.read())
            assert response.status == want
    finally:
        connection.close()


def test_one_log_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="keras_mm.export.serve")

    def lines_after(n):
        """The log lines once there are ``n`` (each request is handled in a thread of its own,
        which may log after the client has its response: waiting for a request's line before
        sending the next keeps the lines in request order)."""
        deadline = time.time() + 5
        while True:
            lines = [r.getMessage() for r in caplog.records if r.name == "keras_mm.export.serve"]
            if len(lines) >= n or time.time() > deadline:
                return lines
            time.sleep(0.02)

    predict(server, GOOD)
    assert len(lines_after(1)) == 1
    call(server, "GET", f"/v1/models/{MODEL}")
    assert len(lines_after(2)) == 2
    predict(server, "{bad")
    lines_after(3)
    time.sleep(0.2)                                   # an extra, late line would show
    lines = lines_after(3)
    assert len(lines) == 3, lines
    assert '"POST /v1/models/siglip_test:predict" 200' in lines[0]
    assert '"GET /v1/models/siglip_test" 200' in lines[1]
    assert '"POST /v1/models/siglip_test:predict" 400' in lines[2]


def test_a_new_version_folder_is_picked_up(tmp_path, base_path, reference):
    base = tmp_path / "m"
    shutil.copytree(base_path / "1", base / "1")
    server, thread = serve.build_server("m", str(base), "127.0.0.1", 0,
                                        file_system_poll_wait_seconds=0.1)
    try:
        request = {"instances": [b64(IMAGES[0])]}
        want = {v: run_reference(reference[v], "embed_image", image_bytes=IMAGES[:1])["embedding"]
                for v in (1, 2)}
        status, body = predict(server, request, model="m")
        np.testing.assert_allclose(np.array(body["predictions"]), want[1], rtol=0, atol=1e-6)
        # Written atomically, as an exporter should: copy aside, then rename.
        shutil.copytree(base_path / "2", tmp_path / "staging")
        os.rename(tmp_path / "staging", base / "2")
        deadline = time.time() + 30
        while time.time() < deadline:
            status, body = call(server, "GET", "/v1/models/m")
            if body["model_version_status"][0]["version"] == "2":
                break
            time.sleep(0.1)
        assert body == {"model_version_status": [
            {"version": "2", "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}},
            {"version": "1", "state": "END", "status": {"error_code": "OK", "error_message": ""}},
        ]}
        status, body = predict(server, request, model="m")
        np.testing.assert_allclose(np.array(body["predictions"]), want[2], rtol=0, atol=1e-6)
    finally:
        server.shutdown()
        server.server_close()


def test_model_config_file(tmp_path, base_path):
    (tmp_path / "models.config").write_text(f"""
model_config_list {{
  config {{
    name: "pinned"
    base_path: "{os.path.relpath(base_path, tmp_path)}"
    model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 }} }}
  }}
}}""")
    server, _ = serve.build_server(model_config_file=str(tmp_path / "models.config"), port=0,
                                   file_system_poll_wait_seconds=0)
    try:
        status, body = call(server, "GET", "/v1/models/pinned")
        assert [s["version"] for s in body["model_version_status"]] == ["1"]
        assert predict(server, GOOD, model="pinned")[0] == 200
        assert predict(server, GOOD, model=MODEL)[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_shipped_model_config_parses():
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "saved_models")
    models = serve.read_model_config(os.path.join(root, "models.config"))
    assert [(m.name, m.base_path, m.policy) for m in models] == [
        ("siglip_digits", "/models/siglip_digits", ("latest", 1))]


def test_cli_flags_and_one_line_errors(tmp_path, capsys):
    args = serve.parse_args(["--model_name", "m", "--model_base_path", "saved_models/m",
                             "--rest_api_port", "8601"])
    assert (args.model_name, args.model_base_path, args.rest_api_port, args.rest_api_host) == (
        "m", "saved_models/m", 8601, "127.0.0.1")
    args = serve.parse_args(["--model_name=m", "--model_base_path=x", "--rest_api_port=0"])
    assert args.rest_api_port == 0
    for argv in ([], ["--model_base_path", "x", "--model_config_file", "y"],
                 ["--model_base_path", "x", "--rest_api_port", "70000"],
                 ["--model_base_path", "x", "--port", "8500"]):
        assert serve.main(argv) == 2
        assert "usage: kmm serve" in capsys.readouterr().err
    assert serve.main(["--model_base_path", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kmm: error:") and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert serve.main(["--model_base_path", str(tmp_path / "empty")]) == 2
    assert "no version folder" in capsys.readouterr().err


def test_a_broken_newest_version_fails_to_load_with_its_error(tmp_path, base_path):
    shutil.copytree(base_path / "1", tmp_path / "m" / "1")
    (tmp_path / "m" / "3").mkdir()
    (tmp_path / "m" / "3" / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="version 3"):
        serve.build_server("m", str(tmp_path / "m"), "127.0.0.1", 0)


def test_serve_process_end_to_end(base_path):
    """The command line: serves on a free port, answers, and stops cleanly on SIGTERM."""
    import re
    import signal
    import subprocess
    import sys
    import threading

    process = subprocess.Popen(
        [sys.executable, "-m", "keras_mm.export.serve", "--model_name", MODEL,
         "--model_base_path", str(base_path), "--rest_api_port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1/models/siglip_test", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        port = int(match.group(1))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", f"/v1/models/{MODEL}:predict", body=json.dumps(GOOD))
        response = connection.getresponse()
        assert response.status == 200
        assert len(json.loads(response.read())["predictions"][0]) == DIM
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert '"POST /v1/models/siglip_test:predict" 200' in process.stderr.read()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("dtype,value,want", [
    (tf.float32, [[1, 2.5], [3, -4]], np.array([[1, 2.5], [3, -4]], np.float32)),
    (tf.int32, [7, -2.0], np.array([7, -2], np.int32)),
    (tf.int64, [2 ** 40], np.array([2 ** 40], np.int64)),
    (tf.bool, [True, False], np.array([True, False])),
    (tf.string, ["é", {"b64": "AAE="}], np.array(["é".encode(), b"\x00\x01"], object)),
])
def test_json_to_array_numeric_and_string_dtypes(dtype, value, want):
    got = serve.json_to_array(value, "x", tf.TensorSpec([None] * want.ndim, dtype))
    assert got.dtype == want.dtype and got.tolist() == want.tolist()


@pytest.mark.parametrize("dtype,shape,value,needle", [
    (tf.int32, [None], [2 ** 31], "out of range"),
    (tf.int32, [None], [1.5], "DT_INT32"),
    (tf.int32, [None], [True], "DT_INT32"),
    (tf.float32, [None], ["1.0"], "DT_FLOAT"),
    (tf.float32, [None], [{"b64": "AAE="}], "DT_FLOAT"),
    (tf.bool, [None], [1], "DT_BOOL"),
    (tf.float32, [None, 3], [[1, 2]], "expects [-1, 3]"),
    (tf.complex64, [None], [1], "JSON cannot carry"),
])
def test_json_to_array_rejects_mismatches(dtype, shape, value, needle):
    with pytest.raises(serve.ServingError) as info:
        serve.json_to_array(value, "x", tf.TensorSpec(shape, dtype))
    assert info.value.status == 400 and needle in info.value.message


def test_array_to_json():
    assert serve.array_to_json(np.array([[0.5, 2.0]], np.float16), "y") == [[0.5, 2.0]]
    assert serve.array_to_json(tf.constant([1.5], tf.bfloat16).numpy(), "y") == [1.5]
    assert serve.array_to_json(np.array([b"ok", b"\xff"], object), "caption") == [
        "ok", {"b64": "/w=="}]
    assert serve.array_to_json(np.array(b"ok", object), "image_bytes") == {"b64": "b2s="}
