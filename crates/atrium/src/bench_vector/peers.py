# hnswlib and faiss-cpu HNSW on the same split `atrium bench vector` uses:
# M=16, ef_construction=200, one thread, cosine (inner product on unit
# vectors for faiss). Prints one JSON object per line.
import json, resource, sys, time
import numpy as np

d, base_path, query_path, truth_path, efs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
dim = int(d)
base = np.fromfile(base_path, dtype=np.float32).reshape(-1, dim)
queries = np.fromfile(query_path, dtype=np.float32).reshape(-1, dim)
truth = np.fromfile(truth_path, dtype=np.uint32).reshape(-1, 10)
efs = [int(e) for e in efs.split(",")]
base /= np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-30)
queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def recall(found):
    hits = sum(len(set(map(int, f)) & set(map(int, t))) for f, t in zip(found, truth))
    return hits / (10 * len(truth))


def report(lib, build_s, grown, rows):
    print(json.dumps({"library": lib, "build_seconds": build_s,
                      "bytes_per_vector": grown / len(base), "sweep": rows}), flush=True)


import hnswlib
before = rss_bytes()
t = time.perf_counter()
index = hnswlib.Index(space="ip", dim=dim)
index.init_index(max_elements=len(base), M=16, ef_construction=200, random_seed=100)
index.set_num_threads(1)
index.add_items(base, np.arange(len(base)), num_threads=1)
build = time.perf_counter() - t
grown = rss_bytes() - before
rows = []
for ef in efs:
    index.set_ef(ef)
    t = time.perf_counter()
    labels, _ = index.knn_query(queries, k=10, num_threads=1)
    secs = time.perf_counter() - t
    rows.append({"ef": ef, "recall": recall(labels), "qps": len(queries) / secs})
report("hnswlib 0.8.0", build, grown, rows)
del index

import faiss
faiss.omp_set_num_threads(1)
before = rss_bytes()
t = time.perf_counter()
index = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_INNER_PRODUCT)
index.hnsw.efConstruction = 200
index.add(base)
build = time.perf_counter() - t
grown = rss_bytes() - before
rows = []
for ef in efs:
    index.hnsw.efSearch = ef
    t = time.perf_counter()
    _, found = index.search(queries, 10)
    secs = time.perf_counter() - t
    rows.append({"ef": ef, "recall": recall(found), "qps": len(queries) / secs})
report("faiss-cpu 1.15.1", build, grown, rows)
