"""URL configuration for the demo project (no views are needed)."""

urlpatterns = []
