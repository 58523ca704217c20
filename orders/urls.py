from django.urls import path

from . import views

app_name = "orders"

urlpatterns = [
    path("events/", views.EventView.as_view(), name="events"),
    path("events/<str:event_id>/", views.EventStatusView.as_view(), name="event-status"),
    path("orders/", views.OrderListView.as_view(), name="order-list"),
    path("orders/<str:order_id>/", views.OrderDetailView.as_view(), name="order-detail"),
    path("products/<str:product_id>/", views.ProductDetailView.as_view(), name="product-detail"),
    path(
        "customers/<str:customer_id>/", views.CustomerDetailView.as_view(), name="customer-detail"
    ),
]
