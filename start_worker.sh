#!/usr/bin/env bash
# Installs what is needed and starts a Celery worker. No tasks are defined yet:
# polls and processing run through manage.py commands and the admin.
. "$(dirname "$0")/scripts/bootstrap.sh"

python manage.py migrate --noinput
exec celery -A attendance_bridge worker --loglevel "${LOG_LEVEL:-INFO}" --concurrency "${WORKER_CONCURRENCY:-2}"
