#!/usr/bin/env bash
# Installs what is needed, prepares the database and starts the web server
# (admin at http://127.0.0.1:8000/admin/, API docs at /api/docs/).
#   HOST=0.0.0.0 PORT=8000 ./start_server.sh
. "$(dirname "$0")/scripts/bootstrap.sh"

python manage.py migrate --noinput
# --insecure serves the admin's CSS and JS with DEBUG off, as this dev server
# is the whole web tier on the embedded defaults.
exec python manage.py runserver --insecure "${HOST:-127.0.0.1}:${PORT:-8000}"
