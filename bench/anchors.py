#!/usr/bin/python3
"""Python dogpile.cache anchors for the in-process paths of bench/.

    /usr/bin/python3 bench/anchors.py memory_hit|memory_miss [iterations] [repetitions]

Prints one number: the median, over the repetitions, of nanoseconds per
operation. Runs against Debian's python3-dogpile.cache (1.1.8), which is why
it must be /usr/bin/python3 and not a pyenv interpreter.

- memory_hit: region.get_or_create(key, creator) on a "dogpile.cache.memory"
  region with an expiration_time, every key present (1000 keys in turn); the
  creator raises, so a miss would show.
- memory_miss: region.get_or_create on keys that are missing (each key used
  once), with a creator that returns a constant: the engine's work on a miss
  (lock, creator call, store).

BENCH_QUICK=1 in the environment makes the counts small (a rough number in
well under a second).
"""
import os
import statistics
import sys
import time

from dogpile.cache import make_region

QUICK = os.environ.get("BENCH_QUICK") == "1"
NKEYS = 1000


def never():
    raise RuntimeError("bench: the creator ran, so get_or_create was not a hit")


def constant():
    return 1


def memory_hit(n, reps):
    region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
    keys = ["key:%d" % i for i in range(NKEYS)]
    for i, k in enumerate(keys):
        region.set(k, i)
    get_or_create = region.get_or_create
    times = []
    for r in range(reps + 1):  # the first run warms up
        t0 = time.perf_counter_ns()
        acc = 0
        for i in range(n):
            acc += get_or_create(keys[i % NKEYS], never)
        t1 = time.perf_counter_ns()
        if r:
            times.append((t1 - t0) / n)
    return statistics.median(times)


def memory_miss(n, reps):
    region = make_region().configure("dogpile.cache.memory", expiration_time=3600)
    get_or_create = region.get_or_create
    times = []
    for r in range(reps + 1):
        keys = ["miss:%d:%d" % (r, i) for i in range(n)]
        t0 = time.perf_counter_ns()
        for k in keys:
            get_or_create(k, constant)
        t1 = time.perf_counter_ns()
        # Drop what was created, so that every repetition starts from the
        # same size of dict (outside the timed part).
        region.backend._cache.clear()
        if r:
            times.append((t1 - t0) / n)
    return statistics.median(times)


CASES = {"memory_hit": (memory_hit, 100000), "memory_miss": (memory_miss, 20000)}


def main(argv):
    if len(argv) < 2 or argv[1] not in CASES:
        sys.stderr.write("usage: anchors.py {%s} [iterations] [repetitions]\n"
                         % "|".join(sorted(CASES)))
        return 2
    fn, n = CASES[argv[1]]
    if QUICK:
        n = max(1, n // 25)
    n = int(float(argv[2])) if len(argv) > 2 else n
    reps = int(argv[3]) if len(argv) > 3 else (3 if QUICK else 7)
    print("%.1f" % fn(n, reps))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
