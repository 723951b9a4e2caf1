# Sourced by the start_*.sh and run_tests.sh scripts: makes sure .venv exists
# with the pinned requirements installed, and that .env exists, then activates
# the virtualenv. Safe to run again; it only installs when requirements change.
#   REQUIREMENTS=requirements-dev.txt . scripts/bootstrap.sh

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

REQUIREMENTS="${REQUIREMENTS:-requirements.txt}"

find_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Attendance Bridge needs Python 3.11 or newer; none was found on PATH (set PYTHON=/path/to/python3)." >&2
    return 1
}

# True when a stamp file exists and no requirements file changed after it.
installed() {
    [ -f "$1" ] && [ -z "$(find requirements*.txt -newer "$1" 2>/dev/null)" ]
}
stamp=".venv/.installed-$(basename "$REQUIREMENTS")"
# The test requirements include the runtime ones: having those is enough.
ready() {
    [ -x .venv/bin/python ] && { installed "$stamp" || installed .venv/.installed-requirements-dev.txt; }
}

if ! ready || [ ! -f .env ]; then
    # Web, worker and beat may start together (systemd after an upgrade): one
    # installs, the others wait for it and then find everything in place.
    if command -v flock >/dev/null 2>&1; then
        exec {bootstrap_lock}>.bootstrap.lock
        flock "$bootstrap_lock"
    fi
    if [ ! -x .venv/bin/python ]; then
        PY="$(find_python)"
        echo "Creating virtualenv .venv with $PY"
        "$PY" -m venv .venv
    fi
    if ! ready; then
        echo "Installing $REQUIREMENTS into .venv"
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -r "$REQUIREMENTS"
        touch "$stamp"
    fi
    if [ ! -f .env ]; then
        echo "Creating .env from .env.example with a fresh SECRET_KEY"
        key="$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))')"
        # Whole or not at all: another process may read it any moment.
        sed "s|^SECRET_KEY=.*|SECRET_KEY=$key|" .env.example > .env.new
        mv .env.new .env
    fi
    if [ -n "${bootstrap_lock:-}" ]; then
        exec {bootstrap_lock}>&-
    fi
fi

# shellcheck disable=SC1091
. .venv/bin/activate
