#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 for jaxlab's virtual environment (JAX 0.11 and later need
# it): $PYTHON if set, else python3.12, python3.13 or python3 on the PATH, else an interpreter
# installed by pyenv. Prints one line saying what to install, and exits 1, if there is none.
set -euo pipefail

recent_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

if [[ -n "${PYTHON:-}" ]]; then
  if recent_enough "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a Python >= 3.12 (JAX 0.11 and later need it); unset it or point it at python3.12." >&2
  exit 1
fi
for name in python3.12 python3.13 python3; do
  path="$(command -v "$name" 2>/dev/null)" || continue
  if recent_enough "$path"; then echo "$path"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  root="$(pyenv root)"
  # Oldest first among 3.12+, so 3.12 (what the GPU images run) is preferred to 3.13.
  for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.[0-9]+\.[0-9]+$' | sort -V); do
    path="$root/versions/$version/bin/python3"
    if [[ -x "$path" ]] && recent_enough "$path"; then echo "$path"; exit 0; fi
  done
fi
echo "jaxlab needs Python >= 3.12 (JAX 0.11 and later dropped 3.11): install it (apt-get install python3.12-venv, or pyenv install 3.12) or pass PYTHON=/path/to/python3.12 to make." >&2
exit 1
