"""distribute.py (train.py --distribute): one model on several devices or processes, on this CPU machine.

The CPU stands for the devices: XLA_FLAGS=--xla_force_host_platform_device_count=2 gives one JAX
process two devices, FASHION_CPU_DEVICES=2 gives TensorFlow two logical CPUs, and two JAX processes
joined on 127.0.0.1 stand for two machines, each in its own copy of the scripts (as on two disks).
The runs are small (two steps of 40 images an epoch), start in the background to share the cores,
and JAX's runs are made cheap to start: compiled with XLA's backend optimisations off, cached in
pytest's cache folder for the next time, and without TensorFlow, as on a machine with JAX alone.
"""

import json
import socket

import keras
import numpy as np
import pytest

import distribute
import erasing
import feed
import machine
import runs
import sandbox
import train

# 47 images: 40 train (80 with one copy each, two batches of 40 an epoch), 7 validate (6 in a run of
# two replicas: every device takes as many).
SMALL = ["--limit", "47", "--augment-copies", "1", "--batch-size", "40"]
SMALL_ALL = ["--limit", "40", "--all-data", "--augment-copies", "1", "--batch-size", "40"]  # the same 40, no validation
pytestmark = pytest.mark.xdist_group("distribute")  # under pytest-xdist: one process starts the runs once


# ---- Pure parts ----

def test_each_process_feeds_its_slice_of_every_global_batch():
    positions, sizes = feed.feed_plan(250, 100, replicas=1)
    assert sizes == [100, 100, 50] and positions.tolist() == list(range(250))
    # Two replicas in one process: the last batch keeps a multiple of 2 (one image is left out).
    positions, sizes = feed.feed_plan(251, 100, replicas=2)
    assert sizes == [100, 100, 50] and positions.tolist() == list(range(250))
    # Four replicas in two processes: each takes half of every batch; together, the batches above.
    shares = [feed.feed_plan(251, 100, replicas=4, process=p, processes=2) for p in (0, 1)]
    assert shares[0][1] == shares[1][1] == [50, 50, 24]
    assert shares[0][0][:50].tolist() == list(range(50)) and shares[1][0][:50].tolist() == list(range(50, 100))
    assert sorted(np.concatenate([shares[0][0], shares[1][0]]).tolist()) == list(range(248))
    assert feed.feed_plan(3, 100, replicas=4)[1] == []  # fewer images than replicas: nothing to feed


@pytest.mark.parametrize("augment", ["copies", "online"])
def test_one_process_feeds_any_number_of_devices_the_batches_of_one(augment):
    x = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    y = np.arange(200) % 10
    settings = dict(train.RECIPES["original"], batch_size=50, augment=augment)
    alone = feed.batches(x, y, settings, seed=4, first_epoch=2)
    on_two = feed.batches(x, y, settings, seed=4, first_epoch=2, replicas=2)
    for _ in range(8):  # two epochs
        a, b = next(alone), next(on_two)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_two_processes_share_each_batch_and_augment_from_their_own_streams():
    x = np.random.default_rng(1).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    y = np.arange(200)  # labels name the images
    settings = dict(train.RECIPES["fast"], batch_size=50)  # online augmentation
    alone = feed.batches(x, y, settings, seed=4, first_epoch=0)
    shares = [feed.batches(x, y, settings, seed=4, first_epoch=0, replicas=2, process=p, processes=2)
              for p in (0, 1)]
    first = [next(alone) for _ in range(4)]
    parts = [[next(share) for _ in range(4)] for share in shares]
    for step in range(4):  # the same images in the same global batches, process 0's half first
        assert np.array_equal(np.concatenate([parts[0][step][1], parts[1][step][1]]), first[step][1])
    # Each process flips and erases its images from the stream of (seed, epoch, process).
    for process in (0, 1):
        labels = np.concatenate([batch[1] for batch in parts[process]])
        expected = erasing.flip_and_erase(x[labels], np.random.default_rng([4, 0, process]), fill="pixel")
        assert np.array_equal(np.concatenate([batch[0] for batch in parts[process]])[..., 0],
                              expected.astype(np.float32) / 255)
    # The copies made once are the same everywhere: with fixed copies the slices are the one-process batches.
    copies = dict(train.RECIPES["original"], batch_size=50)
    alone = feed.batches(x, y, copies, seed=4, first_epoch=0)
    shares = [feed.batches(x, y, copies, seed=4, first_epoch=0, replicas=2, process=p, processes=2) for p in (0, 1)]
    for _ in range(4):
        whole, halves = next(alone), [next(share) for share in shares]
        assert np.array_equal(np.concatenate([h[0] for h in halves]), whole[0])


def test_mirrored_strategy_gets_a_whole_stream_for_every_iterator_it_makes():
    """MirroredStrategy makes an iterator of its input that it does not read from; its read-ahead
    must not take batches from the one that trains (the first epoch's would be lost, and every
    later epoch would start late)."""
    x = np.random.default_rng(2).integers(0, 256, (100, 28, 28), dtype=np.uint8)
    y = np.arange(100)
    settings = dict(train.RECIPES["original"], batch_size=30)
    stream = lambda: feed.batches(x, y, settings, seed=4, first_epoch=0)  # noqa: E731
    dataset = distribute.mirrored_feed(stream, x, y)
    ahead = iter(dataset)
    [next(ahead) for _ in range(3)]
    expected = stream()
    for images, labels in dataset.take(9):  # two epochs and more
        want = next(expected)
        assert np.array_equal(labels.numpy(), want[1]) and np.array_equal(images.numpy(), want[0])


@pytest.mark.parametrize("backend, asked, variables, expected", [
    ("tensorflow", True, False, None),
    ("jax", True, True, None),
    ("jax", False, False, None),
    ("torch", True, False, "no distribution API for the torch backend"),
    ("tensorflow", True, True, "keras-team/keras#20585"),
    ("torch", True, True, "no distribution API for the torch backend"),
    ("jax", False, True, "add --distribute"),
])
def test_what_each_backend_can_distribute(backend, asked, variables, expected):
    group = distribute.ProcessGroup(("10.0.0.1", 1234), 2, 0) if variables else distribute.ProcessGroup(None, 1, 0)
    problem = distribute.distribution_problem(backend, asked, group)
    assert problem is None if expected is None else expected in problem


@pytest.fixture
def variables(monkeypatch):
    """Set the three KERAS_DISTRIBUTION_* variables (None: unset)."""
    def set_them(addresses, count, index):
        for name, value in zip(distribute.DISTRIBUTION_VARIABLES, (addresses, count, index)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
    return set_them


@pytest.mark.parametrize("values, message", [
    (("10.0.0.1:1234", "2", None), "KERAS_DISTRIBUTION_PROCESS_ID not set"),
    (("10.0.0.1:1234", "2", "2"), "the id from 0 to the number of processes - 1"),
    (("10.0.0.1:1234", "two", "0"), "must be whole numbers"),
    (("10.0.0.1:1234,10.0.0.2:1234,10.0.0.3:1234", "2", "0"), "names 3 processes but"),
    (("10.0.0.1", "2", "0"), "must start with the coordinator's host:port"),
    (("10.0.0.1:99999", "2", "0"), "must start with the coordinator's host:port"),
])
def test_the_variables_are_read_and_checked(variables, values, message):
    variables(None, None, None)
    assert distribute.group_from_environment() == (None, 1, 0)
    variables("10.0.0.1:1234,10.0.0.2:2345", "2", "1")
    assert distribute.group_from_environment() == (("10.0.0.1", 1234), 2, 1)
    variables("[::1]:1234", "3", "0")
    assert distribute.group_from_environment() == (("::1", 1234), 3, 0)
    variables(*values)
    with pytest.raises(distribute.DistributionError, match=message):
        distribute.group_from_environment()


def refused(*argv):
    with pytest.raises(SystemExit) as exit_:
        train.main(list(argv))
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_tensorflow_refuses_several_processes_and_a_batch_that_does_not_divide(variables, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(train.models, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(runs, "SCREENSHOTS_DIR", tmp_path / "screenshots")
    variables("127.0.0.1:1234", "2", "0")
    message = refused("--distribute", "--name", "multi")
    assert "KERAS_BACKEND=jax" in message and "keras-team/keras#20585" in message
    assert "add --distribute" in refused("--name", "multi")
    variables("127.0.0.1:1234", "2", None)
    assert "KERAS_DISTRIBUTION_PROCESS_ID not set" in refused("--distribute", "--name", "multi")
    assert not (tmp_path / "models").exists()  # refused before the run claimed its files
    # 250 images a step do not divide among 3 replicas: refused before the run writes anything.
    variables(None, None, None)
    args, settings = train.parse_args(["--name", "odd", "--distribute"])
    files, lock = runs.claim(args)
    with pytest.raises(SystemExit) as exit_:
        runs.begin(args, settings, files, "python train.py", replicas=3)
    lock.close()
    assert exit_.value.code == ("error: --batch-size 250 does not divide among 3 replicas; give a multiple of 3, "
                                "e.g. --batch-size 249 or 252")
    assert not files["resume_info"].exists()


def test_a_gpu_is_seen_by_its_driver_whatever_the_backend(tmp_path):
    proc, dev = tmp_path / "gpus", tmp_path / "dev"
    dev.mkdir()
    assert not machine.nvidia_gpu_present(proc, dev)
    (proc / "0000:01:00.0").mkdir(parents=True)
    assert machine.nvidia_gpu_present(proc, dev)
    assert machine.nvidia_gpu_present(tmp_path / "none", dev) is False
    (dev / "nvidia0").touch()
    assert machine.nvidia_gpu_present(tmp_path / "none", dev)


def test_one_process_keeps_its_values():
    arrays = [np.arange(3.0), np.int64(7)]
    assert all(a is b for a, b in zip(distribute.from_process_0(arrays), arrays, strict=True))
    assert distribute.json_from_process_0({"epochs": 3, "lr": 1e-3}) == {"epochs": 3, "lr": 1e-3}


# ---- Whole runs, as separate processes ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """train.py started in the background in `folder`; finish() waits for it."""

    def __init__(self, folder, *args, backend="jax", join_seconds=240, devices=1, **env):
        if backend == "jax":  # compiling optimised code would take most of these short runs' time
            env["XLA_FLAGS"] = (f"--xla_backend_optimization_level=0 "
                                f"--xla_force_host_platform_device_count={devices}")
        self.args = args
        self.process = sandbox.start(folder, *args, KERAS_BACKEND=backend, JOIN_SECONDS=str(join_seconds), **env)

    def finish(self, returncode=0, timeout=400):
        if self.process.returncode is None:
            self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        if self.process.returncode != returncode:
            raise AssertionError(f"{self.args} ended with {self.process.returncode}:\n{self.stdout[-2000:]}\n"
                                 f"{self.stderr[-3000:]}")
        return self

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def member(folder, index, port, *args, processes=2, **options):
    """Process `index` of a run of `processes` whose coordinator is 127.0.0.1:port."""
    return Run(folder, *args, KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
               KERAS_DISTRIBUTION_NUM_PROCESSES=str(processes), KERAS_DISTRIBUTION_PROCESS_ID=str(index), **options)


def joined(folders, *args, **options):
    """One Run per folder, process i in folders[i], joined on a free port."""
    port = free_port()
    return [member(folder, index, port, *args, **options) for index, folder in enumerate(folders)]


class Runs:
    """The runs of this file, each started once, when first asked for, in two sandboxes: machine 1
    and machine 2. They share a JAX compilation cache: a run started after another of the same
    shapes (or in a later session) skips most of its compiling."""

    def __init__(self, base, cache):
        self.one, self.two = sandbox.make(base / "machine1"), sandbox.make(base / "machine2")
        self.cache = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        self.started = {}

    def get(self, name):
        if name not in self.started:
            self.started[name] = getattr(self, name)()
        return self.started[name]

    # The reference: one JAX device. --limit 40 --all-data trains on the images --limit 47 trains on.
    def one_device(self):
        return Run(self.one, *SMALL_ALL, "--epochs", "2", "--name", "one_device", **self.cache)

    def two_devices(self):
        return Run(self.one, *SMALL_ALL, "--epochs", "2", "--name", "two_devices", "--distribute", devices=2,
                   **self.cache)

    def machines(self):  # one epoch, then --resume
        return joined([self.one, self.two], *SMALL, "--epochs", "1", "--name", "machines", "--distribute",
                      **self.cache)

    def resumed(self):  # the stopped run's state is on machine 1 only
        return joined([self.one, self.two], "--resume", "--epochs", "2", "--name", "machines", "--distribute",
                      **self.cache)

    def mirrored(self):
        return Run(self.one, *SMALL, "--epochs", "1", "--name", "mirrored", "--distribute", backend="tensorflow",
                   FASHION_CPU_DEVICES="2")

    def unreachable(self):  # process 1, with no coordinator at its address
        return member(self.two, 1, free_port(), "--name", "lonely", "--distribute", join_seconds=3)

    def alone(self):  # process 0, with no process 1
        return member(self.one, 0, free_port(), "--name", "alone", "--distribute", join_seconds=3)


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory, pytestconfig):
    """The reference, TensorFlow's run and the lonely processes start at once; the JAX runs of
    several replicas as the tests ask for them."""
    sandboxes = Runs(tmp_path_factory.mktemp("distribute"), pytestconfig.cache.mkdir("jax-compilation-cache"))
    for name in ("one_device", "mirrored", "unreachable", "alone"):
        sandboxes.get(name)
    yield sandboxes
    for run in sandboxes.started.values():
        for process in run if isinstance(run, list) else [run]:
            process.kill()  # any still running after a failure


def weights(path):
    return keras.models.load_model(path).get_weights()


def history(path):
    return np.genfromtxt(path, delimiter=",", names=True)


def assert_trained_like(path, reference, loss_rtol=1e-5, weights_rtol=1e-3):
    """The history and weights of a run of several replicas match one device's, to float32 round-off:
    the first epoch's mean loss closely (its first step differs only in the order of sums), the rest as
    round-off grows in training (Adam turns differences in near-zero gradients into whole steps)."""
    ours, theirs = history(path.with_suffix(".csv")), history(reference.with_suffix(".csv"))
    assert ours["epoch"].tolist() == theirs["epoch"].tolist()
    np.testing.assert_allclose(ours["loss"][0], theirs["loss"][0], rtol=loss_rtol)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=20 * loss_rtol)
    ours, theirs = weights(path), weights(reference)
    difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(ours, theirs)))
    assert difference <= weights_rtol * np.sqrt(sum(np.sum(b ** 2) for b in theirs)), difference


def assert_one_set_of_files(folder, name, validated=True):
    """NAME's files in a sandbox, each once, nothing left half-written; its model loads on TensorFlow."""
    found = [p for sub in ("models", "screenshots") if (folder / sub).exists() for p in (folder / sub).rglob("*")]
    listed = sorted(str(p.relative_to(folder)) for p in found
                    if p.is_file() and (p.name.lstrip(".").startswith(name) or p.parent.name == name))
    suffixes = [".csv", ".h5", ".json", "_resume.json", "_resume.keras", *(["_acc.h5", "_acc.json"] * validated)]
    expected = [f"models/{name}{suffix}" for suffix in suffixes]
    assert listed == sorted([*expected, f"models/.{name}.lock", f"screenshots/{name}/Training_history.png"]), listed
    assert keras.models.load_model(folder / "models" / f"{name}.h5").count_params() == 3_458_382


def test_one_process_on_two_jax_devices_trains_as_one_device_does(sandboxes):
    one = sandboxes.get("one_device").finish()  # plain train.py under JAX: its model loads under TensorFlow
    assert "backend jax" in one.stdout and "Data parallel" not in one.stdout
    assert_one_set_of_files(sandboxes.one, "one_device", validated=False)
    sandboxes.get("machines")  # starts now, to share the cores with this one
    run = sandboxes.get("two_devices").finish()
    assert "Data parallel on 2 replicas in 1 process, 20 images each a step: CPU:0, CPU:1" in run.stdout
    record = json.loads((sandboxes.one / "models" / "two_devices.json").read_text())
    assert (record["replicas"], record["processes"], record["epochs_done"]) == (2, 1, 2)
    assert json.loads((sandboxes.one / "models" / "one_device.json").read_text())["replicas"] == 1
    assert_trained_like(sandboxes.one / "models" / "two_devices.h5", sandboxes.one / "models" / "one_device.h5")
    assert_one_set_of_files(sandboxes.one, "two_devices", validated=False)


def test_two_processes_train_one_model_that_process_0_alone_writes_and_resumes(sandboxes):
    first, second = [run.finish() for run in sandboxes.get("machines")]
    assert "Data parallel on 2 replicas in 2 processes" in first.stdout and " - loss: " in first.stdout
    assert "Process 1 of 2: joined" in second.stdout and " - loss: " not in second.stdout
    assert second.stdout.rstrip().endswith("Process 1 of 2: done")
    record = json.loads((sandboxes.one / "models" / "machines.json").read_text())
    assert (record["replicas"], record["processes"]) == (2, 2)
    assert not (sandboxes.two / "models").exists() and not (sandboxes.two / "screenshots").exists()  # machine 2: nothing
    first, second = [run.finish() for run in sandboxes.get("resumed")]
    assert "Resuming machines after epoch 1 of 2" in first.stdout and "Epoch 2/2" in first.stdout
    assert not (sandboxes.two / "models").exists() and not (sandboxes.two / "screenshots").exists()
    assert json.loads((sandboxes.one / "models" / "machines.json").read_text())["epochs_done"] == 2
    # Each process fed its half of the same global batches: one device's training, to round-off.
    sandboxes.get("one_device").finish()
    assert_trained_like(sandboxes.one / "models" / "machines.h5", sandboxes.one / "models" / "one_device.h5")
    assert_one_set_of_files(sandboxes.one, "machines")


def test_mirrored_strategy_on_two_cpu_devices(sandboxes):
    run = sandboxes.get("mirrored").finish()
    assert "Data parallel on 2 replicas in 1 process, 20 images each a step: CPU:0, CPU:1" in run.stdout
    record = json.loads((sandboxes.one / "models" / "mirrored.json").read_text())
    assert (record["replicas"], record["processes"], record["epochs_done"]) == (2, 1, 1)
    assert_one_set_of_files(sandboxes.one, "mirrored")
    # Batch normalisation synchronized while training, not in the file (JAX refuses the setting).
    model = keras.models.load_model(sandboxes.one / "models" / "mirrored.h5")
    assert not any(layer.get_config().get("synchronized") for layer in model.layers)


def test_processes_that_cannot_join_stop_with_one_line_each(sandboxes):
    lonely = sandboxes.get("unreachable").finish(returncode=1)
    alone = sandboxes.get("alone").finish(returncode=1)
    for run in (lonely, alone):
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "process 1 cannot reach the coordinator 127.0.0.1:" in lonely.stderr and "within 3 s" in lonely.stderr
    assert "not all 2 processes joined within 3 s" in alone.stderr and "KERAS_DISTRIBUTION_PROCESS_ID 1" in alone.stderr
