"""The example's admin: rows that events create are shown, never edited, added or deleted."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.test import Client

from orders.models import Order
from tests.factories import CustomerFactory, OrderFactory, PaymentFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


@pytest.mark.parametrize("model", ["order", "orderitem", "payment", "ledgerentry", "rejection"])
def test_event_derived_rows_cannot_be_added(root: Client, model: str) -> None:
    assert root.get(f"/admin/orders/{model}/add/").status_code == 403
    changelist = root.get(f"/admin/orders/{model}/").content.decode()
    assert f"/admin/orders/{model}/add/" not in changelist


def test_an_order_is_shown_but_its_fields_cannot_be_changed(root: Client) -> None:
    order = OrderFactory(status=Order.Status.ACCEPTED, total=Decimal("20.00"))
    page = root.get(f"/admin/orders/order/{order.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    for field in ("status", "total", "paid_amount", "order_id", "tracking_number"):
        assert f'name="{field}"' not in html, field
    assert 'name="_save"' not in html
    response = root.post(
        f"/admin/orders/order/{order.pk}/change/",
        {"status": "shipped", "total": "0.01", "paid_amount": "999.00"},
    )
    assert response.status_code == 403
    order.refresh_from_db()
    assert (order.status, order.total, order.paid_amount) == (
        Order.Status.ACCEPTED,
        Decimal("20.00"),
        Decimal("0.00"),
    )


def test_an_order_cannot_be_deleted(root: Client) -> None:
    order = OrderFactory()
    assert root.post(f"/admin/orders/order/{order.pk}/delete/", {"post": "yes"}).status_code == 403
    assert Order.objects.filter(pk=order.pk).exists()


def test_a_payment_cannot_be_edited(root: Client) -> None:
    payment = PaymentFactory(amount=Decimal("5.00"))
    response = root.post(f"/admin/orders/payment/{payment.pk}/change/", {"amount": "500.00"})
    assert response.status_code == 403
    payment.refresh_from_db()
    assert payment.amount == Decimal("5.00")


def test_a_customers_name_is_editable_but_not_its_balance(root: Client) -> None:
    customer = CustomerFactory(customer_id="CUST-5", name="Old", balance=Decimal("50.00"))
    url = f"/admin/orders/customer/{customer.pk}/change/"
    html = root.get(url).content.decode()
    assert 'name="name"' in html
    assert 'name="balance"' not in html
    data = {
        "customer_id": "CUST-5",
        "name": "New",
        "balance": "1000.00",
        "ledger-TOTAL_FORMS": "0",
        "ledger-INITIAL_FORMS": "0",
    }
    assert root.post(url, data).status_code == 302
    customer.refresh_from_db()
    assert (customer.name, customer.balance) == ("New", Decimal("50.00"))
