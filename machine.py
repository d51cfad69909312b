"""The machine a script runs on: a quiet start of the Keras backend, its devices, and the record of
what ran (versions, processor, git commit) that goes into every model's JSON.

Call start_backend() before importing Keras. TensorFlow prints lines that read as errors to a
newcomer but are not ("Could not find cuda drivers", "failed call to cuInit", the oneDNN and CPU
instruction notices, a tf.data attribute notice during training). They come from C++ straight to
the stderr file descriptor, before any Python logging is set up, so they are filtered there:
every other line still shows. `--verbose` on the command line (or FASHION_VERBOSE=1) keeps them all.

More than one device or machine (train.py --distribute): the KERAS_DISTRIBUTION_* variables name the
processes of a run (process_group), join_processes starts JAX's distributed runtime, from_process_0
hands process 0's values to the others. FASHION_CPU_DEVICES=N splits the CPU into N devices (logical
devices under TensorFlow, XLA host devices under JAX), so multi-device training can be tested on a
machine without GPUs; it changes nothing else.
"""

import atexit
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent
VERBOSE = "--verbose" in sys.argv[1:] or os.environ.get("FASHION_VERBOSE") == "1"
CPU_DEVICES_VARIABLE = "FASHION_CPU_DEVICES"  # N: the CPU as N devices, for testing multi-device code
# The variables of keras.distribution.initialize: the processes' host:port list (the first is the
# coordinator, process 0), how many processes, and which one this is.
DISTRIBUTION_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                          "KERAS_DISTRIBUTION_PROCESS_ID")

# Start-up notices that are not problems on a machine without a GPU (or with one).
NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub|Could not find cuda drivers|cuInit|"
    r"cpu_feature_guard|This TensorFlow binary is optimized|To enable the following instructions|"
    r"oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|absl::InitializeLog|TensorFlow binary was not compiled|"
    r"use_unbounded_threadpool|does not implement the AsGraphDefInternal"
)


def start_backend():
    """Import Keras and its backend, and find the backend's devices, with the notices filtered.

    JAX is imported but not started: keras.distribution.initialize() must come before its first
    computation (train.py --distribute calls it through join_processes).
    """
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    first = "keras" not in sys.modules
    if not VERBOSE:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's own INFO lines
        if first and sys.stderr is sys.__stderr__:  # not under pytest's capture
            filter_stderr()
    import keras

    cpu_devices = cpu_devices_wanted() if first else 1
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpus = tf.config.list_physical_devices("CPU")  # the CUDA probe prints here, filtered
        if cpu_devices > 1:
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
    elif keras.backend.backend() == "jax" and cpu_devices > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)


def cpu_devices_wanted():
    """N from FASHION_CPU_DEVICES (1 when unset, or not a whole number from 1 up, with a warning)."""
    value = os.environ.get(CPU_DEVICES_VARIABLE, "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        print(f"warning: {CPU_DEVICES_VARIABLE}={value!r} ignored: it takes a whole number from 1 up", file=sys.stderr)
        return 1
    return int(value)


def filter_stderr():
    """Route the stderr file descriptor through a thread that drops the NOISE lines.

    Python's own sys.stderr is moved to a copy of the real descriptor, so its messages (warnings,
    errors, tracebacks) are written at once, unfiltered; only what C++ writes to descriptor 2
    passes through the filter. At exit the descriptor is restored and the filter drains.
    """
    sys.stderr.flush()
    real = os.dup(2)
    sys.stderr = open(real, "w", buffering=1, encoding=sys.__stderr__.encoding, errors="backslashreplace",
                      closefd=False)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def relay():
        with open(read_end, "rb") as pipe:
            for line in pipe:
                if not NOISE.search(line.decode(errors="replace")):
                    os.write(real, line)

    thread = threading.Thread(target=relay, name="stderr-filter", daemon=True)
    thread.start()

    def restore():
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the relay reads what is left, then stops
        thread.join(timeout=5)

    atexit.register(restore)


def cpu_name():
    """The processor's model name (e.g. "AMD EPYC"), to state beside every timing."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (an empty set where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16():
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX); emulated, it is slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def nvidia_gpu_present(proc=Path("/proc/driver/nvidia/gpus"), dev=Path("/dev")):
    """True when the machine has an NVIDIA GPU with its driver loaded, whatever the backend sees: the
    driver lists each GPU under /proc/driver/nvidia/gpus, and a container given GPUs has /dev/nvidia0..."""
    try:
        return (proc.is_dir() and any(proc.iterdir())) or any(dev.glob("nvidia[0-9]*"))
    except OSError:
        return False


def accelerators():
    """Names of the GPUs (or TPUs) the Keras backend sees; empty on a CPU-only run."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
                    for gpu in tf.config.list_physical_devices("GPU")]
        if backend == "jax":
            import jax

            return [device.device_kind for device in jax.devices() if device.platform != "cpu"]
        if backend == "torch":
            import torch

            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # device queries are informative only
        pass
    return []


def device_name():
    """"GPU: <name>" when the Keras backend sees a GPU, else "CPU: <model name>, N cores"."""
    found = accelerators()
    if found:
        return f"GPU: {found[0]}" + (f" (x{len(found)})" if len(found) > 1 else "")
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores"


# ---- More than one process: train.py --distribute with the KERAS_DISTRIBUTION_* variables ----

class DistributionError(Exception):
    """The processes of a run cannot be joined; the message says why and what to do."""


class ProcessGroup(NamedTuple):
    coordinator: tuple | None  # (host, port) of process 0's coordination service; None: one process alone
    processes: int             # how many processes train the model together
    process: int               # this one's number, 0 .. processes - 1; 0 writes the files


def process_group():
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
    import keras

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
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
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
    import keras

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


def git_state():
    """(commit, dirty) of the checkout the scripts run from; (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes.strip())


def environment():
    """What ran: command, code version, packages and hardware, for the JSON beside every model."""
    import importlib.metadata

    import keras
    import numpy

    backend = keras.backend.backend()
    try:
        backend_version = importlib.metadata.version(backend)
    except importlib.metadata.PackageNotFoundError:
        backend_version = "unknown"
    commit, dirty = git_state()
    return {
        "argv": sys.argv,
        "git_commit": commit,
        "git_dirty": dirty,  # True: the checkout had uncommitted changes to tracked files
        "device": device_name(),
        "backend": f"{backend} {backend_version}",
        "python": platform.python_version(),
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
