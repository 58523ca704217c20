#!/usr/bin/env bash
# `make run`: migrate, seed the demo data, then serve the API and admin with a Celery worker.
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}

$BIN/python manage.py migrate --noinput
$BIN/python manage.py seed_demo

# -B: the worker also runs Celery beat (the daily purge, from the admin's periodic tasks).
worker_args=(--loglevel=INFO --concurrency="${WORKER_CONCURRENCY:-2}" -B)
if [[ "${CELERY_BROKER_URL:-filesystem://}" == filesystem://* ]]; then
  # The embedded broker has no broadcast peers to synchronise with.
  worker_args+=(--without-gossip --without-mingle)
fi
$BIN/celery -A project worker "${worker_args[@]}" &
worker=$!
# Publishes what the web process stored in the outbox but could not publish itself.
$BIN/python manage.py relay_outbox --forever --interval 2 &
relay=$!

stop() {
  trap - EXIT INT TERM
  kill -TERM "$worker" "$relay" 2>/dev/null || true
  wait "$worker" "$relay" 2>/dev/null || true
}
trap stop EXIT INT TERM

echo
echo "API:   http://$HOST:$PORT/api/   (schema: /api/schema/, docs: /api/docs/)"
echo "Admin: http://$HOST:$PORT/admin/  (user 'admin', password printed above on first run)"
echo "Stop:  Ctrl-C"
echo
$BIN/python manage.py runserver "$HOST:$PORT"
