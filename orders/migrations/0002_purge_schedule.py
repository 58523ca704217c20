"""Schedule the daily purge of processed-event records in django-celery-beat's tables, so it
shows (and can be changed or paused) in the admin's periodic tasks."""

from django.db import migrations

NAME = "idempotency: purge processed events"
TASK = "idempotency.tasks.purge_processed_events"


def schedule(apps, schema_editor):
    using = schema_editor.connection.alias
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    daily, _ = CrontabSchedule.objects.using(using).get_or_create(
        minute="17",
        hour="3",
        day_of_week="*",
        day_of_month="*",
        month_of_year="*",
        timezone="UTC",
    )
    PeriodicTask.objects.using(using).get_or_create(
        name=NAME,
        defaults={
            "task": TASK,
            "crontab": daily,
            "description": (
                "Delete processed-event records past their retention "
                "(IDEMPOTENCY['RETENTION'] and CONSUMER_RETENTION), in batches."
            ),
        },
    )


def unschedule(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.using(schema_editor.connection.alias).filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0001_initial"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(schedule, unschedule)]
