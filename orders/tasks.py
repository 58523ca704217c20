"""Celery consumers of the order events: each applies an event's effect exactly once.

An event about an order that has not arrived yet (a PaymentReceived overtaking its PlaceOrder)
is retried with exponential backoff: 2 s, 4 s, 8 s, ... capped at 5 minutes, ten times (about
20 minutes in all). Its claim rolls back with the attempt, so each retry is a first delivery.
"""

from __future__ import annotations

from typing import Any

from idempotency.celery import idempotent_task

from . import services

OUT_OF_ORDER_RETRY: dict[str, Any] = {
    "autoretry_for": (services.OrderNotYetPlaced,),
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 10,
}


@idempotent_task
def place_order(event: dict[str, Any]) -> dict[str, Any]:
    return services.place_order(event)


@idempotent_task(**OUT_OF_ORDER_RETRY)
def payment_received(event: dict[str, Any]) -> dict[str, Any]:
    return services.payment_received(event)


@idempotent_task
def debit_account(event: dict[str, Any]) -> dict[str, Any]:
    return services.debit_account(event)


@idempotent_task(**OUT_OF_ORDER_RETRY)
def ship_order(event: dict[str, Any]) -> dict[str, Any]:
    return services.ship_order(event)


@idempotent_task
def send_order_confirmation(event: dict[str, Any]) -> dict[str, Any]:
    """OrderPlaced, emitted by place_order through the outbox: the customer's email."""
    return services.send_order_confirmation(event)
