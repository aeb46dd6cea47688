#!/usr/bin/env bash
# Install cots and what it needs on a Debian host. The same script runs in CI and in the
# Dockerfile, so what the tests prove installed is what the images install.
#   deploy/install.sh dev    training + serving + Ray + test tools + Debian galleries (CI, developers)
#   deploy/install.sh train  training, export and index building (torch, CPU wheel)
#   deploy/install.sh serve  serving and indexing only: no torch
#   deploy/install.sh gpu    serving and indexing with onnxruntime-gpu and faiss-gpu
# COTS_WITH_MILVUS=1 adds the `milvus` extra (the local Milvus server of `cots milvus start`, and
# milvus-lite) to serve, gpu or train; dev always has it.
# It installs with the first python3 on PATH (CI: the system's; images: /opt/venv), or, with
# COTS_VENV=DIR, into the virtual environment DIR, created if absent (deploy/quickstart.sh).
set -euo pipefail
profile="${1:-dev}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Quiet on a terminal; in a log, pip's own lines ("Collecting ...", "Installing ...") show
# that it works (a quiet pip left the log silent for 40 s).
pip_verbosity=(-q)
[ -t 1 ] || pip_verbosity=(--progress-bar off)
pip_install() {
  echo "install.sh: pip install $*"
  python3 -m pip install --disable-pip-version-check "${pip_verbosity[@]}" "$@"
}

apt_packages=(libcairo2)
# The zero-shot suites' data (`cots eval-zero-shot`): Fashion-MNIST and two wallpaper sets.
zero_shot=(dataset-fashion-mnist lomiri-wallpapers-16.04 mate-backgrounds)
case "$profile" in
  # podman and the rest: tests/test_image.py builds and runs the images (deploy/build_image.py).
  dev) apt_packages+=(openclipart-svg fonts-noto-color-emoji chromium "${zero_shot[@]}"
                      podman mmdebstrap runc uidmap fuse-overlayfs slirp4netns) ;;
  train) apt_packages+=(openclipart-svg fonts-noto-color-emoji "${zero_shot[@]}") ;;
  serve|gpu) ;;
  *) echo "install.sh: unknown profile '$profile' (dev, train, serve, gpu)" >&2; exit 2 ;;
esac
# Debian's python3 creates virtual environments only with python3-venv.
if [ -n "${COTS_VENV:-}" ] && ! python3 -c "import ensurepip" 2>/dev/null; then apt_packages+=(python3-venv); fi
# Another apt-get (unattended-upgrades, a second install) may hold the package locks: wait for
# it instead of failing. `install` waits through apt's own DPkg::Lock::Timeout; `update` takes
# the lists lock, which that option does not cover in apt 2.6, so it is retried here.
lock_timeout="${COTS_APT_LOCK_TIMEOUT:-600}"
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$lock_timeout" "$@"; }
apt_update() {
  local waited=0 out
  until out="$(apt_get update -qq 2>&1)"; do
    if ! grep -q "Could not get lock" <<<"$out" || [ "$waited" -ge "$lock_timeout" ]; then
      echo "$out" >&2
      return 1
    fi
    [ "$waited" = 0 ] && echo "install.sh: another apt-get holds the package lists; waiting (up to ${lock_timeout}s)"
    sleep 2
    waited=$((waited + 2))
  done
}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]} (if another apt-get holds the dpkg lock, this waits for it, up to ${lock_timeout}s)"
    apt_update
    apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ -n "${COTS_VENV:-}" ]; then
  if [ ! -x "$COTS_VENV/bin/python3" ]; then
    echo "install.sh: creating the virtual environment $COTS_VENV"
    python3 -m venv "$COTS_VENV"
  fi
  PATH="$(cd "$COTS_VENV" && pwd)/bin:$PATH"
fi
editable=()
[ "${COTS_EDITABLE:-1}" = 1 ] && editable=(-e)
case "$profile" in
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  # dev's `dev` extra brings `milvus`: the tests run the backend on a real Milvus server.
  dev) pip_install torch==2.13.0 && pip_install "${editable[@]}" "$here[train,serve,ray,dev]" ;;
  train) pip_install torch==2.13.0 && pip_install "${editable[@]}" "$here[train,serve]" ;;
  serve) pip_install "${editable[@]}" "$here[serve]" ;;
  gpu) pip_install "${editable[@]}" "$here[gpu]" ;;
esac
if [ "${COTS_WITH_MILVUS:-0}" = 1 ]; then pip_install "${editable[@]}" "$here[milvus]"; fi
echo "install.sh: cots installed ($profile) for $(command -v python3)"
