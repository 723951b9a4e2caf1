"""/api/devices/{id}/commands/: the commands queued for a pushing clock (by
the users-on-a-clock endpoints, the admin's Push actions, device_command) and
what the clock answered. Read-only: commands are queued where they are made."""

from django.shortcuts import get_object_or_404
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import viewsets

from core import adms
from core.api.filters import DeviceCommandFilter
from core.api.serializers import DeviceCommandSerializer
from core.api.views.common import DETAIL_ERRORS, DEVICE_ID, LIST_ERRORS
from core.models import Device, DeviceCommand

PERMS = ["core.view_device", "core.view_devicecommand"]
NEEDS = (
    "Needs core.view_device and core.view_devicecommand. A command sent and not answered "
    "within ADMS_COMMAND_TIMEOUT reads as failed, whether or not the clock still polls."
)


@extend_schema_view(
    list=extend_schema(
        summary="The commands queued for the device, newest first",
        description=NEEDS,
        parameters=[DEVICE_ID],
        responses={200: DeviceCommandSerializer(many=True), 404: DETAIL_ERRORS[404], **LIST_ERRORS},
    ),
    retrieve=extend_schema(
        summary="One command of the device: its state and the clock's result",
        description=NEEDS + " 404 when the command is another device's.",
        parameters=[DEVICE_ID],
        responses={200: DeviceCommandSerializer, **DETAIL_ERRORS},
    ),
)
class DeviceCommandViewSet(viewsets.ReadOnlyModelViewSet):
    serializer_class = DeviceCommandSerializer
    filter_backends = [DjangoFilterBackend]
    filterset_class = DeviceCommandFilter
    action_permissions = {"list": PERMS, "retrieve": PERMS}

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # the schema: no device in the URL
            return DeviceCommand.objects.none()
        device = get_object_or_404(Device, pk=self.kwargs["device_pk"])
        adms.commands_expire(device=device)
        return device.commands.order_by("-created_at", "-id")
