#!/usr/bin/env bash
# Installs what is needed and starts Celery Beat, which schedules the periodic jobs.
. "$(dirname "$0")/scripts/bootstrap.sh"

exec celery -A attendance_bridge beat --loglevel "${LOG_LEVEL:-INFO}" --schedule var/celerybeat-schedule
