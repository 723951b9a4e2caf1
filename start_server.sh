#!/usr/bin/env bash
# Installs what is needed, applies the database migrations, collects the static
# files and serves the bridge with gunicorn (admin at http://127.0.0.1:8000/admin/);
# WhiteNoise serves the admin's CSS and JS. Put a reverse proxy in front of it
# in production (docs/setup.md).
#   HOST=0.0.0.0 PORT=8000 WEB_CONCURRENCY=4 ./start_server.sh
#   ./start_server.sh --dev      Django's development server, reloading on changes
#
# This is the one start script that applies migrations: start_worker.sh and
# start_beat.sh wait for them.
. "$(dirname "$0")/scripts/bootstrap.sh"

dev=false
for arg in "$@"; do
    case "$arg" in
        --dev) dev=true ;;
        *) echo "start_server.sh: unknown option $arg (only --dev)" >&2; exit 2 ;;
    esac
done

python manage.py migrate --noinput
python manage.py collectstatic --noinput --verbosity 0
bind="${HOST:-127.0.0.1}:${PORT:-8000}"
if "$dev"; then
    exec python manage.py runserver "$bind"
fi
# --forwarded-allow-ips: the proxy whose X-Forwarded-* headers are believed.
exec gunicorn attendance_bridge.wsgi:application \
    --bind "$bind" \
    --workers "${WEB_CONCURRENCY:-2}" \
    --timeout "${WEB_TIMEOUT_SECONDS:-60}" \
    --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" \
    --access-logfile - \
    --no-control-socket \
    --log-level "$(echo "${LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"
