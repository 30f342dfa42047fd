#!/usr/bin/python3
"""Python anchors for bench/redis.lua, bench/memcached.lua and bench/lmdb.lua.

Run with Debian's interpreter (the packages come from Debian:
python3-dogpile.cache, python3-redis, python3-pymemcache, python3-lmdb):

    /usr/bin/python3 bench/servers_anchors.py redis PORT [n=20000] [nkeys=1000] [value_bytes=100] [reps=5]
    /usr/bin/python3 bench/servers_anchors.py memcached PORT [n] [nkeys] [value_bytes] [reps]
    /usr/bin/python3 bench/servers_anchors.py lmdb [n=200000] [nkeys=1000] [value_bytes=100] [reps=5]

Each prints "name ns_per_call" lines, the median of `reps` runs of n calls
after one warm-up run, every call a hit (a miss aborts):

  redis      dogpile_get         dogpile.cache region on dogpile.cache.redis
                                 (redis-py, one connection), region.get of a
                                 str of value_bytes characters
             redis_py_get        redis-py client.get, the same keys
  memcached  get                 pymemcache Client.get (bytes in, bytes out)
             get_many100         pymemcache Client.get_many of 100 keys (per call)
  lmdb       get                 python3-lmdb, one read transaction per get
                                 (env.begin() ... txn.get), a directory
                                 environment like dogpile.cache.lmdb's

The Lua benchmarks run this script pinned like themselves (an inherited CPU
affinity), so "client and server on one CPU" holds for the anchors too.
"""
import shutil
import statistics
import sys
import tempfile
import time


def measure(fn, n, reps):
    fn(n)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn(n)
        ts.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(ts)


def emit(name, ns):
    print("%s %.1f" % (name, ns), flush=True)


def ints(args, defaults):
    return [int(float(a)) for a in args] + defaults[len(args):]


def bench_redis(port, n, nkeys, vbytes, reps):
    from dogpile.cache import make_region

    region = make_region().configure(
        "dogpile.cache.redis",
        arguments={"host": "127.0.0.1", "port": port, "db": 0},
    )
    keys = ["pyanchor:dogpile:%d" % i for i in range(nkeys)]
    value = "x" * vbytes
    for k in keys:
        region.set(k, value)
    get = region.get

    def loop_fast(count):
        for i in range(count):
            v = get(keys[i % nkeys])
        if v != value:
            raise SystemExit("dogpile get: not a hit")

    emit("dogpile_get", measure(loop_fast, n, reps))

    client = region.backend.writer_client
    raw = ["pyanchor:raw:%d" % i for i in range(nkeys)]
    for k in raw:
        client.set(k, value)
    cget = client.get

    def loop_raw(count):
        for i in range(count):
            v = cget(raw[i % nkeys])
        if v is None:
            raise SystemExit("redis-py get: not a hit")

    emit("redis_py_get", measure(loop_raw, n, reps))
    client.delete(*keys)
    client.delete(*raw)


def bench_memcached(port, n, nkeys, vbytes, reps):
    from pymemcache.client.base import Client

    c = Client(("127.0.0.1", port), no_delay=True)
    keys = ["pyanchor:%d" % i for i in range(nkeys)]
    value = b"x" * vbytes
    for k in keys:
        c.set(k, value)
    get = c.get

    def loop(count):
        for i in range(count):
            v = get(keys[i % nkeys])
        if v is None:
            raise SystemExit("pymemcache get: not a hit")

    emit("get", measure(loop, n, reps))
    batches = [keys[j:j + 100] for j in range(0, nkeys - 99, 100)]
    many = c.get_many

    def loop_many(count):
        for i in range(count):
            got = many(batches[i % len(batches)])
        if len(got) != 100:
            raise SystemExit("pymemcache get_many: not all hits")

    emit("get_many100", measure(loop_many, max(1, n // 20), reps))


def bench_lmdb(n, nkeys, vbytes, reps):
    import lmdb

    d = tempfile.mkdtemp(prefix="dogpile-anchor-lmdb-")
    try:
        env = lmdb.open(d, map_size=64 << 20, sync=False, metasync=False,
                        readahead=False, lock=True)
        keys = [b"vbench:key:%d" % (i + 1) for i in range(nkeys)]
        value = bytes(16) + b"x" * vbytes
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value)
        begin = env.begin

        def loop(count):
            for i in range(count):
                with begin() as txn:
                    v = txn.get(keys[i % nkeys])
            if v is None:
                raise SystemExit("lmdb get: not a hit")

        emit("get", measure(loop, n, reps))
        env.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv):
    if len(argv) < 2 or argv[1] not in ("redis", "memcached", "lmdb"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "lmdb":
        bench_lmdb(*ints(argv[2:], [200000, 1000, 100, 5]))
        return 0
    port = int(argv[2])
    n, nkeys, vbytes, reps = ints(argv[3:], [20000, 1000, 100, 5])
    if argv[1] == "redis":
        bench_redis(port, n, nkeys, vbytes, reps)
    else:
        bench_memcached(port, n, nkeys, vbytes, reps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
