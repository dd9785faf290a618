"""``kmm train`` that SIGKILLs itself at a chosen point, for the two-tower resume test.

    python -m tests.e2e.scripts.train_and_kill [--kill-at-step N | --kill-in-save-at N] -- ARGS

ARGS are ``kmm train``'s (``--recipe ... --set ...``); the run goes through ``keras_mm.cli.main``.
``--kill-at-step N``: SIGKILL at the end of global step N (after that step's checkpoint, if any).
``--kill-in-save-at N``: SIGKILL inside the save of step N, after its ``state.npz`` is written and
before its manifest and rename (the moment a torn checkpoint could be left behind).
Every start appends ``{"pid", "initial_step"}`` to ``<train.out_dir>/starts.jsonl`` (read from the
run's checkpoints before training).
"""

import argparse
import json
import os
import signal
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--kill-in-save-at", type=int, default=None)
    parser.add_argument("--out_dir", required=True, help="the run's train.out_dir")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]

    from keras_mm import cli
    from keras_mm.training import callbacks, checkpoint

    initial = checkpoint.Checkpointer(os.path.join(args.out_dir, "checkpoints"),
                                      write=False).latest_step() or 0
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "starts.jsonl"), "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "initial_step": initial}) + "\n")

    if args.kill_in_save_at is not None:
        def kill_in_save(stage, path):
            if stage == "state_written" and f"-{args.kill_in_save_at:08d}-" in os.path.basename(path):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint._test_hook = kill_in_save

    if args.kill_at_step is not None:
        class Kill(callbacks._GlobalStepCallback):
            def on_train_batch_end(self, batch, logs=None):
                self._advance(batch)
                if self.global_step == args.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)

        original = callbacks.training_callbacks

        def with_kill(ckpt, initial_step, *a, **kw):
            # Appended last: the checkpoint callback of this step has run when it fires.
            return list(original(ckpt, initial_step, *a, **kw)) + [Kill(initial_step)]

        callbacks.training_callbacks = with_kill

    sys.exit(cli.main(["train", *train_args]))


if __name__ == "__main__":
    main()
