from django.urls import path

from . import views

app_name = "orders"

urlpatterns = [
    path("events/", views.EventView.as_view(), name="events"),
    path("orders/<str:order_id>/", views.OrderDetailView.as_view(), name="order-detail"),
    path("products/<str:product_id>/", views.ProductDetailView.as_view(), name="product-detail"),
]
