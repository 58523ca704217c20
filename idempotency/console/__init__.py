"""The admin as an operations console: what happened to one event, across every record of it.

An event leaves a trace in up to five places: its outbox row (stored, published), the inbox
record of each consumer (outcome, result, duplicates, mismatch), its dead letters, the HTTP
``Idempotency-Key`` whose request produced it, and the business rows it created (every model
with an :class:`~idempotency.entities.EventIdField`). :func:`story.event_story` gathers them;
the admin shows them on one page per event id, linked both ways.
"""
