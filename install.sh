#!/usr/bin/env bash
# Set up Cortex: check build prerequisites, create a virtual environment and
# install the project into it.
#
#   ./install.sh            install Cortex into .venv
#   ./install.sh --dev      also install the test tools (pytest, hypothesis, mypy)
#   ./install.sh --venv DIR use (or create) the virtual environment at DIR
#   ./install.sh --no-start set up without starting a node; this script starts no node yet,
#                           so today every run behaves this way
#
# It can be run again: an existing environment is reused and brought up to date.
set -euo pipefail

cd "$(dirname "$0")"
project_dir=$(pwd)
venv_dir="$project_dir/.venv"
extras=""

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) extras="[dev]" ;;
        --venv)
            [[ $# -ge 2 ]] || { echo "install.sh: --venv needs a directory, for example --venv ~/cortex-venv" >&2; exit 2; }
            venv_dir="$2"
            shift
            ;;
        --no-start) ;;  # Accepted for forward compatibility: this script starts nothing yet.
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (run ./install.sh --help)" >&2; exit 2 ;;
    esac
    shift
done

missing=()

# Python 3.11 or newer, with the venv module.
python_bin=""
for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        python_bin=$(command -v "$candidate")
        break
    fi
done
if [[ -z "$python_bin" ]]; then
    found=$(python3 --version 2>/dev/null || echo "no python3")
    missing+=("Python 3.11 or newer (found: $found). Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv python3.11-dev")
elif [[ ! -d "$venv_dir" ]] && ! "$python_bin" -c 'import ensurepip, venv' 2>/dev/null; then
    version=$("$python_bin" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    missing+=("the venv module for $python_bin. Debian/Ubuntu: sudo apt-get install python${version}-venv")
fi

# A C compiler and the GMP headers: libp2p depends on fastecdsa, which compiles against GMP.
compiler=""
for candidate in cc gcc clang; do
    if command -v "$candidate" >/dev/null 2>&1; then compiler="$candidate"; break; fi
done
if [[ -z "$compiler" ]]; then
    missing+=("a C compiler (libp2p builds fastecdsa from source). Debian/Ubuntu: sudo apt-get install build-essential; Fedora: sudo dnf install gcc")
elif ! printf '#include <gmp.h>\nint main(void){return 0;}\n' | "$compiler" -x c -o /dev/null - -lgmp >/dev/null 2>&1; then
    missing+=("the GMP development files (gmp.h and libgmp). Debian/Ubuntu: sudo apt-get install libgmp-dev; Fedora: sudo dnf install gmp-devel; macOS: brew install gmp")
fi

if [[ ${#missing[@]} -gt 0 ]]; then
    echo "install.sh: missing build prerequisites:" >&2
    for item in "${missing[@]}"; do echo "  - $item" >&2; done
    echo "Install them and run ./install.sh again." >&2
    exit 1
fi

if [[ ! -x "$venv_dir/bin/python" ]]; then
    echo "Creating the virtual environment at $venv_dir"
    "$python_bin" -m venv "$venv_dir"
fi

echo "Installing Cortex${extras:+ with test tools} into $venv_dir (torch 2.13.0, CPU build)"
# torch is installed first and on its own: a resolver left free to choose pulls a multi-GB CUDA build.
"$venv_dir/bin/python" -m pip install --quiet --upgrade pip
"$venv_dir/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv_dir/bin/python" -m pip install --quiet -e "$project_dir$extras"

echo "Cortex is installed. Try: $venv_dir/bin/cortex --help"
