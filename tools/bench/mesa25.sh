#!/usr/bin/env bash
# Runs a command on Mesa 25.0's lavapipe (Debian bookworm-backports) instead of
# the system's Mesa (22.3 on Debian 12), without changing the system: the
# backports packages are downloaded with a private apt configuration (its own
# source list, package lists and cache) and unpacked with `dpkg -x` into a
# private folder; the command then runs with VK_ICD_FILENAMES naming that
# folder's lavapipe ICD and LD_LIBRARY_PATH its libraries.
#
#   tools/bench/mesa25.sh [--fetch-only] [--] COMMAND [ARGS...]
#   tools/bench/mesa25.sh -- cargo run --release -- bench --model assets/models/default --steps 8
#   tools/bench/mesa25.sh -- python3 tools/bench/compare.py --model assets/models/default --steps 8 --iters 1
#
# MOTIF_MESA25_DIR: the private folder (default ~/.cache/motif/mesa25). The
# download happens once; delete the folder to fetch again. Needs apt-get and
# dpkg (Debian 12 or a derivative on amd64) and the Debian mirror reachable.
set -euo pipefail

dir="${MOTIF_MESA25_DIR:-$HOME/.cache/motif/mesa25}"
suite="bookworm-backports"
mirror="${MOTIF_MESA25_MIRROR:-http://deb.debian.org/debian}"
# lavapipe itself, and the libdrm it was built against (newer than bookworm's
# 2.4.114: the driver links symbols of 2.4.121). LLVM 15 and the rest of its
# dependencies are bookworm's own.
packages=(mesa-vulkan-drivers libdrm2 libdrm-amdgpu1)

fetch_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --fetch-only) fetch_only=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
if [ $fetch_only -eq 0 ] && [ $# -eq 0 ]; then
    echo "mesa25.sh: no command given (usage: tools/bench/mesa25.sh [--fetch-only] [--] COMMAND [ARGS...])" >&2
    exit 2
fi
for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || { echo "mesa25.sh: $tool not found (this script needs Debian's apt and dpkg)" >&2; exit 2; }
done

root="$dir/root"
icd="$dir/lvp_icd.json"
if [ ! -f "$icd" ]; then
    apt_dir="$dir/apt"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$dir/debs"
    echo "deb $mirror $suite main" > "$apt_dir/sources.list"
    # Every apt path points into the private folder: the system's source list,
    # package lists and cache stay as they are.
    apt_opts=(
        -o "Dir::Etc::SourceList=$apt_dir/sources.list"
        -o "Dir::Etc::SourceParts=/nonexistent"
        -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=$(id -un)"
    )
    echo "mesa25.sh: fetching the $suite package lists into $apt_dir" >&2
    apt-get "${apt_opts[@]}" update >&2
    debs=()
    for p in "${packages[@]}"; do
        # The candidate from the private lists: the backports version.
        version=$(apt-cache "${apt_opts[@]}" madison "$p" | awk -F'|' -v s="$suite" '$3 ~ s {gsub(/ /, "", $2); print $2; exit}')
        if [ -z "$version" ]; then
            echo "mesa25.sh: $p has no version in $suite ($mirror)" >&2
            exit 1
        fi
        echo "mesa25.sh: downloading $p $version" >&2
        (cd "$dir/debs" && apt-get "${apt_opts[@]}" download "$p=$version" >&2)
    done
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    for deb in "$dir"/debs/*.deb; do
        dpkg -x "$deb" "$root.tmp"
    done
    lib="$root.tmp/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so"
    if [ ! -f "$lib" ]; then
        echo "mesa25.sh: the package has no lavapipe library at ${lib#"$root.tmp"}" >&2
        exit 1
    fi
    rm -rf "$root"
    mv "$root.tmp" "$root"
    # The packaged ICD names the library by its bare name (found on the
    # system's library path, i.e. the old driver): this one names it by path.
    api=$(sed -n 's/.*"api_version": *"\([^"]*\)".*/\1/p' "$root/usr/share/vulkan/icd.d/lvp_icd.json")
    cat > "$icd.tmp" <<EOF
{
    "ICD": {
        "api_version": "${api:-1.3.0}",
        "library_path": "$root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so"
    },
    "file_format_version": "1.0.0"
}
EOF
    mv "$icd.tmp" "$icd"
    echo "mesa25.sh: Mesa 25 lavapipe ready in $root" >&2
fi
[ $fetch_only -eq 1 ] && [ $# -eq 0 ] && exit 0

export VK_ICD_FILENAMES="$icd"
export VK_DRIVER_FILES="$icd"
export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
