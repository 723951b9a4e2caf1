#!/usr/bin/env bash
# Installs what is needed and starts Celery beat, which queues the periodic
# jobs of settings.CELERY_BEAT_SCHEDULE (polls, processing, delivery, retries,
# the daily cleanup). Run exactly one beat for the whole installation.
. "$(dirname "$0")/scripts/bootstrap.sh"

exec celery -A attendance_bridge beat --loglevel "${LOG_LEVEL:-INFO}" --schedule var/celerybeat-schedule
