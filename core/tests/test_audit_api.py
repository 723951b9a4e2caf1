"""The audit log's actor for changes made through the REST API.

Django REST framework authenticates HTTP Basic, token and JWT requests inside
the view, after every middleware ran. The two views below are minimal API
views authenticated that way: one makes an HR correction the way the API's
PATCH of a day does it (core.audit's docstring), one creates a device through
a model serializer (recorded by auditlog's signals).
"""

import base64
import datetime

import pytest
from auditlog.models import LogEntry
from django.urls import path
from rest_framework import serializers
from rest_framework.authentication import BasicAuthentication
from rest_framework.generics import CreateAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from attendance_bridge.urls import urlpatterns as project_urlpatterns
from core.audit import audit_changes
from core.models import Device, ProcessedAttendance
from core.processing import attendance_edit, attendance_process
from core.tests.factories import DeviceFactory, RawAttendanceFactory

UTC = datetime.UTC


class CorrectionSerializer(serializers.Serializer):
    clock_in = serializers.DateTimeField()
    clock_out = serializers.DateTimeField()


class DayCorrection(APIView):
    authentication_classes = [BasicAuthentication]
    permission_classes = [IsAuthenticated]

    def patch(self, request, pk):
        body = CorrectionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with audit_changes(actor=request.user, action="attendance_edit", ids=[pk]):
            attendance_edit(record_id=pk, user=request.user, **body.validated_data)
        return Response({"id": pk})


class DeviceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Device
        fields = ["name", "ip_address", "port"]


class DeviceCreate(CreateAPIView):
    authentication_classes = [BasicAuthentication]
    permission_classes = [IsAuthenticated]
    serializer_class = DeviceSerializer


urlpatterns = [
    *project_urlpatterns,
    path("test-api/days/<int:pk>/", DayCorrection.as_view()),
    path("test-api/devices/", DeviceCreate.as_view()),
]

pytestmark = [pytest.mark.django_db, pytest.mark.urls(__name__)]


@pytest.fixture
def basic_auth(django_user_model):
    user = django_user_model.objects.create_user("hr-api", password="pw")
    token = base64.b64encode(b"hr-api:pw").decode()
    return user, {"HTTP_AUTHORIZATION": f"Basic {token}"}


def test_an_hr_correction_through_the_api_is_recorded_with_the_authenticated_user(
    client, basic_auth
):
    user, headers = basic_auth
    device = DeviceFactory(name="Front door")
    for hour in (8, 17):
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, tzinfo=UTC),
        )
    attendance_process(full=True)
    day = ProcessedAttendance.objects.get()
    LogEntry.objects.all().delete()

    response = client.patch(
        f"/test-api/days/{day.pk}/",
        {"clock_in": "2026-11-02T08:00:00Z", "clock_out": "2026-11-02T18:15:00Z"},
        content_type="application/json",
        **headers,
    )

    assert response.status_code == 200
    [entry] = LogEntry.objects.all()
    assert entry.actor == user
    assert entry.additional_data == {"action": "attendance_edit"}
    assert entry.changes["clock_out"] == [
        "2026-11-02T17:00:00+00:00",
        "2026-11-02T18:15:00+00:00",
    ]
    assert entry.changes["is_manual"] == [False, True]


def test_a_device_created_through_the_api_is_recorded_with_the_authenticated_user(
    client, basic_auth
):
    user, headers = basic_auth
    response = client.post(
        "/test-api/devices/",
        {"name": "Dock", "ip_address": "127.0.0.1", "port": 4370},
        content_type="application/json",
        **headers,
    )
    assert response.status_code == 201
    [entry] = LogEntry.objects.all()
    assert entry.action == LogEntry.Action.CREATE
    assert entry.actor == user
    assert entry.changes["name"] == [None, "Dock"]
