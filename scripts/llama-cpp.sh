#!/bin/sh
# Installs llama-cpp-python 0.3.36 (built from source for this CPU, ~10 min
# on 2 cores) into a virtual environment in the model cache's parent, where
# `atrium bench engine` looks for the llama.cpp peer. Prints the python path.
set -eu
venv="${XDG_CACHE_HOME:-$HOME/.cache}/atrium/llama-cpp"
if ! "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    command -v cmake >/dev/null && command -v c++ >/dev/null \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++ python3-venv >&2
    python3 -m venv "$venv"
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install -q --no-cache-dir \
        'llama-cpp-python==0.3.36' >&2
fi
echo "$venv/bin/python"
