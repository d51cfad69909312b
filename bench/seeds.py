"""Benchmark: one recipe over several seeds, each run a whole `python train.py` command; mean ± std.

    python bench/seeds.py --recipe quick --seeds 1 2 3              # models/quick_1, quick_2, quick_3
    python bench/seeds.py --recipe quick --seeds 1 2 3 --ship quick  # ... and the best on validation as models/quick
    python bench/seeds.py --recipe quick --seeds 4 -- --epochs 20   # flags after -- go to train.py

Seed S runs `python train.py --recipe R --seed S --name PREFIX_S --overwrite [flags]` in a process of
its own, its output shown as it goes. A seed whose models/PREFIX_S.json already records that very
command, finished, is not trained again: its figures are read back (so a benchmark stopped part-way
continues where it was); one stopped mid-run continues with --resume.

Then one line per seed: validation accuracy, test accuracy, test accuracy with TTA (the mean of the
image's and its mirror image's probabilities), and the command's wall time from its start to its
record (train.py's JSON, command_seconds); then the mean ± standard deviation (n - 1) of each column
and the processor. --ship copies the seed with the best validation accuracy (never test) to
models/NAME.h5, .json and .csv.

Run nothing else on the machine meanwhile: the wall times are the point.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402

machine.start_backend()

import numpy as np  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

COLUMNS = ("validation", "test", "test TTA", "minutes")


def command(recipe, seed, name, extra):
    """train.py's arguments for one seed."""
    return ["--recipe", recipe, "--seed", str(seed), "--name", name, "--overwrite", *extra]


def same_run(info, argv):
    """Whether a run's JSON (or resume state) records this command with the settings it gives today:
    the same command line under a recipe since changed is another run."""
    return (info.get("command") == shlex.join(["python", "train.py", *argv])
            and isinstance(info.get("settings"), dict)
            and runs.as_run(info["settings"]) == train.parse_args(argv)[1])


def recorded(name, argv):
    """The JSON of a finished run of exactly this command and these settings, else None."""
    info = models.read_info(name)
    if same_run(info, argv) and "command_seconds" in info and models.model_path(name).exists():
        return info
    return None


def train_seed(name, argv):
    """Train one seed (or continue it), in its own process; its JSON afterwards."""
    info = recorded(name, argv)
    if info:
        print(f"{name}: finished earlier with this command; its figures are read back", flush=True)
        return info
    files = runs.run_files(name)
    stopped = runs.stopped_at(files)
    if stopped and same_run(json.loads(files["resume_info"].read_text()), argv):
        print(f"{name}: stopped after epoch {stopped[0]}; continuing it", flush=True)
        run_argv = ["--name", name, "--resume"]
    else:
        run_argv = argv
    print(f"$ python train.py {shlex.join(run_argv)}", flush=True)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *run_argv], cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: the run of {name} failed (exit {result.returncode}); the benchmark stops here. "
                 f"Run the same command again to continue from this seed.")
    return models.read_info(name)


def figures(name, info, x_test, y_test):
    """(validation, test, test with TTA, minutes) of a finished run, computed here in float32."""
    model = models.load_model(name)
    plain = models.predict(model, x_test)
    mirrored = models.predict(model, x_test[:, :, ::-1])
    return (info.get("val_accuracy") or float("nan"), models.scores(plain, y_test)[0],
            models.scores((plain + mirrored) / 2, y_test)[0], info["command_seconds"] / 60)


WIDTH = 16  # a column: "94.30% ± 0.12%" fits


def row(label, cells):
    return f"{label:>10s} " + " ".join(f"{cell:>{WIDTH}s}" for cell in cells)


def ship(best, name, chosen):
    """Copy run `best` to models/NAME.h5, .csv and .json (saying where it came from), each atomically."""
    source = models.model_path(best)
    target = models.MODELS_DIR / f"{name}.h5"
    for src, dst in ((source, target), (source.with_suffix(".csv"), target.with_suffix(".csv"))):
        data.atomic_write(dst, lambda f, src=src: f.write(src.read_bytes()))
    info = {**models.read_info(best), "model": name, "copied_from": best,
            "chosen_from": chosen, "chosen_on": "val_accuracy"}
    models.write_json(target.with_suffix(".json"), info)
    print(f"Shipped: {best} as {target} (the best validation accuracy of {', '.join(chosen)})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description="A recipe over several seeds: mean ± std.",
                                     epilog="Flags after -- go to train.py as they are.")
    parser.add_argument("--recipe", choices=sorted(train.RECIPES), default="quick", help="default: quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="default: 1 2 3")
    parser.add_argument("--prefix", help="the runs are named PREFIX_SEED (default: the recipe's name)")
    parser.add_argument("--ship", metavar="NAME", help="copy the seed with the best validation accuracy to "
                                                        "models/NAME (default: none)")
    args = parser.parse_args(own)
    prefix = args.prefix or args.recipe
    names = [f"{prefix}_{seed}" for seed in args.seeds]
    for name in names + ([args.ship] if args.ship else []):
        if not runs.NAME_PATTERN.fullmatch(name):
            parser.error(f"{name!r} is not a model name: letters, digits, '.', '_' or '-'")
    if len(set(args.seeds)) < len(args.seeds):
        parser.error("each seed once")
    if args.ship in names:
        parser.error("--ship needs a name other than the runs' own")
    # the flags train.py would refuse, refused now, before any run starts
    train.parse_args(command(args.recipe, args.seeds[0], names[0], extra))

    infos = [train_seed(name, command(args.recipe, seed, name, extra)) for seed, name in zip(args.seeds, names)]
    x_test, y_test = data.load_data("t10k")
    table = np.array([figures(name, info, x_test, y_test) for name, info in zip(names, infos)])

    print(f"\n{' '.join(['python', 'bench/seeds.py', *argv])}")
    print(f"Recipe {args.recipe}{' ' + shlex.join(extra) if extra else ''}; {machine.device_name()}; "
          f"{infos[0].get('backend', '?')}, {infos[0].get('dtype_policy', '?')}")
    print(row("seed", COLUMNS))
    for seed, values, info in zip(args.seeds, table, infos):
        print(row(str(seed), [f"{v:.2%}" for v in values[:3]] + [f"{values[3]:.1f}" + ("*" if info.get("resumed_with") else "")]))
    if len(table) > 1:
        mean, std = table.mean(axis=0), table.std(axis=0, ddof=1)
        print(row("mean ± std", [f"{m:.2%} ± {s:.2%}" for m, s in zip(mean[:3], std[:3])] + [f"{mean[3]:.1f} ± {std[3]:.1f}"]))
    if any(info.get("resumed_with") for info in infos):
        print("* resumed: the minutes of its last session only")
    if args.ship:
        best = names[int(np.nanargmax(table[:, 0]))]
        ship(best, args.ship, names)


if __name__ == "__main__":
    machine.run(main)
