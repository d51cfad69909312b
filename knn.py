"""Baseline: exact k-nearest neighbours on the raw pixels (k=5, Manhattan distance).

Distances are exact integers on the uint8 pixels: the L1 distance of pixels
scaled to [0, 1] is the same number divided by 255, so the neighbours are the
same. Neighbours at equal distance are taken in training-set order, and a tied
vote goes to the smallest label, so the result is deterministic:

    python knn.py            ->  Test accuracy: 0.8623

Two back-ends give the same neighbours bit for bit: "numpy" (the reference)
and "numba" (a compiled kernel that uses the CPU's sum-of-absolute-differences
instruction, `psadbw`, on blocks of test rows against the training set; both
cores). "auto" picks numba when it is installed.
"""

import argparse
import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import data

K = 5  # neighbours that vote
METRIC = "l1"  # l1 (Manhattan, the seed's) or l2 (Euclidean)
BACKEND = "auto"  # auto: numba if it is installed, else numpy
CHUNK = 500  # test images per progress step
PAD = 64  # the kernel reads rows in 64-byte pieces (one AVX-512 register)


def flatten(images):
    """(n, ...) uint8 -> (n, width) C-contiguous uint8: the pixels, zero-padded to a multiple of PAD.

    28x28 images give rows of 832 bytes.

    Padding both sides with zeros adds nothing to any distance.
    """
    pixels = images[0].size if len(images) else 0
    flat = np.zeros((len(images), -(-pixels // PAD) * PAD), dtype=np.uint8)
    flat[:, :pixels] = images.reshape(len(images), pixels)  # a copy: the kernel reads contiguous rows
    return flat


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
    x_query, x_train = x_query.reshape(len(x_query), -1), x_train.reshape(len(x_train), -1)
    if metric == "l2":
        train_sq = (x_train.astype(np.float64) ** 2).sum(axis=1)
        return select(l2_block(x_query, x_train, train_sq), k)
    blocks = [x_query[i:i + rows] for i in range(0, len(x_query), rows)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # NumPy releases the GIL in these loops
        parts = pool.map(lambda block: select(l1_block(block, x_train), k), blocks)
        return np.concatenate(list(parts)) if blocks else np.empty((0, k), np.int32)


def best_isa():
    """The widest instruction set the kernel has a variant for on this CPU."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return "avx512" if features.get("avx512bw") else "avx2" if features.get("avx2") else "portable"


@functools.cache
def numba_kernel(isa, width):
    """Compile the L1 top-k kernel for one instruction set and row width (once per process, seconds).

    isa: "avx512" (64-byte psadbw), "avx2" (32-byte psadbw) or "portable" (plain LLVM IR);
    width: bytes per padded row, a multiple of PAD (a constant, so the row loop is unrolled).
    """
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic

    lanes, psadbw = {
        "avx512": (64, "llvm.x86.avx512.psad.bw.512"),
        "avx2": (32, "llvm.x86.avx2.psad.bw"),
        "portable": (16, None),  # LLVM picks the instructions
    }[isa]
    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    bytes_t = ir.VectorType(i8, lanes)

    def declare(module, name, ret, args):
        if name in module.globals:
            return module.globals[name]
        return ir.Function(module, ir.FunctionType(ret, args), name)

    @intrinsic
    def row_l1(typingctx, a, a_start, b, b_start):
        """sum |a[a_start + p] - b[b_start + p]| for p < width, over uint8 arrays, as int64."""
        def codegen(context, builder, signature, args):
            a_ptr = context.make_array(signature.args[0])(context, builder, args[0]).data
            b_ptr = context.make_array(signature.args[2])(context, builder, args[2]).data
            total = None
            for offset in range(0, width, lanes):
                loads = []
                for ptr, start in ((a_ptr, args[1]), (b_ptr, args[3])):
                    addr = builder.gep(ptr, [builder.add(start, ir.Constant(i64, offset))])
                    loads.append(builder.load(builder.bitcast(addr, bytes_t.as_pointer()), align=1))
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
            vector_t = total.type  # <N x iB>
            reduce = declare(builder.module, f"llvm.vector.reduce.add.v{vector_t.count}i{vector_t.element.width}",
                             vector_t.element, [vector_t])
            result = builder.call(reduce, [total])
            return builder.zext(result, i64) if result.type != i64 else result
        return types.int64(a, a_start, b, b_start), codegen

    rows, tile = 16, 512  # test rows per task; training rows per tile (~420 KB, stays in L2)

    @njit(parallel=True)
    def top_k_l1(x_query, x_train, k, out_index):
        query, train = x_query.ravel(), x_train.ravel()
        n_query, n_train = x_query.shape[0], x_train.shape[0]
        for block in prange((n_query + rows - 1) // rows):
            q0 = block * rows
            q1 = min(q0 + rows, n_query)
            best_dist = np.full((rows, k), np.iinfo(np.int64).max, dtype=np.int64)
            best_index = np.zeros((rows, k), dtype=np.int32)
            for t0 in range(0, n_train, tile):
                for q in range(q0, q1):
                    r = q - q0
                    worst = best_dist[r, k - 1]
                    for j in range(t0, min(t0 + tile, n_train)):
                        d = row_l1(query, q * width, train, j * width)
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

    return top_k_l1


def numba_available():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def neighbours_numba(x_query, x_train, k, isa=None):
    """The compiled back-end (L1 only); same result as neighbours_numpy."""
    out = np.empty((len(x_query), k), dtype=np.int32)
    x_query, x_train = flatten(x_query), flatten(x_train)
    numba_kernel(isa or best_isa(), x_train.shape[1])(x_query, x_train, k, out)
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
    predictions = np.empty(len(x_query), dtype=np.int64)
    start = time.perf_counter()
    for i in range(0, len(x_query), CHUNK):
        part = x_query[i:i + CHUNK]
        if backend == "numba":
            index = neighbours_numba(part, x_train, k)
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
    if args.k < 1:
        parser.error("--k must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
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

    if backend == "numba":  # compile before the clock starts, and say how long it took
        start = time.perf_counter()
        predict(x_test[:1], x_train[:args.k], y_train[:args.k], args.k, args.metric, backend)
        print(f"Compile: {time.perf_counter() - start:.1f} s ({best_isa()} kernel)")
    start = time.perf_counter()
    predictions = predict(x_test, x_train, y_train, args.k, args.metric, backend, progress=True)
    seconds = time.perf_counter() - start
    accuracy = float((predictions == y_test).mean())
    print(f"Settings: k={args.k} metric={args.metric} backend={backend} test_images={len(x_test)} "
          f"train_images={len(x_train)} cores={os.cpu_count()} cpu={data.cpu_name()!r}")
    print(data.per_class_accuracy(predictions, y_test))
    print(f"Test accuracy: {accuracy:.4f}")
    print(f"Time: {seconds:.1f} s")


if __name__ == "__main__":
    main()
