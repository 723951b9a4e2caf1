# Sourced by start_worker.sh: waits until the database answers
# and has every migration applied (start_server.sh applies them), so that a
# worker started beside the server, or before it, does not run on old tables.
#   MIGRATIONS_WAIT_SECONDS=300 (default)
waited=0
limit="${MIGRATIONS_WAIT_SECONDS:-300}"
until python manage.py migrate --check >/dev/null 2>&1; do
    if [ "$waited" -ge "$limit" ]; then
        echo "The database is unreachable or has unapplied migrations after ${limit} s." >&2
        echo "Start the web server (start_server.sh applies them) or run: python manage.py migrate" >&2
        python manage.py migrate --check >&2 || true
        exit 1
    fi
    if [ "$waited" -eq 0 ]; then
        echo "Waiting for the database and its migrations (start_server.sh applies them)..."
    fi
    sleep 5
    waited=$((waited + 5))
done
