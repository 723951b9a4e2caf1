#!/usr/bin/env bash
# Installs what is needed and starts Celery Beat. No periodic jobs are scheduled
# yet: polls and processing run through manage.py commands and the admin.
. "$(dirname "$0")/scripts/bootstrap.sh"

exec celery -A attendance_bridge beat --loglevel "${LOG_LEVEL:-INFO}" --schedule var/celerybeat-schedule
