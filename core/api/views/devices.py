"""/api/devices/: the clocks, and the actions that talk to them."""

import dataclasses

from django.db.models import ProtectedError
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.filters import SearchFilter
from rest_framework.response import Response

from core import ingest, tasks
from core.api.errors import device_error_status
from core.api.filters import DeviceFilter, StrictOrderingFilter
from core.api.serializers import (
    ClockSetSerializer,
    DeviceReportSerializer,
    DeviceSerializer,
    PollResultSerializer,
    TaskQueuedSerializer,
)
from core.api.views.common import (
    DETAIL_ERRORS,
    DEVICE_ERRORS,
    LIST_ERRORS,
    WAIT,
    WRITE_ERRORS,
    wait_requested,
)
from core.audit import audit_clock_set
from core.models import Device


def _queued(task) -> Response:
    return Response({"task_id": task.id}, status=status.HTTP_202_ACCEPTED)


def _device_action(perm: str, result, description: str):
    return extend_schema(
        summary=description,
        request=None,
        parameters=[WAIT],
        responses={200: result, 202: TaskQueuedSerializer, **DETAIL_ERRORS, **DEVICE_ERRORS},
        description=f"Needs core.view_device and {perm}.",
    )


def _answer(result) -> Response:
    """A poll's or a connection test's result; a failed one with the status its failure calls for."""
    failed = (
        None if result.ok else device_error_status(timed_out=result.timed_out, busy=result.busy)
    )
    return Response(dataclasses.asdict(result), status=failed)


@extend_schema_view(
    list=extend_schema(responses={200: DeviceSerializer(many=True), **LIST_ERRORS}),
    retrieve=extend_schema(responses={200: DeviceSerializer, **DETAIL_ERRORS}),
    create=extend_schema(responses={201: DeviceSerializer, **WRITE_ERRORS}),
    update=extend_schema(responses={200: DeviceSerializer, **WRITE_ERRORS}),
    partial_update=extend_schema(responses={200: DeviceSerializer, **WRITE_ERRORS}),
    destroy=extend_schema(
        responses={204: None, **DETAIL_ERRORS},
        description="A device that has punches cannot be deleted (400): disable it instead.",
    ),
)
class DeviceViewSet(viewsets.ModelViewSet):
    queryset = Device.objects.all()
    serializer_class = DeviceSerializer
    filter_backends = [DjangoFilterBackend, SearchFilter, StrictOrderingFilter]
    filterset_class = DeviceFilter
    search_fields = ["name", "ip_address", "serial_number"]
    ordering_fields = ["name", "last_success_at", "consecutive_failures"]
    action_permissions = {
        "poll": ["core.view_device", "core.poll_device"],
        "test": ["core.view_device", "core.test_device"],
        "sync_time": ["core.view_device", "core.sync_device_clock"],
        "poll_all": ["core.view_device", "core.poll_device"],
    }

    def perform_destroy(self, instance):
        try:
            instance.delete()
        except ProtectedError:
            raise ValidationError(
                {"detail": f"Device {instance.name!r} has punches; disable it instead."}
            ) from None

    @_device_action("core.poll_device", PollResultSerializer, "Download new punches")
    @action(detail=True, methods=["post"])
    def poll(self, request, pk=None):
        device = self.get_object()
        if not wait_requested(request):
            return _queued(tasks.poll_device.delay(device.pk))
        return _answer(ingest.device_poll_guarded(device=device))

    @_device_action("core.test_device", DeviceReportSerializer, "Test the connection")
    @action(detail=True, methods=["post"])
    def test(self, request, pk=None):
        device = self.get_object()
        if not wait_requested(request):
            return _queued(tasks.test_device.delay(device.pk))
        return _answer(ingest.device_test(device=device))

    @_device_action("core.sync_device_clock", ClockSetSerializer, "Set the device clock")
    @action(detail=True, methods=["post"])
    def sync_time(self, request, pk=None):
        device = self.get_object()
        if not wait_requested(request):
            # The task records the clock set in the audit log, with this user.
            return _queued(tasks.sync_device_time.delay(device.pk, actor_id=request.user.pk))
        local_now = ingest.device_sync_time(device=device)
        audit_clock_set(actor=request.user, device=device, set_to=local_now)
        return Response({"device_id": device.pk, "set_to": local_now.isoformat()})

    @extend_schema(
        summary="Poll every enabled device",
        request=None,
        parameters=[WAIT],
        responses={
            200: PollResultSerializer(many=True),
            202: TaskQueuedSerializer,
            **LIST_ERRORS,
        },
        description="Needs core.view_device and core.poll_device. With wait=true, answers "
        "200 with one result per device, each saying whether it failed.",
    )
    @action(detail=False, methods=["post"])
    def poll_all(self, request):
        if not wait_requested(request):
            return _queued(tasks.poll_all_devices.delay())
        return Response([dataclasses.asdict(r) for r in ingest.devices_poll()])
