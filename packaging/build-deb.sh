#!/usr/bin/env bash
# Build the Debian package: stage the sources with packaging/debian as debian/, then
# dpkg-buildpackage -b. `make deb` runs this; so does tests/test_deb.py.
#
#   packaging/build-deb.sh [--flavour cpu|openvino|cuda|jetson] [--version DEBIAN_VERSION]
#                          [--build-dir DIR] [--dist DIR]
#
# --version rebuilds under another Debian version (a changelog entry is added to the staged
# copy). The .deb lands in --dist (default dist/); the staged tree in --build-dir (default
# build/deb). UV names the uv to use (default: .tools/uv/bin/uv, then uv on PATH); UV_OFFLINE=1
# builds from uv's cache alone.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
flavour=cpu
version=
build_dir=$repo/build/deb
dist=$repo/dist

while [ $# -gt 0 ]; do
    case "$1" in
    --flavour) flavour=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --build-dir) build_dir=$(realpath -m "$2"); shift 2 ;;
    --dist) dist=$(realpath -m "$2"); shift 2 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

case "$flavour" in
cpu) profile= ;;
openvino | cuda | jetson) profile=pkg.edge-model-agent.$flavour ;;
*) echo "build-deb.sh: unknown flavour $flavour (cpu, openvino, cuda, jetson)" >&2; exit 2 ;;
esac

if [ -z "${UV:-}" ]; then
    if [ -x "$repo/.tools/uv/bin/uv" ]; then
        UV=$repo/.tools/uv/bin/uv
    elif ! UV=$(command -v uv); then
        echo "build-deb.sh: no uv (make deb installs the pinned one into .tools/)" >&2
        exit 2
    fi
fi
UV=$(realpath "$UV")
UV_CACHE_DIR=$("$UV" cache dir)
export UV UV_CACHE_DIR

# The package's upstream version is the agent's; the changelog must agree.
upstream=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/agent/__init__.py")
logged=$(dpkg-parsechangelog -l "$repo/packaging/debian/changelog" -S Version)
if [ "${logged%-*}" != "$upstream" ]; then
    echo "build-deb.sh: packaging/debian/changelog is at $logged, the agent at $upstream" >&2
    exit 2
fi

# The sources the package is made of, as they are in the working tree.
src=$build_dir/edge-model-agent-$upstream
rm -rf "$src" "$build_dir"/edge-model-agent*_*.deb "$build_dir"/edge-model-agent_*.changes \
    "$build_dir"/edge-model-agent_*.buildinfo
mkdir -p "$src" "$dist"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    pyproject.toml uv.lock README.md agent config systemd | tar -C "$src" -xf -
cp -a "$repo/packaging/debian" "$src/debian"

if [ -n "$version" ] && [ "$version" != "$logged" ]; then
    maintainer=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)
    {
        printf 'edge-model-agent (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * Rebuild of %s.\n\n' "$logged"
        printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
        cat "$repo/packaging/debian/changelog"
    } >"$src/debian/changelog"
fi

(
    cd "$src"
    dpkg-buildpackage -b -us -uc ${profile:+-P"$profile"}
)
for deb in "$build_dir"/*.deb; do
    mv "$deb" "$dist/"
    echo "$dist/$(basename "$deb")"
done
