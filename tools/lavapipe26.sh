#!/usr/bin/env bash
# A private Mesa 26 lavapipe (a CPU Vulkan driver with VK_KHR_cooperative_matrix: 8x8x8 f16 x f16 ->
# f16/f32), for testing the cooperative-matrix kernels on a machine without a GPU. Debian 12's Mesa
# (22.3) and its backports (25.0) lack the extension; Debian sid has it, but needs sid's glibc and LLVM,
# so the driver runs with sid's own loader and libraries from a private folder
# (../shared/notes/coop-matrix-on-cpu.md has the measurements).
#
#   bash tools/lavapipe26.sh          # build the folder if absent (about 30 s, ~370 MB); print its path
#   tools/lavapipe26-run PROGRAM ARGS  # run a program under it (building it first if absent)
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/tools/lavapipe26-run" cargo test --release --test coop
#
# The system is never touched: apt runs with a configuration of its own (sources, lists, cache and
# state all inside the folder, no lock on the system's), packages are unpacked with `dpkg -x` into
# the folder, never installed. sid moves, so the package closure is resolved at run time (no names
# or versions are hard-coded but the driver package's). The folder lives under the user's cache
# directory (${XDG_CACHE_HOME:-~/.cache}/sddpm-gpu/lavapipe26, or $SDDPM_LAVAPIPE26) and is reused
# when present; it is built in a temporary folder beside it and renamed when complete, so an
# interrupted build leaves nothing that looks finished.
set -euo pipefail

MIRROR="${SDDPM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DIR="${SDDPM_LAVAPIPE26:-${XDG_CACHE_HOME:-$HOME/.cache}/sddpm-gpu/lavapipe26}"
STAMP="$DIR/complete"

if [ -f "$STAMP" ]; then
    echo "$DIR"
    exit 0
fi

for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || { echo "error: tools/lavapipe26.sh needs $tool (a Debian or Ubuntu host)" >&2; exit 1; }
done
[ "$(dpkg --print-architecture)" = amd64 ] || { echo "error: tools/lavapipe26.sh supports amd64 hosts only" >&2; exit 1; }

mkdir -p "$(dirname "$DIR")"
WORK="$(mktemp -d "$DIR.partial.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/apt/state" "$WORK/debs" "$WORK/root"

# sid's Release file is verified with the host's Debian archive keyring (Debian 12's holds the
# keys sid is signed with as of 2026-12).
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main" >"$WORK/apt/sources.list"
APT=(
    -o "Dir::Etc::SourceList=$WORK/apt/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=/dev/null"
    -o "Dir::State=$WORK/apt/state"
    -o "Dir::State::Lists=$WORK/apt/lists"
    -o "Dir::State::status=/dev/null"
    -o "Dir::Cache=$WORK/apt/cache"
    -o "APT::Architecture=amd64"
    -o "APT::Architectures::=amd64"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=$(id -un)" # files are ours; apt's _apt user cannot enter the folder
)

echo "lavapipe26: resolving Debian sid's mesa-vulkan-drivers ($MIRROR) into $DIR" >&2
apt-get "${APT[@]}" -qq update >&2 || {
    echo "error: apt could not fetch or verify Debian sid's package lists from $MIRROR (a newer debian-archive-keyring, or SDDPM_DEBIAN_MIRROR=<mirror>, may help)" >&2
    exit 1
}
# The dependency closure of the driver and the Vulkan loader (depends and pre-depends only; the
# loader too, so nothing of the host's is mixed in), one package name a line; virtual
# packages (<name>) are provided by a real one the closure also lists.
mapfile -t PKGS < <(apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances mesa-vulkan-drivers libvulkan1 | grep -v '^ ' | grep -v '^<' | sort -u)
[ "${#PKGS[@]}" -gt 5 ] || {
    echo "error: no usable mesa-vulkan-drivers in Debian sid at $MIRROR (resolved: ${PKGS[*]:-nothing}); is the mirror reachable (apt's warnings above)? SDDPM_DEBIAN_MIRROR picks another" >&2
    exit 1
}
echo "lavapipe26: downloading ${#PKGS[@]} packages" >&2
(cd "$WORK/debs" && apt-get "${APT[@]}" -qq download "${PKGS[@]}" >&2)
for deb in "$WORK"/debs/*.deb; do
    dpkg -x "$deb" "$WORK/root"
done

LIB="$WORK/root/usr/lib/x86_64-linux-gnu"
[ -f "$LIB/libvulkan_lvp.so" ] || { echo "error: sid's mesa-vulkan-drivers has no libvulkan_lvp.so" >&2; exit 1; }
[ -e "$LIB/ld-linux-x86-64.so.2" ] || { echo "error: sid's libc6 has no ld-linux-x86-64.so.2" >&2; exit 1; }
MESA="$(dpkg-deb -f "$WORK"/debs/mesa-vulkan-drivers_*.deb Version)"
rm -rf "$WORK/debs" "$WORK/apt"

# The ICD names the driver by its final absolute path (the folder is renamed below).
cat >"$WORK/lvp_icd.json" <<EOF
{
    "file_format_version": "1.0.1",
    "ICD": {
        "library_path": "$DIR/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so",
        "api_version": "1.4.0"
    }
}
EOF
echo "$MESA" >"$WORK/complete"

rm -rf "$DIR"
mv "$WORK" "$DIR"
trap - EXIT
echo "lavapipe26: Mesa $MESA ready ($(du -sh "$DIR" | cut -f1))" >&2
echo "$DIR"
