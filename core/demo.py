"""The demo's registrations: the emulated clock as a device, and an admin login."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from core.models import Device

DEVICE_NAME = "Demo clock"
ADMIN_USERNAME = "demo-admin"


@dataclass(frozen=True)
class DemoSetup:
    device: Device
    username: str
    password: str


def demo_prepare(*, device_host: str, device_port: int) -> DemoSetup:
    """Registers the demo's emulated clock (a Device named DEVICE_NAME at
    device_host:device_port, zone UTC, enabled) and a superuser ADMIN_USERNAME
    with a fresh generated password, which is returned.

    Idempotent: a second call updates the same device row (its port may have
    changed) and the same user, whose password is replaced. Raises DatabaseError
    when the database does.
    """
    password = secrets.token_urlsafe(12)
    with transaction.atomic():
        device, _ = Device.objects.update_or_create(
            name=DEVICE_NAME,
            defaults={
                "ip_address": device_host,
                "port": device_port,
                "protocol": Device.Protocol.TCP,
                "comm_key": 0,
                # The launcher runs the emulator with TZ=UTC: its clock shows UTC.
                "timezone": "UTC",
                "enabled": True,
            },
        )
        user, _ = get_user_model().objects.get_or_create(username=ADMIN_USERNAME)
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
    return DemoSetup(device=device, username=ADMIN_USERNAME, password=password)
