"""The machine a script runs on: a quiet start of the Keras backend, its devices, and the record of
what ran (versions, processor, git commit) that goes into every model's JSON.

Call start_backend() before importing Keras. TensorFlow prints lines that read as errors to a
newcomer but are not ("Could not find cuda drivers", "failed call to cuInit", the oneDNN and CPU
instruction notices, a tf.data attribute notice during training). They come from C++ straight to
the stderr file descriptor, before any Python logging is set up, so they are filtered there:
every other line still shows. `--verbose` on the command line (or FASHION_VERBOSE=1) keeps them all.

FASHION_CPU_DEVICES=N splits the CPU into N devices (logical devices under TensorFlow, XLA host
devices under JAX), so that multi-device training (distribute.py) can be tested on a machine without
GPUs; it changes nothing else.
"""

import atexit
import errno
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STARTED = time.monotonic()  # about when the script started (every script imports this module first)
VERBOSE = "--verbose" in sys.argv[1:] or os.environ.get("FASHION_VERBOSE") == "1"
BACKENDS = ("tensorflow", "jax")  # the Keras backends the scripts are tested under
CPU_DEVICES_VARIABLE = "FASHION_CPU_DEVICES"  # N: the CPU as N devices, for testing multi-device code

# Start-up notices that are not problems on a machine without a GPU (or with one).
NOISE = re.compile(
    r"All log messages before absl::InitializeLog|cudart_stub|Could not find cuda drivers|cuInit|"
    r"cpu_feature_guard|This TensorFlow binary is optimized|To enable the following instructions|"
    r"oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|absl::InitializeLog|TensorFlow binary was not compiled|"
    r"use_unbounded_threadpool|does not implement the AsGraphDefInternal"
)


TCMALLOC = "tcmalloc_minimal"  # Debian's libtcmalloc-minimal4: libtcmalloc_minimal.so.4


def preload_tcmalloc(find_library=None):
    """Run this script again, in this process, with tcmalloc preloaded: on Linux, where it is installed
    (Debian: libtcmalloc-minimal4) and LD_PRELOAD is not set. With glibc's allocator TensorFlow's large
    per-step buffers go back to the system and fault back in every step; tcmalloc keeps them, and CPU
    training runs up to twice as fast with the same weights (NOTEBOOK.md, "Speed"). `LD_PRELOAD=`
    (set, empty) keeps glibc's. Call it first, before the backend starts."""
    if sys.platform != "linux" or "LD_PRELOAD" in os.environ:
        return
    if find_library is None:
        import ctypes.util

        find_library = ctypes.util.find_library
    library = find_library(TCMALLOC)
    if library:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "LD_PRELOAD": library})


def start_backend():
    """Import Keras and its backend, and find the backend's devices, with the notices filtered.

    JAX is imported but not started: keras.distribution.initialize() must come before its first
    computation (train.py --distribute calls it through distribute.join_processes).
    """
    os.environ["KERAS_BACKEND"] = check_backend(os.environ.get("KERAS_BACKEND") or "tensorflow")
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


class DiskFull(OSError):
    """A file that could not be written for want of space (or of quota): which, and about how much it
    needs. An OSError, so what catches those catches it; str() is one line."""

    def __init__(self, path, needed):
        self.needed = needed
        super().__init__(errno.ENOSPC, f"no space left on the disk (it needs at least {size_text(needed)})",
                         str(path))

    def __str__(self):
        return f"no space left on the disk for {self.filename} (it needs at least {size_text(self.needed)})"


def size_text(n_bytes):
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{max(1, -(-n_bytes // 1000))} kB"  # kB rounded up


def reason(error, limit=200):
    """An error's message for a one-line report: its first non-blank line, cut to `limit` characters,
    or the error's type where the message is empty. (A garbled file's bytes can end up in the message,
    newlines and all, so the first line is all a one-line report can carry.)"""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return line[:limit] if line else type(error).__name__


def out_of_space(error):
    """Whether an error means the disk (or the user's quota) is full; h5py says so only in its message."""
    text = str(error)
    return isinstance(error, OSError) and (error.errno in (errno.ENOSPC, errno.EDQUOT)
                                           or "No space left on device" in text or "errno = 28" in text)


def disk_full(error, path, tmp=None):
    """`error` as a DiskFull for `path` when it means the disk is full (else None): the space needed is
    at least what was written to `tmp` before it failed, or the size of the file it replaces."""
    if isinstance(error, DiskFull) or not out_of_space(error):
        return None
    sizes = [0]
    for written in (tmp, path):
        try:
            sizes.append(Path(written).stat().st_size if written else 0)
        except OSError:
            pass
    return DiskFull(path, max(sizes))


class Terminated(KeyboardInterrupt):
    """SIGTERM, as a KeyboardInterrupt: `timeout`, Slurm, Kubernetes and most schedulers stop a job with it."""


TERMINATED = []  # the SIGTERM that raise_terminated raised for, for code that catches it (a server's loop)


def raise_terminated(signum, frame):
    TERMINATED.append(signum)
    raise Terminated


def stop_code(stop):
    """The exit status of a run stopped by `stop` (a KeyboardInterrupt, or a signal number), as a shell
    reports a process the signal ended: 143 for SIGTERM, 130 for Ctrl-C."""
    terminated = isinstance(stop, Terminated) or stop == signal.SIGTERM
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def run(main):
    """Run a script's main(). Ctrl-C or SIGTERM ends it with one line and status 130 or 143, a full disk
    with one line and status 1, not a traceback; the scripts write every file to a temporary name and
    rename it, so none is left half-written. (train.py's epochs stop between steps, and keep the
    run's state: runs.CtrlC; runs.Run.fit says how to continue after a full disk.)"""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return main()
    except OSError as e:
        if not out_of_space(e):
            raise
        where = str(e) if isinstance(e, DiskFull) else f"no space left on the disk for {e.filename or 'a file'}"
        sys.exit(f"error: {where}; nothing half-written is left: free some space and run again")
    except KeyboardInterrupt as stop:
        how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
        print(f"\nStopped ({how}) before the end; no file is left half-written", file=sys.stderr)
        sys.exit(stop_code(stop))


def check_backend(asked):
    """The backend KERAS_BACKEND asks for, spelt as Keras knows it; exits with one line when it is not
    one this project runs under, or is not installed (people set the variable for other projects)."""
    import importlib.util

    backend = asked.strip().lower()
    installed = [name for name in BACKENDS if importlib.util.find_spec(name) is not None]
    if backend in installed:
        return backend
    why = "is not installed here" if backend in BACKENDS else "is not a backend this project runs under"
    sys.exit(f"error: KERAS_BACKEND={asked!r} {why} (installed: {', '.join(installed) or 'none'}); "
             f"unset KERAS_BACKEND, or set it to {' or '.join(installed or BACKENDS)}")


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


def cpu_has_bf16(flags=None):
    """True when the CPU (or these flags) computes bfloat16 natively (AVX512_BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & (cpu_flags() if flags is None else flags))


def cpu_emulates_bf16(flags=None):
    """True when the CPU's flags are known and lack bfloat16: it runs emulated there, several
    times slower than float32. False where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and not cpu_has_bf16(flags)


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


# What runs write, not code: a committed model or resume state that a run has since replaced does not
# make the checkout's code differ from its commit.
OUTPUT_FOLDERS = ("models", "screenshots")
COMMIT_VARIABLE = "FASHION_GIT_COMMIT"  # the commit a copy without .git was made from


def git_state(root=ROOT):
    """(commit, dirty) of the checkout the scripts run from. dirty: a tracked file outside
    OUTPUT_FOLDERS differs from the commit. Outside a git checkout (a copy of the scripts sent to
    another machine, without .git): (FASHION_GIT_COMMIT, None), the commit the sender names; else
    (None, None)."""
    outputs = [f":(exclude){folder}" for folder in OUTPUT_FOLDERS]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
                                 cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_VARIABLE) or None, None
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
    # float32 products under JAX: "default" lets XLA use TF32 tensor cores on NVIDIA GPUs (Ampere on),
    # as TensorFlow does by default; "highest" asks for full float32 (JAX_DEFAULT_MATMUL_PRECISION)
    precision = {}
    if backend == "jax":
        import jax

        precision["matmul_precision"] = jax.config.jax_default_matmul_precision or "default"
    return {
        "argv": sys.argv,
        "git_commit": commit,
        "git_dirty": dirty,  # True: the checkout's code had uncommitted changes (git_state)
        "device": device_name(),
        "backend": f"{backend} {backend_version}",
        "python": platform.python_version(),
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        # e.g. tcmalloc (NOTEBOOK.md, "Speed"): a faster CPU run, the same weights; timings depend on it
        "preloaded": os.environ.get("LD_PRELOAD") or None,
        **precision,
    }
