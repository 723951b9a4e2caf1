#!/usr/bin/env bash
# Installs what is needed and starts Celery beat, which queues the periodic
# jobs (the schedule is in attendance_bridge/settings.py) on the broker. Run
# exactly one for the whole installation. Beat never touches the database, so
# it needs no migrations; it keeps its own state in VAR_DIR/celerybeat-schedule.
. "$(dirname "$0")/scripts/bootstrap.sh"

exec celery -A attendance_bridge beat --loglevel "${LOG_LEVEL:-INFO}"
