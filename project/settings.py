"""Settings of the example service.

With no environment variables it runs on embedded defaults that need no server: a SQLite file
and kombu's filesystem broker, both under ``var/``. ``DATABASE_URL`` and ``CELERY_BROKER_URL``
switch to PostgreSQL and RabbitMQ or Redis. ``DJANGO_DEBUG=1`` turns debugging on (it is off
by default). docs/deployment.md lists every variable.
"""

from __future__ import annotations

import os
import secrets
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url

from project import queues as project_queues

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _env_flag(name: str, default: bool) -> bool:
    return os.environ.get(name, "1" if default else "0").lower() in {"1", "true", "yes", "on"}


def _secret_key() -> str:
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    # A development key made once per checkout, never a fixed one committed to the repository.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Off unless asked for: a debug page shows settings and tracebacks to whoever causes an error.
DEBUG = _env_flag("DJANGO_DEBUG", False)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "idempotency",
    "orders",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's, the API docs') from STATIC_ROOT, in every process, DEBUG or not.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # 400 for a NUL in the URL, 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE, 503 with
    # Retry-After when the database is unavailable: the same on every endpoint.
    "project.middleware.RequestGuardMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------


def _web_process() -> bool:
    """Whether this process serves HTTP: project/wsgi.py says so, and so does runserver."""
    if "DJANGO_WEB_PROCESS" in os.environ:
        return _env_flag("DJANGO_WEB_PROCESS", False)
    return sys.argv[1:2] == ["runserver"]


DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("CONN_MAX_AGE", "600")),
        conn_health_checks=True,
    )
}
#: Threads per web worker process (gunicorn --threads); each may hold one pooled connection.
WEB_THREADS = int(os.environ.get("WEB_THREADS", "4"))
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and _web_process():
    # A persistent connection per request thread has no upper bound (runserver starts a thread
    # per request): the web process takes its connections from one bounded pool instead, and
    # a request that finds it exhausted waits DJANGO_DB_POOL_TIMEOUT seconds, then gets 503.
    # Celery workers keep CONN_MAX_AGE: one connection per worker process, reused across tasks.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": int(os.environ.get("DJANGO_DB_POOL_MIN_SIZE", "1")),
        "max_size": int(os.environ.get("DJANGO_DB_POOL_MAX_SIZE", str(WEB_THREADS))),
        "timeout": float(os.environ.get("DJANGO_DB_POOL_TIMEOUT", "5")),
        # Idle connections beyond min_size are closed after a minute.
        "max_idle": 60,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the worker write to the same file: take the write lock at BEGIN and
    # wait for it, instead of failing with "database is locked" half-way through a transaction.
    # Write-ahead logging: readers no longer block the writer nor it them, and a commit is one
    # append to the log (synchronous stays FULL: a committed claim survives a power cut). With
    # the default rollback journal the worker applied events at half the rate the API took them.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    # mysqlclient is Django's MariaDB/MySQL driver; PyMySQL (pure Python, requirements/test.txt)
    # stands in where mysqlclient is not installed.
    try:
        import MySQLdb  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        import pymysql  # type: ignore[import-untyped]

        pymysql.install_as_MySQLdb()
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("charset", "utf8mb4")
    # The test database takes the server's default collation (case-insensitive), as a user's
    # does: the columns that hold ids carry a binary collation of their own
    # (idempotency/fields.py), and the tests prove that "abc" is not a duplicate of "ABC".
    DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth, i18n, static ---------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# The events API answers 413 past 1 MiB; Django refuses to buffer more than that either.
DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
STATIC_URL = "static/"
# Filled by `manage.py collectstatic` (scripts/run.sh runs it), served by WhiteNoise.
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# --- REST framework -------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Reading needs a login; every write (any method but GET, HEAD, OPTIONS) also needs the
    # orders.submit_event permission, unless a view says otherwise.
    "DEFAULT_PERMISSION_CLASSES": ["orders.permissions.SubmitEventsOrReadOnly"],
    # REST framework's JSON parser with a bound on nesting; forms for the browsable API.
    "DEFAULT_PARSER_CLASSES": [
        "orders.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Orders example of django-idempotency",
    "DESCRIPTION": "Events posted here are applied exactly once by Celery workers.",
    "VERSION": "0.1.0",
    # The API speaks JSON; the form parsers serve only the browsable API, and a form cannot
    # carry an event's list of items, so the schema does not offer them.
    "PARSER_WHITELIST": ["orders.parsers.JSONParser"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "orders.schema.strict_events",
        "orders.schema.every_endpoint",
    ],
}

# --- Celery ---------------------------------------------------------------------------------
# At-least-once made safe: a message is acknowledged only after its task's transaction
# committed (acks_late); a worker killed mid-task gives its message back (reject on worker lost);
# a worker holds one message at a time (prefetch 1), so a crash strands no others.
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "embedded://")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A task that fails for good is rejected, not acknowledged: RabbitMQ dead-letters it, and the
# idempotency app records it as a dead letter in the database on every broker.
CELERY_TASK_ACKS_ON_FAILURE_OR_TIMEOUT = False
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# The longest a task may run; it bounds how long a message can legitimately stay unacknowledged.
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 270
# The longest countdown a task schedules (the out-of-order retries back off to 5 minutes).
MAX_RETRY_DELAY = 300
# Reuse database connections across tasks: Celery 5.5's Django fix-up honours CONN_MAX_AGE, other
# versions close them around every task unless CELERY_DB_REUSE_MAX is set. project/celery.py
# still closes a connection that broke or outlived CONN_MAX_AGE.
CELERY_DB_REUSE_MAX = int(os.environ.get("CELERY_DB_REUSE_MAX", "1000"))

CELERY_QUEUE = os.environ.get("CELERY_QUEUE", "orders")
CELERY_TASK_DEFAULT_QUEUE = CELERY_QUEUE
#: RabbitMQ: "classic", or "quorum" for a queue that dead-letters a message after
#: QUEUE_DELIVERY_LIMIT redeliveries (project/queues.py, docs/celery.md).
QUEUE_TYPE = os.environ.get("CELERY_QUEUE_TYPE", "classic")
QUEUE_DELIVERY_LIMIT = int(
    os.environ.get("CELERY_QUEUE_DELIVERY_LIMIT", project_queues.DEFAULT_DELIVERY_LIMIT)
)
CELERY_TASK_QUEUES = [
    project_queues.work_queue(CELERY_QUEUE, QUEUE_TYPE, delivery_limit=QUEUE_DELIVERY_LIMIT)
]
CELERY_TASK_CREATE_MISSING_QUEUES = False
# Keeps undecodable messages and unknown tasks as dead letters instead of dropping them.
CELERY_WORKER_CONSUMER = "idempotency.celery:DeadLetterConsumer"

CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {}
if CELERY_BROKER_URL.startswith(("embedded://", "filesystem://")):
    # embedded://: kombu's filesystem transport, acknowledging as soon as a task is done instead
    # of once per two-second wait (project/embedded_broker.py, whose scheme project/celery.py
    # registers). The URL alone selects it: no CELERY_BROKER_TRANSPORT to override.
    for folder in ("queue", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "control_folder": str(BROKER_DIR / "control"),
        # kombu lists the directory once a second by default; a listing is cheap (a local
        # directory). bench/embedded.py measures the embedded default.
        "polling_interval": float(os.environ.get("CELERY_POLLING_INTERVAL", "0.05")),
    }
    if CELERY_BROKER_URL.startswith("filesystem://"):
        # The embedded default's URL until 0.1.0 (bench/celery_e2e.py still names it): the
        # transport CELERY_EMBEDDED_TRANSPORT names, the embedded one unless it says
        # "filesystem" (kombu's own). It wins over the URL of any broker a test points at.
        CELERY_BROKER_TRANSPORT = os.environ.get(
            "CELERY_EMBEDDED_TRANSPORT", "project.embedded_broker:Transport"
        )
elif CELERY_BROKER_URL.startswith(("amqp://", "pyamqp://")):
    # Publisher confirms: delay() returns only once RabbitMQ has taken the message.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True}
elif CELERY_BROKER_URL.startswith(("redis://", "rediss://")):
    # Redis redelivers an unacknowledged message after visibility_timeout; it must outlast the
    # longest task plus the longest countdown, or a healthy slow task is delivered twice (the
    # inbox would discard it, but it would run its side effects outside the database twice).
    # The price: a message of a worker that died comes back only after this long.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": int(
            os.environ.get(
                "CELERY_VISIBILITY_TIMEOUT", CELERY_TASK_TIME_LIMIT + MAX_RETRY_DELAY + 300
            )
        ),
        # Without them a Redis that accepts connections and never answers blocks the relay and
        # the workers' publishes for ever; the worker's own polling waits 1 s at a time.
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
    }
elif CELERY_BROKER_URL.startswith("sqs://"):
    # kombu's SQS transport, with a reject that deletes and redeliveries flagged (the library's
    # idempotency.celery.sqs; project/sqs.py reads its options from the environment).
    # The visibility timeout follows the same horizon rule as Redis's.
    from project import sqs as project_sqs

    CELERY_BROKER_TRANSPORT = "idempotency.celery.sqs:Transport"
    CELERY_BROKER_TRANSPORT_OPTIONS = project_sqs.transport_options(
        os.environ, visibility_timeout=CELERY_TASK_TIME_LIMIT + MAX_RETRY_DELAY + 300
    )
    #: Receives before SQS moves a message to <queue>-dead (project/celery.py declares it).
    SQS_MAX_RECEIVE_COUNT = int(
        os.environ.get("CELERY_SQS_MAX_RECEIVE_COUNT", project_sqs.DEFAULT_MAX_RECEIVE_COUNT)
    )
    # SQS has no broadcast: no remote control, no events.
    CELERY_WORKER_ENABLE_REMOTE_CONTROL = False

# --- The idempotency app --------------------------------------------------------------------
IDEMPOTENCY = {
    "RETENTION": timedelta(days=30),
    # The example counts duplicates so the API and the admin can show them; it costs each
    # duplicate a small write (the library's default is off).
    "RECORD_DUPLICATES": _env_flag("IDEMPOTENCY_RECORD_DUPLICATES", True),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "idempotency": {"level": os.environ.get("IDEMPOTENCY_LOG_LEVEL", "INFO")},
        "orders": {"level": "INFO"},
        "celery": {"level": "INFO"},
    },
}

# --- Lifecycle of the idempotency records ---------------------------------------------------
# Celery beat runs idempotency.tasks.purge_processed_events daily at 03:17 UTC. The schedule
# lives in the database (orders migration 0002 creates it), so it shows in the admin's
# periodic tasks, where it can be changed or paused; run beat with:
#   celery -A project beat
INSTALLED_APPS += ["django_celery_beat"]
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
