#!/usr/bin/env bash
# `make run`: migrate, seed the demo data, then serve the API and admin with a Celery worker.
# Ctrl-C stops everything. docs/deployment.md describes each process and variable.
set -euo pipefail
cd "$(dirname "$0")/.."
# The environment make creates; BIN names another (an unpacked sdist's suite runs in its own).
BIN=${BIN:-.venv/bin}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
# gunicorn: WEB_WORKERS processes of WEB_THREADS threads. On PostgreSQL each process holds at
# most WEB_THREADS pooled connections (project/settings.py), so the web tier never holds more
# than WEB_WORKERS x WEB_THREADS, whatever the load.
export WEB_WORKERS=${WEB_WORKERS:-2}
export WEB_THREADS=${WEB_THREADS:-4}

$BIN/python manage.py migrate --noinput
$BIN/python manage.py seed_demo
$BIN/python manage.py collectstatic --noinput --verbosity 0

# -B: the worker also runs Celery beat (the daily purge, from the admin's periodic tasks).
worker_args=(--loglevel=INFO --concurrency="${WORKER_CONCURRENCY:-2}" -B)
if [[ "${CELERY_BROKER_URL:-embedded://}" == embedded://* || "${CELERY_BROKER_URL:-}" == filesystem://* ]]; then
  # The embedded broker has no broadcast peers to synchronise with.
  worker_args+=(--without-gossip --without-mingle)
fi
$BIN/celery -A project worker "${worker_args[@]}" &
worker=$!
# Publishes what the web process stored in the outbox but could not publish itself.
$BIN/python manage.py relay_outbox --forever --interval 2 &
relay=$!
web=

# Stopping goes through the worker's main process alone: it ends its pool children itself. A
# signal sent to the pool children too (kill on the whole process group) can leave one holding
# the pool's queue lock, and the main process then waits for it forever.
stop() {
  trap - EXIT INT TERM
  kill -TERM "$worker" "$relay" $web 2>/dev/null || true
  wait "$worker" "$relay" $web 2>/dev/null || true
}
trap stop EXIT INT TERM

echo
echo "API:   http://$HOST:$PORT/api/   (schema: /api/schema/, docs: /api/docs/)"
echo "Admin: http://$HOST:$PORT/admin/  (user 'admin', password printed above on first run)"
echo "Stop:  Ctrl-C"
echo
if [[ "${DATABASE_URL:-}" == postgres* ]]; then
  # A production WSGI server with a bounded number of threads (and so of connections).
  $BIN/gunicorn project.wsgi:application --bind "$HOST:$PORT" \
    --workers "$WEB_WORKERS" --threads "$WEB_THREADS" --worker-class gthread \
    --timeout 30 --graceful-timeout 30 --access-logfile - &
  web=$!
  wait "$web"
else
  # The embedded SQLite default: one file, one writer; the development server is enough. In the
  # background with a wait, like gunicorn, so that a TERM sent to this script alone runs stop().
  $BIN/python manage.py runserver "$HOST:$PORT" &
  web=$!
  wait "$web"
fi
