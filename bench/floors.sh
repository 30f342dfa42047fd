#!/usr/bin/env bash
# Build the C floors that bench/redis.lua and bench/lmdb.lua compare against:
#   floor_hiredis  (bench/floor_hiredis.c, Debian's libhiredis-dev)
#   floor_lmdb     (bench/floor_lmdb.c, Debian's liblmdb-dev)
#
#   bench/floors.sh [dir]        (bash)
#
# dir: where the binaries go (default: $BENCH_FLOORS_DIR, else
# _build/bench-floors in the repository). A floor is rebuilt only when its
# source is newer than the binary; the build goes to a temporary name first,
# so a reader never sees half a binary. Prints the directory. CC and CFLAGS
# may be overridden (default: cc -O2).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-${BENCH_FLOORS_DIR:-$ROOT/_build/bench-floors}}
CC=${CC:-cc}
CFLAGS=${CFLAGS:-"-O2 -g"}
mkdir -p "$DIR"

build() { # name libs...
    name=$1
    shift
    src=$ROOT/bench/$name.c
    bin=$DIR/$name
    if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
        # shellcheck disable=SC2086
        $CC -std=gnu11 $CFLAGS -Wall -Wextra -o "$bin.tmp.$$" "$src" "$@"
        mv -f "$bin.tmp.$$" "$bin"
    fi
}

build floor_hiredis -lhiredis
build floor_lmdb -llmdb
echo "$DIR"
