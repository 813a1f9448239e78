#!/usr/bin/env bash
# Installs the Debian packages that carry offline datasets (Fashion-MNIST, the King James Bible).
# Skips quietly what is already there; warns (does not fail) where apt-get is unavailable.
set -u
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
command -v bible >/dev/null 2>&1 || missing+=(bible-kjv-text)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo"
if command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
    || echo "WARNING: could not install ${missing[*]}; `make data` will say what is missing." >&2
else
  echo "WARNING: apt-get not found; install ${missing[*]} by hand or let TFDS download the data." >&2
fi
exit 0
