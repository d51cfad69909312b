"""Baseline: exact k-nearest neighbours on the raw pixels (k=5, Manhattan distance).

Distances are exact integers on the uint8 pixels: the L1 distance of pixels
scaled to [0, 1] is the same number divided by 255, so the neighbours are the
same. Neighbours at equal distance are taken in training-set order, and a tied
vote goes to the smallest label, so the result is deterministic:

    python knn.py            ->  Test accuracy: 0.8623

Two back-ends give the same neighbours bit for bit: "numpy" (the reference)
and "numba" (a compiled kernel that uses the CPU's sum-of-absolute-differences
instruction, `psadbw`, on blocks of test rows against the training set; one
thread per core). The kernel sums the pixels in order of their variance over
the training images and stops summing a training image once its partial
distance reaches the k-th nearest found so far: it could no longer be a
neighbour, so the result is unchanged, and most of each row is never read
(about 1.3x faster here). "auto" picks numba when it is installed.

numba compiles the kernel on the first run (seconds) and keeps the machine
code on disk, in __pycache__ beside this file (or in NUMBA_CACHE_DIR), so later
runs load it at once; an entry serves only the instruction set, row width and
CPU it was built for, and is rebuilt when this file or numba changes.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import data
import machine

try:  # the compiled back-end; without numba, knn.py runs the NumPy reference
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic
except ImportError:
    numba = ir = None

    def intrinsic(func):  # the kernel below then stays uncompiled, and unused
        return func

K = 5  # neighbours that vote
METRIC = "l1"  # l1 (Manhattan, the seed's) or l2 (Euclidean)
BACKEND = "auto"  # auto: numba if it is installed, else numpy
CHUNK = 1000  # test images per progress step
TRAIN_IMAGES, TEST_IMAGES = 60000, 10000  # Fashion-MNIST's split sizes, to check options before loading
PAD = 64  # the kernel reads rows in 64-byte pieces (one AVX-512 register)
QUERY_ROWS = 16  # test rows the kernel scans the training tiles for at once (a thread takes 4 such blocks)
TRAIN_TILE = 512  # training rows the kernel scans per test row in turn (~420 KB, stays in L2)
CHECK_BYTES = 384  # the kernel compares a partial distance with the k-th best so far every this many bytes
# Instruction sets the kernel has a variant for: bytes per instruction, and the LLVM intrinsic that
# sums absolute differences (psadbw); "portable" leaves the choice of instructions to LLVM.
ISAS = {
    "avx512": (64, "llvm.x86.avx512.psad.bw.512"),
    "avx2": (32, "llvm.x86.avx2.psad.bw"),
    "portable": (16, None),
}


def as_rows(images):
    """(n, ...) -> (n, pixels): one row of pixels per image, the width from the image shape (so an
    empty array keeps it)."""
    return images.reshape(len(images), int(np.prod(images.shape[1:])))


def flatten(images, order=None):
    """(n, ...) uint8 -> (n, width) C-contiguous uint8: the pixels (in `order`, if given), zero-padded
    to a multiple of PAD.

    28x28 images give rows of 832 bytes.

    Padding with zeros adds nothing to any distance, and neither does putting every row's pixels in
    the same order.
    """
    rows = as_rows(images)
    pixels = rows.shape[1]
    flat = np.zeros((len(images), -(-pixels // PAD) * PAD), dtype=np.uint8)
    flat[:, :pixels] = rows if order is None else rows[:, order]  # a copy: the kernel reads contiguous rows
    return flat


def pixel_order(x_train):
    """The pixel positions from the most varied over the training images to the least: in that order
    a partial distance grows fastest, and the kernel can stop summing a far training image early."""
    sample = as_rows(x_train)[::max(1, len(x_train) // 6000)]  # enough to rank them
    return np.argsort(-sample.var(axis=0), kind="stable")


def select(dist, k):
    """Indices of the k smallest distances in each row, ordered by (distance, column)."""
    # One int64 key per pair makes ties go to the smaller training index.
    key = dist.astype(np.int64) << 17 | np.arange(dist.shape[1], dtype=np.int64)
    key = np.partition(key, k - 1, axis=1)[:, :k]
    key.sort(axis=1)
    return (key & ((1 << 17) - 1)).astype(np.int32)


def l1_block(x_query, x_train, tile=2048):
    """Exact L1 distances (len(x_query), len(x_train)) as int32, in tiles to bound memory."""
    q = x_query.astype(np.int16)[:, None, :]
    dist = np.empty((len(x_query), len(x_train)), dtype=np.int32)
    for t0 in range(0, len(x_train), tile):
        t = x_train[t0:t0 + tile].astype(np.int16)[None, :, :]
        dist[:, t0:t0 + tile] = np.abs(q - t).sum(axis=2, dtype=np.int32)
    return dist


def l2_block(x_query, x_train, train_sq):
    """Exact squared L2 distances as int64 (float64 products of integers below 2**53 are exact)."""
    q = x_query.astype(np.float64)
    dist = (q * q).sum(axis=1)[:, None] + train_sq[None, :] - 2.0 * (q @ x_train.astype(np.float64).T)
    return np.rint(dist).astype(np.int64)


def neighbours_numpy(x_query, x_train, k, metric, rows=8):
    """The reference: NumPy distances for `rows` test images at a time, on all cores."""
    x_query, x_train = as_rows(x_query), as_rows(x_train)
    if metric == "l2":
        train_sq = (x_train.astype(np.float64) ** 2).sum(axis=1)
        return select(l2_block(x_query, x_train, train_sq), k)
    blocks = [x_query[i:i + rows] for i in range(0, len(x_query), rows)]
    parts = on_all_cores(lambda block: select(l1_block(block, x_train), k), blocks)  # NumPy releases the GIL
    return np.concatenate(parts) if blocks else np.empty((0, k), np.int32)


def on_all_cores(func, items):
    """[func(item) for item in items], in one thread per core. On Ctrl-C or SIGTERM the items under way
    end and the queued ones never start, so a stop takes a block's time, not the rest of the list's."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        try:
            return list(pool.map(func, items))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def best_isa():
    """The widest instruction set the kernel has a variant for, on the CPU numba compiles for.

    That is this CPU, unless NUMBA_CPU_NAME=generic or NUMBA_CPU_FEATURES name another target.
    """
    import llvmlite.binding as llvm

    if numba is not None and numba.config.CPU_FEATURES is not None:  # e.g. "+avx2,-avx512bw"; "" for generic
        features = {name[1:]: name[0] == "+" for name in numba.config.CPU_FEATURES.split(",") if name}
    else:
        features = llvm.get_host_cpu_features()
    return "avx512" if features.get("avx512bw") else "avx2" if features.get("avx2") else "portable"


def numba_available():
    return numba is not None


def cached_kernel(kernel):
    """kernel compiled by numba, its machine code kept on disk for later runs. It releases the GIL, so
    threads run it on all cores at once (nearest_rows); numba's own parallel loops compile about 4 s
    slower on 2 cores, for the same speed.

    numba writes the cache to NUMBA_CACHE_DIR if set, else to __pycache__ beside this file, else (read-only
    folder) to the user's cache folder; where none is writable it compiles on every run. An entry is used
    only for the same contents of this file, numba version, argument types and CPU (name and features).
    Without numba, kernel stays plain Python and is never called.
    """
    if numba is None:
        return kernel
    try:
        return numba.njit(cache=True, nogil=True)(kernel)
    except RuntimeError:  # "no locator available": no writable cache folder anywhere
        return numba.njit(nogil=True)(kernel)


def row_records(images, isa, order=None):
    """(n, ...) uint8 -> (n,) records, one padded row of pixels (in `order`) each, the record's one
    field named isa.

    The row width (the record's size) and the instruction set (its field name) are then part of the
    kernel's argument types: numba compiles, and caches, one kernel per (isa, width), unrolled for that
    width, and never serves the machine code of one to another.
    """
    flat = flatten(images, order)
    return flat.view(np.dtype([(isa, np.uint8, (flat.shape[1],))])).reshape(len(flat))


@intrinsic
def row_l1(typingctx, a, a_row, b, b_row, bound):
    """sum |a[a_row] - b[b_row]| over the bytes of two row records (see row_records), as int64; or,
    once a partial sum (taken every CHECK_BYTES) reaches `bound`, that partial sum (>= bound, so the
    caller's `d < bound` is false either way: the same neighbours, with less of the row summed)."""
    if not (isinstance(a, numba.types.Array) and isinstance(a.dtype, numba.types.Record) and b == a):
        return None
    (isa,) = a.dtype.fields
    width = a.dtype.size  # bytes per row, a multiple of PAD
    lanes, psadbw = ISAS[isa]
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    bytes_t = ir.VectorType(i8, lanes)

    def declare(module, name, ret, args):
        if name in module.globals:
            return module.globals[name]
        return ir.Function(module, ir.FunctionType(ret, args), name)

    def codegen(context, builder, signature, args):
        rows = []  # i8* to the first byte of each of the two rows
        for array_t, array, row in ((signature.args[0], args[0], args[1]), (signature.args[2], args[2], args[3])):
            data = builder.bitcast(context.make_array(array_t)(context, builder, array).data, i8.as_pointer())
            rows.append(builder.gep(data, [builder.mul(row, ir.Constant(i64, width))]))
        done = builder.append_basic_block("row_l1.done")
        exits = []  # (sum, block) of every way to `done`

        def summed(total):
            vector_t = total.type  # <N x iB>
            reduce = declare(builder.module, f"llvm.vector.reduce.add.v{vector_t.count}i{vector_t.element.width}",
                             vector_t.element, [vector_t])
            result = builder.call(reduce, [total])
            return builder.zext(result, i64) if result.type != i64 else result

        total = None
        for offset in range(0, width, lanes):
            loads = [builder.load(builder.bitcast(builder.gep(row, [ir.Constant(i64, offset)]), bytes_t.as_pointer()),
                                  align=1) for row in rows]
            if psadbw:  # one instruction: |a - b| summed in groups of 8 bytes -> lanes/8 int64
                sums_t = ir.VectorType(i64, lanes // 8)
                part = builder.call(declare(builder.module, psadbw, sums_t, [bytes_t, bytes_t]), loads)
            else:
                sums_t = ir.VectorType(i32, lanes)
                suffix = f"v{lanes}i8"
                high = builder.call(declare(builder.module, f"llvm.umax.{suffix}", bytes_t, [bytes_t] * 2), loads)
                low = builder.call(declare(builder.module, f"llvm.umin.{suffix}", bytes_t, [bytes_t] * 2), loads)
                part = builder.zext(builder.sub(high, low), sums_t)
            total = part if total is None else builder.add(total, part)
            end = offset + lanes
            if end % CHECK_BYTES == 0 and end < width:  # far enough already? then stop here
                partial = summed(total)
                more = builder.append_basic_block("row_l1.more")
                exits.append((partial, builder.block))
                builder.cbranch(builder.icmp_signed(">=", partial, args[4]), done, more)
                builder.position_at_end(more)
        exits.append((summed(total), builder.block))
        builder.branch(done)
        builder.position_at_end(done)
        result = builder.phi(i64)
        for value, block in exits:
            result.add_incoming(value, block)
        return result

    return numba.types.int64(a, numba.types.intp, b, numba.types.intp, numba.types.int64), codegen


@cached_kernel
def top_k_l1(x_query, x_train, k, out_index):
    """out_index[q] = the k nearest training rows of query row q by L1, ordered by (distance, index).

    x_query, x_train: row records of the same type (row_records); out_index: (len(x_query), k) int32.
    """
    n_query, n_train = x_query.shape[0], x_train.shape[0]
    for block in range((n_query + QUERY_ROWS - 1) // QUERY_ROWS):
        q0 = block * QUERY_ROWS
        q1 = min(q0 + QUERY_ROWS, n_query)
        best_dist = np.full((QUERY_ROWS, k), np.iinfo(np.int64).max, dtype=np.int64)
        best_index = np.zeros((QUERY_ROWS, k), dtype=np.int32)
        for t0 in range(0, n_train, TRAIN_TILE):
            for q in range(q0, q1):
                r = q - q0
                worst = best_dist[r, k - 1]
                for j in range(t0, min(t0 + TRAIN_TILE, n_train)):
                    d = row_l1(x_query, q, x_train, j, worst)
                    if d < worst:  # strict: an equal distance later in training order loses
                        p = k - 1
                        while p > 0 and best_dist[r, p - 1] > d:
                            best_dist[r, p] = best_dist[r, p - 1]
                            best_index[r, p] = best_index[r, p - 1]
                            p -= 1
                        best_dist[r, p] = d
                        best_index[r, p] = j
                        worst = best_dist[r, k - 1]
        out_index[q0:q1] = best_index[:q1 - q0]


def kernel_origin():
    """Where this process got the kernel from, for the Kernel: line."""
    stats = top_k_l1.stats
    if stats.cache_path is None:
        return "compiled; no writable cache folder, so it is compiled again on every run"
    if sum(stats.cache_misses.values()):
        return f"compiled and cached in {stats.cache_path}"
    return f"loaded from the cache in {stats.cache_path}"


def neighbours_numba(x_query, x_train, k, isa=None):
    """The compiled back-end (L1 only); same result as neighbours_numpy."""
    isa = isa or best_isa()
    if list(ISAS).index(isa) < list(ISAS).index(best_isa()):  # LLVM would abort the process
        raise ValueError(f"the CPU numba compiles for has no {isa}; the widest it has is {best_isa()}")
    order = pixel_order(x_train)
    return nearest_rows(row_records(x_query, isa, order), row_records(x_train, isa, order), k)


def ready_kernel(*args):
    """Load or compile top_k_l1 for these arguments, before threads call it. A cache entry that cannot
    be read (a disk that filled up, or a kill, during the save of an earlier run) or saved never fails
    the run: one line says so, the entry is compiled again and replaces it (or, where nothing can be
    saved, the run goes on without the cache)."""
    signature = tuple(numba.typeof(a) for a in args)
    if signature in top_k_l1.overloads:
        return
    try:
        top_k_l1.compile(signature)
        return
    except Exception as e:  # pickle, EOF, OS errors: numba passes on whatever the cache file raised
        if top_k_l1.stats.cache_path is None:
            raise  # no cache: a real compile error
        detail = machine.reason(e, 80) if str(e).strip() else "empty or cut short"
        print(f"warning: the cached k-NN kernel in {top_k_l1.stats.cache_path} could not be used "
              f"({type(e).__name__}: {detail}); compiling it again", file=sys.stderr)
    try:
        top_k_l1._cache.flush()  # numba's index of the cache, emptied: the new entry replaces the old
        top_k_l1.compile(signature)
    except Exception:  # nothing can be saved there (a full disk): compile without the cache
        top_k_l1._cache = numba.core.caching.NullCache()
        top_k_l1.compile(signature)


def nearest_rows(query_rows, train_rows, k, task_rows=4 * QUERY_ROWS):
    """(len(query_rows), k) int32 indices of the nearest training rows; both arguments from row_records.
    The kernel runs on blocks of task_rows test rows, in one thread per core."""
    out = np.empty((len(query_rows), k), dtype=np.int32)
    starts = range(0, len(query_rows), task_rows)
    if len(query_rows):
        ready_kernel(query_rows[:task_rows], train_rows, k, out[:task_rows])
    on_all_cores(lambda i: top_k_l1(query_rows[i:i + task_rows], train_rows, k, out[i:i + task_rows]), starts)
    return out


def vote(neighbour_labels, num_classes=10):
    """Majority label of each row; a tie goes to the smallest label (argmax takes the first)."""
    counts = np.zeros((len(neighbour_labels), num_classes), dtype=np.int32)
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts.argmax(axis=1)


def predict(x_query, x_train, y_train, k=K, metric=METRIC, backend=BACKEND, progress=False):
    """Predicted labels of x_query (n, 28, 28) uint8 from the training set."""
    if backend == "auto":
        backend = "numba" if numba_available() and metric == "l1" else "numpy"
    if backend == "numba" and metric != "l1":
        raise ValueError("the numba back-end computes L1 only; use --backend numpy for l2")
    if not 1 <= k <= len(x_train):
        raise ValueError(f"k must be between 1 and {len(x_train)} (the training images), not {k}")
    if backend == "numba":
        isa, order = best_isa(), pixel_order(x_train)
        train_rows = row_records(x_train, isa, order)  # once, not per chunk: a 50 MB copy
    predictions = np.empty(len(x_query), dtype=np.int64)
    start = time.perf_counter()
    for i in range(0, len(x_query), CHUNK):
        part = x_query[i:i + CHUNK]
        if backend == "numba":
            index = nearest_rows(row_records(part, isa, order), train_rows, k)
        else:
            index = neighbours_numpy(part, x_train, k, metric)
        predictions[i:i + len(part)] = vote(y_train[index])
        if progress:  # one updating line on a terminal, one line per step in a log
            done = i + len(part)
            tty = sys.stderr.isatty()
            print(f"{chr(13) if tty else ''}  {done}/{len(x_query)} test images, "
                  f"{time.perf_counter() - start:.1f} s", end="" if tty and done < len(x_query) else "\n",
                  file=sys.stderr, flush=True)
    return predictions


def main():
    parser = argparse.ArgumentParser(description="Exact k-NN on Fashion-MNIST pixels.")
    parser.add_argument("--k", type=int, default=K, help=f"neighbours that vote (default: {K})")
    parser.add_argument("--metric", choices=("l1", "l2"), default=METRIC, help=f"distance (default: {METRIC})")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N test images (default: all)")
    parser.add_argument("--backend", choices=("auto", "numba", "numpy"), default=BACKEND,
                        help=f"distance kernel (default: {BACKEND}: numba if installed)")
    args = parser.parse_args()
    if not 1 <= args.k <= TRAIN_IMAGES:
        parser.error(f"--k must be between 1 and {TRAIN_IMAGES} (the training images)")
    if args.limit is not None and not 1 <= args.limit <= TEST_IMAGES:
        parser.error(f"--limit must be between 1 and {TEST_IMAGES} (the test images)")
    if args.backend == "numba" and not numba_available():
        parser.error("--backend numba needs numba: pip install -r requirements.txt")
    if args.backend == "numba" and args.metric != "l1":
        parser.error("the numba back-end computes L1 only; use --backend numpy for --metric l2")

    try:
        x_train, y_train = data.load_data("train")
        x_test, y_test = data.load_data("t10k")
    except data.DataError as e:
        sys.exit(f"error: {e}")
    x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    backend = args.backend
    if backend == "auto":
        backend = "numba" if numba_available() and args.metric == "l1" else "numpy"

    if backend == "numba":  # compile, or load from the cache, before the clock starts
        start = time.perf_counter()
        predict(x_test[:1], x_train[:args.k], y_train[:args.k], args.k, args.metric, backend)
        print(f"Kernel: {best_isa()}, {time.perf_counter() - start:.1f} s, {kernel_origin()}")
    start = time.perf_counter()
    predictions = predict(x_test, x_train, y_train, args.k, args.metric, backend, progress=True)
    seconds = time.perf_counter() - start
    accuracy = float((predictions == y_test).mean())
    print(f"Settings: k={args.k} metric={args.metric} backend={backend} test_images={len(x_test)} "
          f"train_images={len(x_train)} cores={os.cpu_count()} cpu={machine.cpu_name()!r}")
    print(data.per_class_accuracy(predictions, y_test))
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Time: {seconds:.1f} s")


if __name__ == "__main__":
    machine.run(main)
