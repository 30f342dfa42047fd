# Shared by .ci/quickstart and .ci/test: install what is missing, build, stage.
# Safe to run twice: installs only missing packages, reconfigures in place.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/_build

# Debian 12 packages. luajit2 is OpenResty's LuaJIT; Debian's plain `luajit`
# conflicts with it and must not be used.
BUILD_PKGS="build-essential pkg-config meson ninja-build luajit2 libluajit2-5.1-dev
  lua-busted lua-resty-lrucache libuv1-dev libhiredis-dev liblmdb-dev libmemcached-dev
  luarocks lua-ldoc lua-discount"
TEST_PKGS="redis-server memcached nginx-extras curl clang libclang-rt-14-dev valgrind chromium
  lua-cosmo python3 python3-dogpile.cache python3-redis python3-pymemcache python3-memcache"

install_deps() {
    local missing=() p
    for p in $*; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# build NAME [meson options...]: builds into _build/NAME, installs into
# _build/NAME-stage, the prefix the tests and the quickstart run from.
build() {
    local name=$1
    shift
    local dir=$BUILD/$name stage=$BUILD/$name-stage
    if [ -f "$dir/build.ninja" ]; then
        meson configure "$dir" "$@" >/dev/null
    else
        meson setup "$dir" --prefix="$stage" "$@" >/dev/null
    fi
    ninja -C "$dir" >/dev/null
    meson install -C "$dir" --quiet >/dev/null
}

# use_stage NAME: point LuaJIT at the modules installed by `build NAME`.
use_stage() {
    local stage=$BUILD/$1-stage
    export DP_STAGE=$1   # read by .busted
    export LUA_PATH="$stage/share/lua/5.1/?.lua;$ROOT/spec/?.lua;;"
    export LUA_CPATH="$stage/lib/lua/5.1/?.so;;"
}

# -- Servers for the tests ----------------------------------------------------
# free_port: prints a loopback TCP port nobody listens on. Every server port
# of the tests and benches is below Linux's ephemeral range (32768-60999):
# a port in it can be a client socket's own, and a client reconnecting to a
# stopped server's port can even connect to itself, so the restarted server
# cannot bind it. The cluster fixture keeps its bus ports (+10000) below too.
free_port() {
    local port
    while :; do
        port=$((20000 + RANDOM % 12000))
        (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "$port"; return; }
    done
}

# wait_port PORT [SECONDS]: waits until 127.0.0.1:PORT accepts connections.
wait_port() {
    local port=$1 tries=$(( ${2:-10} * 20 ))
    while [ "$tries" -gt 0 ]; do
        (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
        sleep 0.05
        tries=$((tries - 1))
    done
    return 1
}
