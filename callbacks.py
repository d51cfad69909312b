"""The Keras callbacks of a training run: Ctrl-C or SIGTERM stops between steps, the checkpoints and
the time left after every epoch, and the dropout layers' random streams set for every epoch (so a
resumed run draws what the unbroken one would). runs.Run.fit hands them to model.fit.
"""

import signal
import time

import numpy as np

import machine

machine.start_backend()

import keras  # noqa: E402

import distribute  # noqa: E402
import models  # noqa: E402


class CtrlC(keras.callbacks.Callback):
    """Ctrl-C or SIGTERM during training: stop after the current step, never inside a checkpoint save.

    Python's own KeyboardInterrupt fires wherever the interpreter happens to be, and one
    that fires inside a finalizer run by the garbage collector is printed and dropped, so
    training would go on. Here the handler only sets a flag; the callback raises
    KeyboardInterrupt between steps (and Checkpoints after its saves). A second Ctrl-C
    raises at once.

    The flag is read before each step, not after: a callback with a batch-end hook makes Keras
    wait for every step's loss before the next step starts, which under JAX (whose backend can
    run such hooks in a thread) keeps a GPU idle between steps.
    """

    def __init__(self):
        super().__init__()
        self.pressed = 0  # the signal that asked to stop

    def __enter__(self):
        self.previous = {stop: signal.signal(stop, self.handle) for stop in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for stop, handler in self.previous.items():
            signal.signal(stop, handler)

    def handle(self, signum, frame):
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = signum  # SIGTERM (a scheduler's stop, `timeout`) stops as Ctrl-C does

    def check(self):
        if self.pressed:
            raise KeyboardInterrupt

    def on_train_batch_begin(self, batch, logs=None):
        self.check()

    def on_test_batch_begin(self, batch, logs=None):
        self.check()


class Checkpoints(keras.callbacks.Callback):
    """After every epoch: the best validation checkpoint (when it improves), then the resume state.

    Runs after the CSVLogger, so a stop between the two leaves a history row that the resume
    state does not cover; --resume trims it.
    """

    def __init__(self, files, run_info, ctrl_c):
        super().__init__()
        self.files, self.run_info, self.ctrl_c = files, run_info, ctrl_c
        self.best = run_info.get("best_val_accuracy", -1.0)
        self.session_seconds = []  # this session's epochs: the pace of this machine, now

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        lines = []
        val_accuracy = float((logs or {}).get("val_accuracy", float("nan")))
        if val_accuracy > self.best:
            self.best = val_accuracy
            self.run_info.update(best_val_accuracy=val_accuracy, best_epoch=epoch + 1)
            distribute.save(self.model, self.files["best"], include_optimizer=False)
            lines.append(f"Epoch {epoch + 1}: val_accuracy improved to {val_accuracy:.4f}, saved {self.files['best'].name}")
        seconds = time.perf_counter() - self.epoch_start
        self.session_seconds.append(seconds)
        self.run_info.update(epochs_done=epoch + 1, train_seconds=self.run_info["train_seconds"] + seconds)
        distribute.save(self.model, self.files["resume"])
        models.write_json(self.files["resume_info"], self.run_info)
        left = self.params["epochs"] - (epoch + 1)
        if left:
            lines.append(time_left(left, self.session_seconds))
        if lines:  # on a line of their own: in a terminal, Keras's progress bar has not ended its line yet
            print("\n" + "\n".join(lines))
        self.ctrl_c.check()


def time_left(epochs_left, session_seconds):
    """The line after an epoch: how long the epochs left take at this session's pace (the first
    epoch of a session, which builds the model's functions, counts only while it is the only one)."""
    pace = session_seconds[1:] or session_seconds
    seconds = round(epochs_left * sum(pace) / len(pace))
    hours, minutes = divmod(round(seconds / 60), 60)
    remaining = f"{hours} h {minutes} min" if hours else f"{minutes} min" if minutes else f"{seconds} s"
    return f"{epochs_left} epoch{'s' * (epochs_left > 1)} to go: about {remaining} at this pace"



class DropoutStreams(keras.callbacks.Callback):
    """At the start of every epoch, points each dropout layer's random stream at (seed, layer,
    epoch): a saved model keeps neither the streams' seeds nor their positions, and a resumed run
    must draw the masks the unbroken run would have drawn."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for index, layer in enumerate(self.model.layers):
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                layer_seed = np.random.default_rng([self.seed, index]).integers(2**31)
                generator.state.assign(np.array([layer_seed, epoch << 20], dtype=generator.state.dtype))

