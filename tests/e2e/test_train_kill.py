"""A two-tower ``kmm train`` run SIGKILLed (once after a step, once while a checkpoint is being
written) and restarted ends with the same step count and the same weights and optimizer state as an
uninterrupted run with the same seed, and leaves no corrupt checkpoint behind."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from keras_mm.beam_jobs import label_as_text
from keras_mm.training import checkpoint as K

ROOT = pathlib.Path(__file__).resolve().parents[2]
SETTINGS = ["train.steps=30", "train.checkpoint_every=10", "train.steps_per_epoch=10",
            "train.keep=2", "train.log_every=10", "train.deterministic=true",
            "data.input.deterministic=true", "data.input.batch_size=32",
            "optimizer.warmup_steps=5", "eval.max_examples=64"]


def _train(out_dir, folder, *kill, timeout=600):
    args = [f"data.folder={folder}", f"train.out_dir={out_dir}"] + SETTINGS
    command = [sys.executable, "-m", "tests.e2e.scripts.train_and_kill", *map(str, kill),
               "--out_dir", str(out_dir), "--", "--recipe", "siglip_digits"]
    for a in args:
        command += ["--set", a]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=env)
    return result.returncode, "\n".join((result.stdout + result.stderr).splitlines()[-30:])


def _state(path):
    with np.load(os.path.join(path, "state.npz")) as state:
        return {k: state[k] for k in state.files}


@pytest.mark.slow
def test_killed_two_tower_run_resumes_to_the_uninterrupted_weights(tmp_path):
    folder = tmp_path / "digits"
    label_as_text.run(["--source", "digits", "--out", str(folder), "--vocab_size", "400"])
    chain = tmp_path / "chain"
    checkpoints = K.Checkpointer(chain / "checkpoints", write=False)

    # 1. SIGKILL at the end of step 13: checkpoint 10 is the newest.
    code, tail = _train(chain, folder, "--kill-at-step", 13)
    assert code == -signal.SIGKILL, tail
    assert checkpoints.latest_step() == 10

    # 2. Restarted from 10, SIGKILLed inside the save of step 20 (state.npz written, no manifest):
    #    the torn write stays on disk and is never taken for a checkpoint.
    code, tail = _train(chain, folder, "--kill-in-save-at", 20)
    assert code == -signal.SIGKILL, tail
    torn = [n for n in os.listdir(chain / "checkpoints") if n.startswith(K._TMP_PREFIX)]
    assert torn and os.path.exists(chain / "checkpoints" / torn[0] / "state.npz")
    assert checkpoints.latest_step() == 10

    # 3. Restarted again from 10: finishes at 30.
    code, tail = _train(chain, folder)
    assert code == 0, tail
    starts = [json.loads(line)["initial_step"]
              for line in (chain / "starts.jsonl").read_text().splitlines()]
    assert starts == [0, 10, 10]

    code, tail = _train(tmp_path / "reference", folder)
    assert code == 0, tail

    # The same steps, the same model and optimizer state (float tolerance).
    for run in (chain, tmp_path / "reference"):
        assert json.loads((run / "summary.json").read_text())["train_steps"] == 30
    done = checkpoints.checkpoints()
    assert [c.step for c in done] == [20, 30]              # keep=2, every one intact
    assert not [n for n in os.listdir(chain / "checkpoints") if n.startswith(K._TMP_PREFIX)]
    resumed = _state(done[-1].path)
    reference = _state(K.Checkpointer(tmp_path / "reference" / "checkpoints",
                                      write=False).latest().path)
    assert resumed.keys() == reference.keys() and len(resumed) > 50
    for key in reference:
        np.testing.assert_allclose(resumed[key].astype(np.float64),
                                   reference[key].astype(np.float64), rtol=1e-5, atol=1e-6,
                                   err_msg=key)
