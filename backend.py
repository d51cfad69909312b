"""A training run's backend settings, and this machine's pace for --minutes.

    set_up_backend(seed, settings, run_info)   # seeds, TensorFlow's determinism, the precision; says where it runs
    set_precision("auto")                      # mixed bfloat16 where the CPU has it, float16 on a GPU, else float32
    time_this_machine(build, images, batch)    # (training, prediction) images a second, on a throwaway model
    epoch_budget(minutes, ...)                 # how many epochs fit in the minutes

machine.py knows the machine (its processor, devices and record); this module sets up Keras on it.
"""

import sys
import time

import machine


def set_precision(mixed):
    """Set Keras's global dtype policy: float32, or mixed bfloat16 (CPU) / float16 (GPU).

    mixed: True, False, or "auto" (mixed where the hardware is faster with it).
    """
    import keras

    on_gpu = bool(machine.accelerators())
    if mixed == "auto":
        mixed = on_gpu or machine.cpu_has_bf16()
    policy = ("mixed_float16" if on_gpu else "mixed_bfloat16") if mixed else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def bf16_warning(resuming):
    """The line a bfloat16 run prints on a CPU that emulates bfloat16 (NOTEBOOK.md, 'Speed': an epoch 11x slower
    than float32 on an AMD EPYC with AVX2), with what to do instead."""
    advice = ("this run was started in bfloat16 and keeps it: continue it on a CPU with AVX512_BF16 or AMX"
              if resuming else "leave out --mixed-precision here")
    return (f"warning: this CPU has no bfloat16 instructions (AVX512_BF16 or AMX), so bfloat16 is emulated, "
            f"several times slower than float32 (README, 'Train'); {advice}")


def set_up_backend(seed, settings, run_info, devices=None):
    """Seed every generator, make TensorFlow deterministic, pick the precision; say what runs where
    (devices: the names of a --distribute run's devices)."""
    import keras

    keras.utils.set_random_seed(seed)  # every process of a run alike: they start from one model
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # same seed, same CPU: same figures
    run_info["dtype_policy"] = set_precision(settings["mixed_precision"])
    print(f"Training on {machine.device_name()} (Keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"{run_info['dtype_policy']})")
    if devices:
        replicas, processes = run_info["replicas"], run_info["processes"]
        print(f"Data parallel on {replicas} replica{'s' * (replicas > 1)} in {processes} "
              f"process{'es' * (processes > 1)}, {settings['batch_size'] // replicas} images each a step: "
              f"{', '.join(devices)}")
    if run_info["dtype_policy"] == "mixed_bfloat16" and machine.cpu_emulates_bf16():
        print(bf16_warning(resuming="resumed_with" in run_info), file=sys.stderr)
    gpus = machine.accelerators()
    if machine.nvidia_gpu_present() and not gpus:
        print(f"warning: this machine has an NVIDIA GPU that the {keras.backend.backend()} backend does not see; "
              f"install the CUDA build (pip install -r requirements-gpu.txt), see README, 'More than one device "
              f"or machine'", file=sys.stderr)
    if len(gpus) > 1 and not devices:
        print(f"This run trains on one of the {len(gpus)} GPUs; --distribute trains on all of them")


# ---- This machine's pace, for --minutes ----

def time_this_machine(build, images, batch, probe_steps=8, scope=None, processes=1):
    """(training, prediction) images per second here, timed on a throwaway model of build():
    one untimed pass compiles, a second over `probe_steps` batches of `batch` prepared images (this
    process's share) is timed. Under --distribute the model is built in `scope`, and each of the
    processes feeds its share of every batch."""
    import numpy as np

    images = np.resize(images, (probe_steps * batch, *images.shape[1:]))
    labels = np.zeros(len(images), dtype=np.int64)
    if scope is None:
        probe = build()
    else:
        with scope():
            probe = build()
    predict = probe.evaluate if processes > 1 else probe.predict  # predictions would stay spread over processes
    rates = []
    for step in (lambda: probe.fit(images, labels, batch_size=batch, epochs=1, verbose=0),
                 lambda: predict(images, batch_size=batch, verbose=0)):
        step()
        start = time.perf_counter()
        step()
        rates.append(processes * len(images) / (time.perf_counter() - start))
    return tuple(rates)


def epoch_budget(minutes, train_rate, predict_rate, n_train, n_val, n_test):
    """(epochs, seconds an epoch): how many epochs fit in `minutes` at these rates (images/s),
    leaving time for the final evaluation of the model and of the best checkpoint."""
    epoch_seconds = n_train / train_rate + n_val / predict_rate + 1.0  # + saving the checkpoints
    final_seconds = 2 * (n_val + n_test) / predict_rate
    return max(1, int((minutes * 60 - final_seconds) // epoch_seconds)), epoch_seconds
