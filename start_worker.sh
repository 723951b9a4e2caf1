#!/usr/bin/env bash
# Installs what is needed and starts a Celery worker that consumes every queue:
# devices (polls, clock commands), processing, crm (delivery). Several workers,
# on one machine or many, share the work through the broker and the database
# (docs/setup.md, "Workers and beat"). A worker for some queues only:
#   WORKER_QUEUES=devices WORKER_CONCURRENCY=8 ./start_worker.sh
. "$(dirname "$0")/scripts/bootstrap.sh"

python manage.py migrate --noinput
exec celery -A attendance_bridge worker --loglevel "${LOG_LEVEL:-INFO}" \
    --concurrency "${WORKER_CONCURRENCY:-2}" --queues "${WORKER_QUEUES:-devices,processing,crm}"
