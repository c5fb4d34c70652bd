#!/bin/sh
# Writes hubmsg.pc for this checkout, so that `pkg-config --cflags --libs hubmsg` finds
# include/hubmsg.h and libhubmsg.so / libhubmsg.a.
#
#   ffi/pkgconfig.sh [LIBDIR [OUTDIR]]
#     LIBDIR  where libhubmsg.so is (default: target/release, after `cargo build --release -p hubmsg-ffi`)
#     OUTDIR  where hubmsg.pc goes  (default: LIBDIR/pkgconfig)
#   then: export PKG_CONFIG_PATH=OUTDIR
#
# For an installed copy (e.g. a firmware sysroot) run it with LIBDIR set to the installed library
# directory and copy include/hubmsg.h next to it, or edit includedir in the result.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
libdir=$(cd "${1:-$root/target/release}" && pwd)
out=${2:-$libdir/pkgconfig}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
mkdir -p "$out"
sed -e "s|@INCLUDEDIR@|$root/include|" -e "s|@LIBDIR@|$libdir|" -e "s|@VERSION@|$version|" \
    "$root/ffi/hubmsg.pc.in" > "$out/hubmsg.pc"
echo "$out/hubmsg.pc"
