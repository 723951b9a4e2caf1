"""/api/devices/{id}/users/: the users on a clock, read and written live; for
a clock that pushes, its users as the bridge knows them and commands queued
for it (core.device_users decides which)."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status, viewsets
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response

from core import adms, device_users
from core.api.serializers import (
    CommandsQueuedSerializer,
    DeviceUserImportSerializer,
    DeviceUserInputSerializer,
    DeviceUserPageSerializer,
    DeviceUserSerializer,
    ErrorSerializer,
    ImportResultSerializer,
)
from core.api.views.common import (
    DETAIL_ERRORS,
    DEVICE_BUSY_TEXT,
    DEVICE_ERRORS,
    DEVICE_ID,
    WRITE_ERRORS,
)
from core.audit import audit_record, device_command_entry, device_user_entry
from core.models import Device

PERMS = ["core.view_device", "core.manage_device_users"]
NEEDS = (
    "Talks to the clock: needs core.view_device and core.manage_device_users. A clock "
    "that pushes (no IP address) is not reached: writes queue commands for its next poll "
    "and answer 202 with their ids."
)
PUSH_ANSWERS = {
    202: CommandsQueuedSerializer,
    409: OpenApiResponse(
        ErrorSerializer,
        description="A pushing clock that cannot take commands yet: it has never called "
        "the bridge, or it is waiting for approval. " + DEVICE_BUSY_TEXT,
    ),
}


class DeviceUserViewSet(viewsets.GenericViewSet):
    action_permissions = {
        name: PERMS for name in ("list", "create", "destroy", "import_users", "metadata")
    }
    serializer_class = DeviceUserSerializer
    lookup_field = "user_id"
    lookup_value_regex = "[^/]+"
    filter_backends = []

    def get_queryset(self):
        # The users live on the clock, not in a table; the browsable API asks anyway.
        return Device.objects.none()

    def _device(self) -> Device:
        return get_object_or_404(Device, pk=self.kwargs["device_pk"])

    @extend_schema(
        summary="The users on the device: read live, or the bridge's copy for a pushing clock",
        description=NEEDS + " `source` says which: `device` (read live) or `bridge` (the "
        "users the bridge knows for a pushing clock from its uploads; uid, has_password "
        "and group_id are null there).",
        parameters=[DEVICE_ID],
        responses={200: DeviceUserPageSerializer, **DETAIL_ERRORS, **DEVICE_ERRORS},
    )
    def list(self, request, device_pk=None):
        found = device_users.device_users_list(device=self._device())
        page = self.paginate_queryset(found.users)
        answer = self.get_paginated_response(
            DeviceUserSerializer(page, many=True, context={"live": found.live}).data
        )
        answer.data["source"] = "device" if found.live else "bridge"
        return answer

    @extend_schema(
        summary="Add a user to the device, or update the one with this user_id",
        description=NEEDS + " 201 when added, 200 when updated; 202 when queued.",
        parameters=[DEVICE_ID],
        request=DeviceUserInputSerializer,
        responses={
            200: DeviceUserSerializer,
            201: DeviceUserSerializer,
            **WRITE_ERRORS,
            **DEVICE_ERRORS,
            **PUSH_ANSWERS,
        },
    )
    def create(self, request, device_pk=None):
        device = self._device()
        given = DeviceUserInputSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        result = device_users.device_user_save(
            device=device, user=given.to_input(), created_by=request.user.get_username()
        )
        if isinstance(result, device_users.PushQueued):
            return _queued(request, "device_user_add", device, result)
        record, replaced = result
        _audit(
            request,
            "device_user_add",
            device,
            [device_user_entry(device=device, before=replaced, after=record)],
        )
        return Response(
            DeviceUserSerializer(record).data,
            status=status.HTTP_201_CREATED if replaced is None else status.HTTP_200_OK,
        )

    @extend_schema(
        summary="Delete a user from the device",
        description=NEEDS + " The employee and their punches stay.",
        parameters=[
            DEVICE_ID,
            OpenApiParameter("user_id", str, OpenApiParameter.PATH, description="The user id."),
        ],
        responses={
            204: None,
            400: WRITE_ERRORS[400],
            **DETAIL_ERRORS,
            **DEVICE_ERRORS,
            **PUSH_ANSWERS,
        },
    )
    def destroy(self, request, device_pk=None, user_id=None):
        device = self._device()
        removed = device_users.device_user_delete(
            device=device, user_id=user_id, created_by=request.user.get_username()
        )
        if isinstance(removed, device_users.PushQueued):
            return _queued(request, "device_user_remove", device, removed)
        if removed is None:
            raise NotFound(f"No user with user id {user_id!r} on device {device.name!r}.")
        _audit(
            request,
            "device_user_remove",
            device,
            [device_user_entry(device=device, before=removed, after=None)],
        )
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Add or update many users, from a list or a URL",
        description=NEEDS
        + " Every user is checked against the device first; one that does not fit stops "
        "the import before anything is written or queued (400, keyed by position in the list).",
        parameters=[DEVICE_ID],
        request=DeviceUserImportSerializer,
        responses={200: ImportResultSerializer, **WRITE_ERRORS, **DEVICE_ERRORS, **PUSH_ANSWERS},
    )
    def import_users(self, request, device_pk=None):
        device = self._device()
        given = DeviceUserImportSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        source = given.validated_data.get("url")
        if source is not None:
            try:
                users = device_users.import_source_fetch(url=source)
            except device_users.ImportSourceError as exc:
                raise ValidationError({"url": str(exc)}) from None
        else:
            users = [device_users.UserInput(**item) for item in given.validated_data["users"]]
        try:
            result = device_users.device_users_import(
                device=device, users=users, created_by=request.user.get_username()
            )
        except device_users.DeviceUserInvalid as exc:
            raise ValidationError({"users": exc.errors}) from None
        details = {} if source is None else {"source": source}
        if isinstance(result, device_users.PushQueued):
            return _queued(request, "device_user_add", device, result, **details)
        entries = [
            device_user_entry(device=device, before=before, after=after, **details)
            for after, before in result.written
        ]
        _audit(request, "device_user_add", device, entries)
        return Response(ImportResultSerializer(result).data)


def _queued(request, action: str, device: Device, result, **details) -> Response:
    """202 with the commands queued for a pushing clock, recorded in the audit
    log like a write to a polled clock, with the command line and its id
    (core.audit.device_command_entry): each entry's `before` is the bridge's
    copy of the user (None when it has none)."""
    entries = []
    for command, (after, before) in zip(result.commands, result.written, strict=True):
        user = device_user_entry(device=device, before=before, after=after)
        # A pushing clock has no slot the bridge knows.
        changes = {k: v for k, v in (user.changes if user else {}).items() if k != "uid"}
        # A command is recorded even when the bridge's copy already matches it.
        entries.append(device_command_entry(command=command, changes=changes, **details))
    _audit(request, action, device, entries)
    data = {
        "command_ids": [c.pk for c in result.commands],
        "commands": [adms.command_shown(c.command) for c in result.commands],
    }
    return Response(CommandsQueuedSerializer(data).data, status=status.HTTP_202_ACCEPTED)


def _audit(request, action: str, device: Device, entries: list) -> None:
    """Records users written to or deleted from a clock (core.audit), after the
    clock took them; a user saved as it was records nothing."""
    audit_record(actor=request.user, action=action, model=Device, entries=[e for e in entries if e])
