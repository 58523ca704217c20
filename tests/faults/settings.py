"""Settings of the suite's worker, relay and web processes when a scenario needs a variant.

``project.settings`` as it is, plus what the environment asks for (each off by default):

``FAULTS_ISOLATION``
    ``repeatable_read`` or ``serializable``: the isolation level of the default database's
    transactions, as a project that sets ``OPTIONS["isolation_level"]`` runs them.
``FAULTS_REPLICA=1``
    A ``replica`` alias, a read-only connection to the same database (a hot standby, as far as
    the code can tell), and :class:`tests.routers.PrimaryReplicaRouter`: reads go to the
    replica, writes to ``default``.
``FAULTS_DELIVERY_LIMIT``
    ``IDEMPOTENCY["DELIVERY_LIMIT"]``, so a message killed on every delivery reaches it soon.
``FAULTS_RECONCILE_AFTER``
    ``IDEMPOTENCY["RECONCILE_AFTER"]`` in seconds: the relay republishes a message whose event
    shows no outcome within the scenario, not an hour later (``Scenario.relay`` sets it).
``FAULTS_SMTP_PORT``
    Django's SMTP email backend, sending to the test's SMTP server on that loopback port (the
    confirmation emails of scenario 22), from ``orders@shop.example``.

A process runs with them through ``DJANGO_SETTINGS_MODULE=tests.faults.settings``.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta

from psycopg import IsolationLevel

from project.settings import *  # noqa: F403
from project.settings import DATABASES, IDEMPOTENCY

ISOLATION_LEVELS = {
    "repeatable_read": IsolationLevel.REPEATABLE_READ,
    "serializable": IsolationLevel.SERIALIZABLE,
}

if isolation := os.environ.get("FAULTS_ISOLATION"):
    DATABASES["default"].setdefault("OPTIONS", {})["isolation_level"] = ISOLATION_LEVELS[isolation]

if os.environ.get("FAULTS_REPLICA") == "1":
    replica = copy.deepcopy(DATABASES["default"])
    options = dict(replica.get("OPTIONS") or {})
    # libpq passes "options" to the server: every transaction of the session is read-only.
    options["options"] = f"{options.get('options', '')} -c default_transaction_read_only=on".strip()
    replica["OPTIONS"] = options
    DATABASES["replica"] = replica
    DATABASE_ROUTERS = ["tests.routers.PrimaryReplicaRouter"]

if limit := os.environ.get("FAULTS_DELIVERY_LIMIT"):
    IDEMPOTENCY = {**IDEMPOTENCY, "DELIVERY_LIMIT": int(limit)}

if after := os.environ.get("FAULTS_RECONCILE_AFTER"):
    IDEMPOTENCY = {**IDEMPOTENCY, "RECONCILE_AFTER": timedelta(seconds=float(after))}

if smtp_port := os.environ.get("FAULTS_SMTP_PORT"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = "127.0.0.1"
    EMAIL_PORT = int(smtp_port)
    EMAIL_USE_TLS = False
    EMAIL_TIMEOUT = 5
    DEFAULT_FROM_EMAIL = "orders@shop.example"
