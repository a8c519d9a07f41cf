#!/usr/bin/env bash
# Set up Cortex and start a node: check build prerequisites, install Cortex into a virtual
# environment, run `cortex init` (identity, hardware, ~/.cortex/config.yaml), then start the node.
#
#   ./install.sh            install, set up ~/.cortex and start a node in the background
#   ./install.sh --demo     install, set up ~/.cortex and run `cortex demo` instead of a node
#   ./install.sh --no-start install and set up ~/.cortex, start nothing
#   ./install.sh --dev      also install the test tools (pytest, hypothesis, mypy)
#   ./install.sh --venv DIR use (or create) the virtual environment at DIR
#
# The home folder is $CORTEX_HOME, else ~/.cortex. The node starts with `docker compose` when
# a Docker engine answers, else natively (pid and log in the home folder); `cortex node stop`
# stops a native node. Running it again changes no file and starts no second node.
set -euo pipefail

cd "$(dirname "$0")"
project_dir=$(pwd)
venv_dir="$project_dir/.venv"
extras=""
start_mode="node"  # node, demo or none

usage() {
    # The comment block at the top of this file, without its "# " marks.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) extras="[dev]" ;;
        --venv)
            [[ $# -ge 2 ]] || { echo "install.sh: --venv needs a directory, for example --venv ~/cortex-venv" >&2; exit 2; }
            venv_dir="$2"
            shift
            ;;
        --no-start) start_mode="none" ;;
        --demo) start_mode="demo" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (run ./install.sh --help)" >&2; exit 2 ;;
    esac
    shift
done
# The script runs from the project folder, so a relative --venv is taken from there. An absolute
# path keeps the cortex commands it prints runnable from any folder.
[[ "$venv_dir" == /* ]] || venv_dir="$PWD/$venv_dir"

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

# Print nothing and succeed when the environment already has this project (editable) and every
# requirement of pyproject.toml (with the dev extra if asked) at a matching version.
installed_check() {
    # -I keeps the current folder off sys.path, because its cortex_inference.egg-info would hide
    # the installed metadata.
    "$venv_dir/bin/python" -I - "$project_dir" "${extras:+dev}" <<'PYTHON' 2>/dev/null
import json, sys, tomllib
from importlib import metadata
from pathlib import Path
from packaging.requirements import Requirement

project, extra = Path(sys.argv[1]), sys.argv[2]
spec = tomllib.loads((project / "pyproject.toml").read_text())["project"]
required = list(spec["dependencies"]) + (spec.get("optional-dependencies", {}).get(extra, []) if extra else [])
origin = json.loads(metadata.distribution(spec["name"]).read_text("direct_url.json") or "{}")
if origin.get("url") != project.resolve().as_uri():
    sys.exit(f"{spec['name']} is installed from {origin.get('url')}, not {project}")
for text in required:
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate():
        if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
            sys.exit(f"{requirement.name} does not match {requirement}")
PYTHON
}

if installed_check; then
    echo "Cortex${extras:+ with test tools} is already installed in $venv_dir; skipping pip"
else
    echo "Installing Cortex${extras:+ with test tools} into $venv_dir (torch 2.13.0, CPU build)"
    # torch is installed first and on its own: a resolver left free to choose pulls a multi-GB CUDA build.
    "$venv_dir/bin/python" -m pip install --quiet --upgrade pip
    "$venv_dir/bin/python" -m pip install --quiet "torch==2.13.0"
    # -qq (pip log level ERROR) hides setuptools' "Editable installation" notice. pip logs it as a
    # warning and has no option that silences only it. Install errors are still printed.
    "$venv_dir/bin/python" -m pip install -qq -e "$project_dir$extras"
fi
cortex="$venv_dir/bin/cortex"

# Identity, hardware and config in the home folder. cortex init names the fix for a folder
# this user may not write (exit status 3) and for an invalid config (exit status 2).
home=$("$venv_dir/bin/python" -c 'from cortex.node.home import cortex_home; print(cortex_home())')
export CORTEX_HOME="$home"
"$cortex" init || exit $?
config="$home/config.yaml"

start_native() {
    local data_dir log pid
    data_dir=$("$venv_dir/bin/python" -c 'import os, sys; from cortex.node.config import load_config; print(load_config(sys.argv[1], os.environ).data_dir)' "$config")
    log="$home/node.log"
    pid=$(cat "$data_dir/node.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "A node already runs from $data_dir (pid $pid); stop it with: $cortex node stop --config $config"
        return 0
    fi
    echo "Starting the node in the background (log: $log); waiting up to 120 s for it to serve"
    rm -f "$data_dir/node.status.json"
    nohup "$cortex" node start --config "$config" >>"$log" 2>&1 </dev/null &
    pid=$!
    # Bounded wait for the node's status file to say it serves, or for the process to exit.
    for _ in $(seq 1 1200); do
        if grep -q '"state": *"serving"' "$data_dir/node.status.json" 2>/dev/null; then
            echo "The node serves (pid $pid). Stop it with: $cortex node stop --config $config"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "install.sh: the node exited at start; the end of $log:" >&2
            tail -n 20 "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "install.sh: the node (pid $pid) does not serve after 120 s; see $log, stop it with: $cortex node stop --config $config" >&2
    return 1
}

# Print the compose command (docker compose, else docker-compose), or nothing if there is none.
compose_command() {
    if docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    fi
}

start_node() {
    if ! command -v docker >/dev/null 2>&1; then
        echo "No Docker found, so the node runs natively."
        start_native
        return
    fi
    local answer
    if answer=$(timeout 30 docker info 2>&1 >/dev/null); then
        local compose
        compose=$(compose_command)
        if [[ -z "$compose" ]]; then
            echo "Docker answers but has no compose plugin (Debian/Ubuntu: sudo apt-get install docker-compose-plugin), so the node runs natively."
            start_native
            return
        fi
        echo "Starting the node with $compose (service node, config $config)"
        # The container runs as this user, so the files it writes in the home folder stay this user's.
        CORTEX_UID=$(id -u) CORTEX_GID=$(id -g) $compose -f "$project_dir/docker-compose.yml" up -d --build node
        echo "Stop it with: $compose -f $project_dir/docker-compose.yml stop node"
        return
    fi
    if grep -qi "permission denied" <<<"$answer"; then
        echo "install.sh: Docker rejected this user ($(id -un)): $answer" >&2
        echo "Run: sudo usermod -aG docker $(id -un)   then log out and back in (or run: newgrp docker), and run ./install.sh again." >&2
        echo "Or start the node without Docker: $cortex node start --config $config" >&2
        return 3
    fi
    echo "No Docker engine answers ($(head -n 1 <<<"$answer")), so the node runs natively."
    start_native
}

case "$start_mode" in
    none)
        echo "Set up without starting a node. Start one with: $cortex node start --config $config (foreground), or run ./install.sh"
        ;;
    demo)
        exec "$cortex" demo
        ;;
    node)
        start_node
        ;;
esac
