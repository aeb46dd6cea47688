#!/usr/bin/env bash
# Install cots and what it needs on a Debian host. The same script runs in CI and in the
# Dockerfile, so what the tests prove installed is what the images install.
#   deploy/install.sh dev    training + serving + Ray + test tools + Debian galleries (CI, developers)
#   deploy/install.sh train  training, export and index building (torch, CPU wheel)
#   deploy/install.sh serve  serving and indexing only: no torch
#   deploy/install.sh gpu    serving and indexing with onnxruntime-gpu and faiss-gpu
set -euo pipefail
profile="${1:-dev}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pip_install() { python3 -m pip install --disable-pip-version-check -q "$@"; }

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
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

editable=()
[ "${COTS_EDITABLE:-1}" = 1 ] && editable=(-e)
case "$profile" in
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  dev) pip_install torch==2.13.0 && pip_install "${editable[@]}" "$here[train,serve,ray,dev]" ;;
  train) pip_install torch==2.13.0 && pip_install "${editable[@]}" "$here[train,serve]" ;;
  serve) pip_install "${editable[@]}" "$here[serve]" ;;
  gpu) pip_install "${editable[@]}" "$here[gpu]" ;;
esac
echo "install.sh: cots installed ($profile)"
