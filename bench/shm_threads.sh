#!/bin/sh
# Build bench/shm_threads.c against a staged install and run it: hit
# throughput of one shared_memory instance from 1, 2 and 4 threads.
#
#   bench/shm_threads.sh [seconds=1] [keys=10000] [value_bytes=100] [threads=1,2,4] [reps=3]
#                        [max_items=2*keys]
#
# With no arguments and BENCH_QUICK=1 (bench/run --quick) it runs
# `0.1 10000 100 1,2 3` (about 4 s). It ends with ROW lines for bench/run:
# "shared_memory hit throughput, 2 threads vs 1" (target >=1.9), the 90/10
# read/write mix (target >=1.5) and the
# private ceiling (reference).
#
# STAGE picks the install (default: $DP_STAGE_DIR, set by bench/run, else
# _build/main-stage, made by .ci/lib.sh's `build main`); CC and CFLAGS may be
# overridden (CFLAGS="-O2 -fsanitize=thread" with STAGE=_build/tsan-stage runs
# it under ThreadSanitizer). A max_items below the key count makes writes
# evict, across the eviction stripes, while the other threads read:
#   STAGE=_build/tsan-stage CFLAGS="-O1 -g -fsanitize=thread" \
#       bench/shm_threads.sh 0.2 200000 100 1,2,4 1 50000
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${STAGE:-${DP_STAGE_DIR:-$ROOT/_build/main-stage}}
if [ $# -eq 0 ] && [ "${BENCH_QUICK:-}" = 1 ]; then
    set -- 0.1 10000 100 1,2 3
fi
CC=${CC:-cc}
CFLAGS=${CFLAGS:-"-O2 -g"}

PCDIR=$(dirname "$(find "$STAGE/lib" -name dogpile.pc | head -n 1)")
[ -d "$PCDIR" ] || { echo "shm_threads.sh: no dogpile.pc under $STAGE (build it first)" >&2; exit 1; }
LIBDIR=$(PKG_CONFIG_PATH=$PCDIR pkg-config --variable=libdir dogpile)

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT INT TERM

# shellcheck disable=SC2046,SC2086
$CC -std=c11 $CFLAGS -Wall -Wextra -o "$OUT/shm_threads" "$ROOT/bench/shm_threads.c" \
    $(PKG_CONFIG_PATH=$PCDIR pkg-config --cflags dogpile luajit) \
    -L"$LIBDIR" -Wl,-rpath,"$LIBDIR" -ldogpile \
    $(pkg-config --libs luajit) -lpthread

# The program registers the backend by requiring its Lua module, as a host does.
LUA_CPATH="$STAGE/lib/lua/5.1/?.so;;" "$OUT/shm_threads" "$@"
