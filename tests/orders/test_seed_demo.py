from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.authtoken.models import Token

from orders.models import Customer, Product

pytestmark = pytest.mark.django_db


def snapshot() -> tuple[object, ...]:
    return (
        list(Product.objects.values_list("product_id", "stock", "price")),
        list(Customer.objects.values_list("customer_id", "balance")),
        list(get_user_model().objects.values_list("username", "password")),
        list(Token.objects.values_list("key", flat=True)),
    )


def test_seed_demo_creates_the_readme_data_and_a_random_password() -> None:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    assert {"PROD-A", "PROD-B"} <= set(Product.objects.values_list("product_id", flat=True))
    assert Customer.objects.filter(customer_id="CUST-1").exists()
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser
    printed = out.getvalue()
    password = printed.split("with password ")[1].split()[0]
    assert admin.check_password(password)
    assert Token.objects.get(user=admin).key in printed


def test_seed_demo_twice_changes_nothing() -> None:
    call_command("seed_demo", stdout=StringIO())
    before = snapshot()
    out = StringIO()
    call_command("seed_demo", stdout=out)
    assert snapshot() == before
    assert "exists" in out.getvalue()
