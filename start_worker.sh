#!/usr/bin/env bash
# Installs what is needed and starts a Celery worker. Run as many as you like,
# on as many machines, sharing one database and one broker (docs/setup.md).
# Without WORKER_QUEUES it takes tasks from every queue the settings declare;
# WORKER_QUEUES=devices gives it those only. Waits for start_server.sh to
# apply the migrations rather than apply them itself.
#   WORKER_CONCURRENCY=4 WORKER_QUEUES=devices ./start_worker.sh
. "$(dirname "$0")/scripts/bootstrap.sh"
. scripts/wait_for_migrations.sh

exec celery -A attendance_bridge worker \
    --loglevel "${LOG_LEVEL:-INFO}" \
    --concurrency "${WORKER_CONCURRENCY:-2}" \
    ${WORKER_QUEUES:+--queues "$WORKER_QUEUES"}
