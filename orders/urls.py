from django.urls import path

from . import client_api, views

app_name = "orders"

urlpatterns = [
    # What scripts/run.sh advertises: a map of the endpoints below (and the schema's).
    path("", views.ApiRootView.as_view(), name="api-root"),
    path("events/", views.EventView.as_view(), name="events"),
    path("events/<str:event_id>/", views.EventStatusView.as_view(), name="event-status"),
    # GET lists the orders; POST places one (with an Idempotency-Key).
    path("orders/", client_api.OrdersView.as_view(), name="orders"),
    path(
        "orders/requests/<uuid:request_id>/",
        client_api.OrderRequestView.as_view(),
        name="order-request",
    ),
    path("orders/<str:order_id>/", views.OrderDetailView.as_view(), name="order-detail"),
    path("products/<str:product_id>/", views.ProductDetailView.as_view(), name="product-detail"),
    path(
        "customers/<str:customer_id>/", views.CustomerDetailView.as_view(), name="customer-detail"
    ),
]
