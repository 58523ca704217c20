"""Create the demo data the README's examples use. Running it again changes nothing."""

from __future__ import annotations

import secrets
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.authtoken.models import Token

from orders.models import Customer, Product

PRODUCTS = [
    ("PROD-A", "Widget", Decimal("10.00"), 100),
    ("PROD-B", "Gadget", Decimal("25.00"), 50),
    ("PROD-C", "Gizmo", Decimal("99.00"), 3),
]
CUSTOMERS = [
    ("CUST-1", "Ada Lovelace", Decimal("500.00")),
    ("CUST-2", "Alan Turing", Decimal("250.00")),
    ("CUST-3", "Grace Hopper", Decimal("0.00")),
]


class Command(BaseCommand):
    help = (
        "Create demo products and customers, an admin, a producer allowed to submit events and "
        "a read-only viewer, each with an API token. Running it again changes nothing."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="admin", help="admin user name (default: admin)")

    @transaction.atomic
    def handle(self, *args: Any, username: str, **options: Any) -> None:
        for product_id, name, price, stock in PRODUCTS:
            _, created = Product.objects.get_or_create(
                product_id=product_id, defaults={"name": name, "price": price, "stock": stock}
            )
            self._report("product", product_id, created)
        for customer_id, name, balance in CUSTOMERS:
            _, created = Customer.objects.get_or_create(
                customer_id=customer_id, defaults={"name": name, "balance": balance}
            )
            self._report("customer", customer_id, created)

        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(12)
            user = user_model.objects.create_superuser(username=username, password=password)
            self.stdout.write(
                self.style.SUCCESS(f"created superuser {username!r} with password {password}")
            )
        else:
            self.stdout.write(
                f"superuser {username!r} exists (password unchanged; "
                f"reset it with: python manage.py changepassword {username})"
            )
        self._token(user)

        submit = Permission.objects.get(content_type__app_label="orders", codename="submit_event")
        for name, permissions in (("producer", [submit]), ("viewer", [])):
            other, created = user_model.objects.get_or_create(username=name)
            if created:
                other.set_unusable_password()  # an API client: it signs in with its token
                other.save()
                other.user_permissions.set(permissions)
            self._report("user", name, created)
            self._token(other)

    def _token(self, user: Any) -> None:
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"API token of {user.get_username()!r}: {token.key}")

    def _report(self, kind: str, name: str, created: bool) -> None:
        self.stdout.write(f"{kind} {name}: {'created' if created else 'exists'}")
