#!/usr/bin/env bash
# Memory-check the C planner: build native/src/*.c with the C test driver
# native/tests/test_planner.c (every C entry point, error paths included) and run it
#   1. under AddressSanitizer + UndefinedBehaviorSanitizer with leak detection, and
#   2. under valgrind memcheck (--leak-check=full), when valgrind is installed.
# Fails (exit 1) on any check failure, sanitizer report, memcheck error or leak.
# Usage: scripts/check-native.sh [--asan-only | --valgrind-only]
set -euo pipefail
cd "$(dirname "$0")/.."

CC=${CC:-cc}
mode=${1:-all}
case "$mode" in
    all | --asan-only | --valgrind-only) ;;
    *) echo "usage: $0 [--asan-only | --valgrind-only]" >&2; exit 2 ;;
esac
if ! command -v "$CC" >/dev/null 2>&1; then
    echo "check-native: no C compiler ($CC)" >&2
    exit 3
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sources=(native/src/*.c native/tests/test_planner.c)
common=(-std=c11 -g -Wall -Wextra -Inative/include -Inative/src)
ran=0

if [[ $mode != --valgrind-only ]]; then
    echo "check-native: AddressSanitizer + UBSan"
    "$CC" "${common[@]}" -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
        "${sources[@]}" -lm -o "$work/test_asan"
    ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "$work/test_asan"
    ran=1
fi

if [[ $mode != --asan-only ]]; then
    if command -v valgrind >/dev/null 2>&1; then
        echo "check-native: valgrind memcheck"
        "$CC" "${common[@]}" -O1 "${sources[@]}" -lm -o "$work/test_plain"
        valgrind --quiet --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all --error-exitcode=1 \
            "$work/test_plain"
        ran=1
    elif [[ $mode == --valgrind-only ]]; then
        echo "check-native: valgrind is not installed" >&2
        exit 3
    fi
fi

[[ $ran == 1 ]] && echo "check-native: OK"
