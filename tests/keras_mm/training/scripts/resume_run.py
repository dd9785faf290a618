"""A checkpointed training run that the resume test kills and restarts.

    python -m tests.keras_mm.training.scripts.resume_run OUT [--kill-at-step N] [--hang-in-save-at N]

Trains the digits MLP (dropout, AdamW with warmup + cosine, clipping, weight decay) for --steps steps on a
deterministic stream, resuming from OUT/checkpoints when a checkpoint is there. Appends
{"pid", "initial_step"} to OUT/starts.jsonl when it starts; at the end writes OUT/final.npz (every
model variable) and OUT/final.json ({"step", "iterations"}).

--kill-at-step N: the process SIGKILLs itself at the end of global step N (after that step's checkpoint,
if any). --hang-in-save-at N: the save of step N stops after writing state.npz (before the manifest and
the rename), writes OUT/hanging (the temporary directory's path) and sleeps, for the parent to SIGKILL.
"""

import argparse
import json
import os
import signal
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=5)
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--hang-in-save-at", type=int, default=None)
    args = parser.parse_args()

    import keras

    keras.utils.set_random_seed(7)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    from keras_mm.training import callbacks, checkpoint, optimizer
    from tests.keras_mm.training.scripts.digits_training import (compile_model, make_dataset,
                                                                  make_model, optimizer_config)

    os.makedirs(args.out, exist_ok=True)
    checkpointer = checkpoint.Checkpointer(os.path.join(args.out, "checkpoints"), keep=args.keep,
                                           write=True)
    initial_step = checkpointer.latest_step()
    with open(os.path.join(args.out, "starts.jsonl"), "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "initial_step": initial_step}) + "\n")

    if args.hang_in_save_at is not None:
        def hang(stage, path):
            if stage == "state_written" and f"-{args.hang_in_save_at:08d}-" in os.path.basename(path):
                with open(os.path.join(args.out, "hanging"), "w") as f:
                    f.write(path)
                time.sleep(600)

        checkpoint._test_hook = hang

    config = optimizer_config(lr=3e-3, end_lr=1e-4, weight_decay=0.1, warmup_steps=4, clip=1.0)
    model = make_model()
    opt = optimizer.make_optimizer(config, total_steps=args.steps)
    compile_model(model, opt)
    dataset = checkpoint.resumable_dataset(lambda: make_dataset(args.batch, seed=3), initial_step)

    saver = callbacks.CheckpointCallback(checkpointer, args.every, initial_step=initial_step)
    fit_callbacks = [saver]
    if args.kill_at_step is not None:
        class Kill(callbacks._GlobalStepCallback):
            def on_train_batch_end(self, batch, logs=None):
                self._advance(batch)
                if self.global_step == args.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)

        fit_callbacks.append(Kill(initial_step))
    if initial_step < args.steps:
        model.fit(dataset, verbose=0, callbacks=fit_callbacks,
                  **checkpoint.resume_fit_kwargs(initial_step, args.steps, args.steps_per_epoch))
    np.savez(os.path.join(args.out, "final.npz"),
             *[keras.ops.convert_to_numpy(v) for v in model.variables])
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump({"step": saver.global_step, "iterations": int(keras.ops.convert_to_numpy(
            opt.iterations))}, f)


if __name__ == "__main__":
    main()
