"""The WSGI application of the web process: ``gunicorn project.wsgi`` (see scripts/run.sh)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# Tells the settings this process serves HTTP: on PostgreSQL it takes connections from a
# bounded pool instead of keeping one per thread (see DATABASES in project/settings.py).
os.environ.setdefault("DJANGO_WEB_PROCESS", "1")
application = get_wsgi_application()
