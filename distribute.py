"""train.py --distribute: one model trained on several devices of this machine, or on several machines.

One process, several devices (the GPUs; FASHION_CPU_DEVICES=N makes N of the CPU): TensorFlow's
MirroredStrategy or JAX's DataParallel, one replica a device, each taking its share of every global
batch (feed.feed_plan). Several processes, one a machine (JAX only): the same command on each, with
the KERAS_DISTRIBUTION_* variables naming the processes. They join at the start (join), take process
0's settings and, resuming, its weights (from_process_0); process 0 alone prints and writes the files.
"""

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import NamedTuple

import numpy as np

import machine

machine.start_backend()

import keras  # noqa: E402

import models  # noqa: E402

JOIN_SECONDS = 60  # how long the processes of a run wait for each other at the start
# The variables of keras.distribution.initialize: the processes' host:port list (the first is the
# coordinator, process 0), how many processes, and which one this is.
DISTRIBUTION_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                          "KERAS_DISTRIBUTION_PROCESS_ID")


# ---- The processes of a run ----

class DistributionError(Exception):
    """The processes of a run cannot be joined; the message says why and what to do."""


class ProcessGroup(NamedTuple):
    coordinator: tuple | None  # (host, port) of process 0's coordination service; None: one process alone
    processes: int             # how many processes train the model together
    process: int               # this one's number, 0 .. processes - 1; 0 writes the files


def group_from_environment():
    """This process's place in the run, from the KERAS_DISTRIBUTION_* variables; a group of one
    (coordinator None) when none is set. DistributionError when they are incomplete or disagree."""
    values = [os.environ.get(name, "").strip() for name in DISTRIBUTION_VARIABLES]
    if not any(values):
        return ProcessGroup(None, 1, 0)
    missing = [name for name, value in zip(DISTRIBUTION_VARIABLES, values) if not value]
    if missing:
        raise DistributionError(f"{' and '.join(missing)} not set: every process needs all three "
                                f"KERAS_DISTRIBUTION_* variables")
    addresses, count, index = values
    if not (count.isdigit() and index.isdigit() and 0 <= int(index) < int(count)):
        raise DistributionError(f"KERAS_DISTRIBUTION_NUM_PROCESSES={count!r} and KERAS_DISTRIBUTION_PROCESS_ID="
                                f"{index!r} must be whole numbers, the id from 0 to the number of processes - 1")
    jobs = [job.strip() for job in addresses.split(",")]
    if len(jobs) > 1 and len(jobs) != int(count):
        raise DistributionError(f"KERAS_DISTRIBUTION_JOB_ADDRESSES names {len(jobs)} processes but "
                                f"KERAS_DISTRIBUTION_NUM_PROCESSES says {count}; give one host:port per process, "
                                f"or only the coordinator's")
    host, _, port = jobs[0].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributionError(f"KERAS_DISTRIBUTION_JOB_ADDRESSES must start with the coordinator's host:port "
                                f"(process 0's machine and a free TCP port, e.g. 10.0.0.1:12345), not {jobs[0]!r}")
    return ProcessGroup((host.strip("[]"), int(port)), int(count), int(index))


def join_processes(group, timeout):
    """Start JAX's distributed runtime (keras.distribution.initialize) and wait for every process of
    the group; before JAX's first computation. JAX would wait 5 minutes for a missing process and then
    abort with a stack trace: here a process that has not joined within `timeout` seconds stops with
    one line (DistributionError, or the watchdog's exit while JAX is still waiting)."""
    host, port = group.coordinator
    deadline = time.monotonic() + timeout
    if group.process > 0 and not port_open(host, port, deadline):
        raise DistributionError(f"process {group.process} cannot reach the coordinator {host}:{port} (process 0) "
                                f"within {timeout:g} s; start process 0 on {host}, and open TCP port {port} there to "
                                f"this machine")
    if group.process == 0:
        late = (f"not all {group.processes} processes joined within {timeout:g} s; start the others "
                f"(KERAS_DISTRIBUTION_PROCESS_ID 1 to {group.processes - 1}) with the same job addresses and number "
                f"of processes, and open TCP port {port} on this machine to them")
    else:
        late = (f"process {group.process} reached the coordinator {host}:{port}, but the {group.processes} processes "
                f"did not all join within {timeout:g} s; start every one of them, each with its own "
                f"KERAS_DISTRIBUTION_PROCESS_ID and the same job addresses and number of processes")
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.1), give_up, [late])
    watchdog.daemon = True
    watchdog.start()
    try:
        keras.distribution.initialize()
    except Exception as e:  # JAX raises its own runtime errors, e.g. when the port is taken
        reason = machine.reason(e, 160)
        where = (f"cannot serve the coordinator on port {port} ({reason}): is another run using it? Choose another "
                 f"port in KERAS_DISTRIBUTION_JOB_ADDRESSES, on every process") if group.process == 0 else \
            f"could not join the run at {host}:{port} ({reason})"
        raise DistributionError(f"process {group.process} {where}") from None
    finally:
        watchdog.cancel()


def port_open(host, port, deadline):
    """True once a TCP connection to host:port succeeds; False if none has by `deadline` (monotonic s)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() + 0.5 > deadline:
                return False
            time.sleep(0.5)


def give_up(message):
    """Exit at once with one line, from any thread (the main one is inside JAX, waiting)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def from_process_0(arrays):
    """Process 0's arrays, in every process of a multi-process JAX run; the arrays themselves in a run of
    one process. Every process passes arrays of the same shapes and dtypes; they travel as their bytes,
    so every dtype arrives exact (JAX would turn int64 into int32)."""
    if keras.backend.backend() != "jax":
        return list(arrays)
    import jax

    if jax.process_count() == 1:
        return list(arrays)
    from jax.experimental import multihost_utils

    arrays = [np.asarray(a) for a in arrays]
    raw = np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(b"".join(a.tobytes() for a in arrays),
                                                                         np.uint8)))
    offsets = np.cumsum([0, *(a.nbytes for a in arrays)])
    return [raw[start:stop].view(a.dtype).reshape(a.shape) for a, start, stop in zip(arrays, offsets, offsets[1:])]


def json_from_process_0(value):
    """Process 0's `value` (anything JSON can hold), in every process of the run."""
    text = np.frombuffer(json.dumps(value).encode(), np.uint8)
    (size,) = from_process_0([np.array([len(text)], np.int64)])
    buffer = np.zeros(int(size[0]), np.uint8)
    buffer[:min(len(text), len(buffer))] = text[:len(buffer)]
    return json.loads(from_process_0([buffer])[0].tobytes())


# ---- What train.py asks ----

def distribution_problem(backend, distribute, group):
    """Why this backend cannot train as asked, with the fix, as a sentence; None when it can.
    group: ProcessGroup (coordinator None when no KERAS_DISTRIBUTION_* variable is set)."""
    if group.coordinator and not distribute:
        return ("the KERAS_DISTRIBUTION_* variables are set: add --distribute to train with the other processes, "
                "or unset them to train alone")
    if distribute and backend == "torch":
        return ("Keras 3 has no distribution API for the torch backend; run with KERAS_BACKEND=jax or tensorflow "
                "for --distribute")
    if group.coordinator and backend != "jax":
        return (f"Keras 3 cannot train across processes with the {backend} backend (MultiWorkerMirroredStrategy "
                f"fails in fit, keras-team/keras#20585); run every process with KERAS_BACKEND=jax")
    return None


def process_group(args):
    """This process's place in the run (ProcessGroup): alone, or one of the processes that
    the KERAS_DISTRIBUTION_* variables name. Exits with one line when it cannot train as asked."""
    try:
        group = group_from_environment()
    except DistributionError as e:
        sys.exit(f"error: {e}")
    problem = distribution_problem(keras.backend.backend(), args.distribute, group)
    if problem:
        sys.exit(f"error: {problem}")
    return group


def join(group):
    """Wait for the other processes (before any JAX computation); process 0 alone speaks from here on."""
    print(f"Process {group.process} of {group.processes}: joining at {group.coordinator[0]}:{group.coordinator[1]} "
          f"(up to {JOIN_SECONDS:g} s)", flush=True)
    try:
        join_processes(group, JOIN_SECONDS)
    except DistributionError as e:
        sys.exit(f"error: {e}")
    if group.process:
        print(f"Process {group.process} of {group.processes}: joined; process 0 prints the run and writes its files",
              flush=True)
        sys.stdout = open(os.devnull, "w")


def agree(args, settings, run_info):
    """Every process takes process 0's settings, seed, data and first epoch (a stopped run's state is on
    process 0's machine); returns the first epoch."""
    shared = json_from_process_0(
        {"settings": settings, "seed": args.seed, "limit": args.limit, "all_data": args.all_data,
         "minutes": args.minutes, "epochs_done": run_info.get("epochs_done", 0)})
    settings.update(shared["settings"])
    args.seed, args.limit, args.all_data, args.minutes = (shared[key] for key in ("seed", "limit", "all_data",
                                                                                    "minutes"))
    return shared["epochs_done"]


def data_parallel(group):
    """Data parallelism over every device the backend sees, in every process: (the scope to build the
    model in, the devices' names; one replica each). TensorFlow: MirroredStrategy over the GPUs (else
    the CPU's devices); JAX: Keras's DataParallel, one program over the global batch."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
        scope, local, names = strategy.scope, len(devices), [name.split("device:")[-1] for name in devices]
    else:
        import jax

        devices = jax.devices()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
        scope, local = contextlib.nullcontext, jax.local_device_count()
        names = [f"{d.platform.upper()}:{d.id}" + (f" (process {d.process_index})" if group.processes > 1 else "")
                 for d in devices]
    if len(devices) != local * group.processes:
        sys.exit(f"error: the processes have different numbers of devices ({len(devices)} in all, {local} here); "
                 f"give each as many, e.g. one process per GPU with CUDA_VISIBLE_DEVICES")
    return scope, names


def check_batch(batch_size, replicas):
    """Exit with one line when the global batch does not divide among the replicas."""
    if batch_size % replicas:
        lower = batch_size // replicas * replicas
        sys.exit(f"error: --batch-size {batch_size} does not divide among {replicas} replicas; give a multiple of "
                 f"{replicas}, e.g. --batch-size {lower or replicas}" + (f" or {lower + replicas}" if lower else ""))


def synchronize_batch_norm(model):
    """Under MirroredStrategy, each replica normalises by its own images' statistics unless told;
    synchronized, every replica uses the global batch's, as one device would (JAX's DataParallel
    does so already), though Keras then computes the variance as E[x^2] - E[x]^2, not exactly one
    device's figures. save() writes the files without it: other backends refuse the setting."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


@contextlib.contextmanager
def undistributed():
    """Inside, no JAX distribution: what is made here lives on this process's own device."""
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def save(model, path, **options):
    """models.save_model, outside any JAX distribution (saving a .keras file builds a throwaway
    optimizer, whose variables would otherwise be made across all processes, waiting for the
    others), and with synchronized batch normalisation off in the file."""
    synchronized = [layer for layer in model.layers if getattr(layer, "synchronized", False)]
    for layer in synchronized:
        layer.synchronized = False
    try:
        with undistributed():
            return models.save_model(model, path, **options)
    finally:
        for layer in synchronized:
            layer.synchronized = True


def validation_share(x_val, y_val, replicas=1, group=ProcessGroup(None, 1, 0)):
    """(images, labels) this process validates on: all of them on one device; in a --distribute run
    the first multiple of the replica count of them (every device takes as many), split among the
    processes."""
    share = len(x_val) // replicas * replicas // group.processes
    part = slice(group.process * share, (group.process + 1) * share)
    return models.prepare(x_val[part]), y_val[part]


def resume_everywhere(build, load, lead, resume_path):
    """--resume --distribute: every process builds the model (build(), in the run's scope, with its
    optimizer built, as models.build_cnn does); process 0 loads the stopped run's (load(), on its
    machine) and every process takes its weights and optimizer state."""
    model = build()
    variables = [*model.variables, *model.optimizer.variables]
    values = [np.zeros(v.shape, v.dtype) for v in variables]
    if lead:
        with undistributed():  # a copy on this process's device only
            stopped = load()
        values = [np.asarray(v) for v in [*stopped.variables, *stopped.optimizer.variables]]
        if [v.shape for v in values] != [v.shape for v in variables]:
            sys.exit(f"error: the resume state {resume_path} does not hold this model's weights and optimizer "
                     f"state; start the run again with --overwrite")
    for variable, value in zip(variables, from_process_0(values)):
        variable.assign(value)
    return model


def mirrored_feed(stream, x, y):
    """The batches of stream() as a tf.data.Dataset for MirroredStrategy, which makes one iterator of
    its input more than it reads from: on the shared generator that one's read-ahead would take a
    batch, and every epoch after the first would start a batch late. Here each iterator gets a
    stream of its own, from the first batch."""
    import tensorflow as tf

    return tf.data.Dataset.from_generator(stream, output_signature=(
        tf.TensorSpec((None, *x.shape[1:], 1), tf.float32), tf.TensorSpec((None, *y.shape[1:]), y.dtype)))
