#!/usr/bin/env bash
# Installs what is needed and starts a Celery worker on every queue: devices
# (polls), crm (deliveries) and celery (processing, the heartbeat). Run as many
# as you like, on as many machines, sharing one database and one broker
# (docs/setup.md). Waits for start_server.sh to apply the migrations.
#   WORKER_CONCURRENCY=4 WORKER_QUEUES=devices ./start_worker.sh
. "$(dirname "$0")/scripts/bootstrap.sh"
. scripts/wait_for_migrations.sh

exec celery -A attendance_bridge worker \
    --loglevel "${LOG_LEVEL:-INFO}" \
    --concurrency "${WORKER_CONCURRENCY:-2}" \
    --queues "${WORKER_QUEUES:-celery,devices,crm}"
