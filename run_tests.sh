#!/usr/bin/env bash
# Installs what is needed (with the test tools) and runs the whole test suite.
# Uses PostgreSQL when DATABASE_URL is set, SQLite otherwise. Extra arguments
# go to pytest:  ./run_tests.sh -k emulator
REQUIREMENTS=requirements-dev.txt . "$(dirname "$0")/scripts/bootstrap.sh"

exec python -m pytest "$@"
