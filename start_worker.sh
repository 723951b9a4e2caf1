#!/usr/bin/env bash
# Installs what is needed and starts a Celery worker (polls, processing, CRM delivery).
. "$(dirname "$0")/scripts/bootstrap.sh"

python manage.py migrate --noinput
exec celery -A attendance_bridge worker --loglevel "${LOG_LEVEL:-INFO}" --concurrency "${WORKER_CONCURRENCY:-2}"
