"""/api/employees/: people as the clocks know them."""

from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.filters import SearchFilter

from core.api.filters import EmployeeFilter, StrictOrderingFilter
from core.api.serializers import EmployeeSerializer
from core.api.views.common import DETAIL_ERRORS, LIST_ERRORS, WRITE_ERRORS
from core.models import Employee


@extend_schema_view(
    list=extend_schema(responses={200: EmployeeSerializer(many=True), **LIST_ERRORS}),
    retrieve=extend_schema(responses={200: EmployeeSerializer, **DETAIL_ERRORS}),
    update=extend_schema(responses={200: EmployeeSerializer, **WRITE_ERRORS}),
    partial_update=extend_schema(
        responses={200: EmployeeSerializer, **WRITE_ERRORS},
        description="HR changes the name and the work-time overrides (core.change_employee).",
    ),
)
class EmployeeViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    queryset = Employee.objects.prefetch_related("devices").order_by("user_id")
    serializer_class = EmployeeSerializer
    filter_backends = [DjangoFilterBackend, SearchFilter, StrictOrderingFilter]
    filterset_class = EmployeeFilter
    search_fields = ["user_id", "name"]
    ordering_fields = ["user_id", "name"]
