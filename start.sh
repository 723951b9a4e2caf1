#!/usr/bin/env bash
# The first command: installs what is needed (a virtualenv with the pinned
# requirements, a .env with a fresh SECRET_KEY), applies the migrations, then
# runs the web server, a Celery worker and beat together until Ctrl-C.
#   ./start.sh            on the embedded defaults: SQLite and a filesystem broker
#   ./start.sh --demo     also an emulated clock and a fake CRM, registered, and an admin login
#   PORT=8001 ./start.sh  another port (HOST, PORT as for start_server.sh)
. "$(dirname "$0")/scripts/bootstrap.sh"

exec python manage.py launch "$@"
