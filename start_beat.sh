#!/usr/bin/env bash
# Installs what is needed and starts Celery beat, which queues the periodic
# jobs (the schedule is in attendance_bridge/settings.py). Run exactly one for
# the whole installation. Waits for start_server.sh to apply the migrations.
. "$(dirname "$0")/scripts/bootstrap.sh"
. scripts/wait_for_migrations.sh

exec celery -A attendance_bridge beat --loglevel "${LOG_LEVEL:-INFO}"
