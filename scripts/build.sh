#!/usr/bin/env bash
# Configures and builds one flavour into build/<flavour>.
#   release  g++, -O2, -Wall -Wextra -Werror (what ships)
#   asan     g++, AddressSanitizer + UndefinedBehaviorSanitizer (no -Werror: GCC 12 warns falsely)
#   tsan     clang, ThreadSanitizer, -Wthread-safety -Werror
# Extra arguments are ninja targets (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:?usage: build.sh release|asan|tsan [targets...]}
shift

export CCACHE_BASEDIR=$PWD
export CCACHE_NOHASHDIR=1
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-8G}

case $flavour in
  release) args=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=g++) ;;
  asan) args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=g++ -DTB_SANITIZE=address
              -DTB_WERROR=OFF) ;;
  tsan) args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ -DTB_SANITIZE=thread
              -DTB_THREAD_SAFETY=ON) ;;
  *) echo "build.sh: unknown flavour '$flavour' (release, asan, tsan)" >&2; exit 2 ;;
esac

cmake -S . -B "build/$flavour" -G Ninja "${args[@]}" >/dev/null
ninja -C "build/$flavour" "$@"
