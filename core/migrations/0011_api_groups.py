"""The groups of the REST API (docs/permissions.md): HR, Operators, CRM, and
the permission to run processing (core.process_processedattendance).

Permissions are created here first: on a new database Django creates them only
after all migrations ran. A group that exists keeps its members; it gets the
listed permissions added, and keeps any an administrator gave it.
"""

from django.contrib.auth.management import create_permissions
from django.contrib.contenttypes.management import create_contenttypes
from django.db import migrations

GROUPS = {
    # View attendance and employees, correct daily attendance (timesheets read it).
    "HR": [
        "view_device",
        "view_employee",
        "change_employee",
        "view_rawattendance",
        "view_processedattendance",
        "change_processedattendance",
    ],
    # Manage devices and the users on them, poll, process, and send days to the CRM.
    "Operators": [
        "view_device",
        "add_device",
        "change_device",
        "delete_device",
        "poll_device",
        "test_device",
        "sync_device_clock",
        "manage_device_users",
        "view_employee",
        "view_rawattendance",
        "view_processedattendance",
        "process_processedattendance",
        "resend_processedattendance",
        "reset_failed_processedattendance",
        "view_deliverylog",
    ],
    # Read attendance and the pull feed of changes.
    "CRM": [
        "view_rawattendance",
        "view_processedattendance",
    ],
}


def create_groups(apps, schema_editor):
    core = apps.get_app_config("core")
    core.models_module = True
    create_contenttypes(core, verbosity=0, apps=apps)
    create_permissions(core, verbosity=0, apps=apps)
    core.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, codenames in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        perms = Permission.objects.filter(content_type__app_label="core", codename__in=codenames)
        missing = set(codenames) - set(perms.values_list("codename", flat=True))
        if missing:
            raise RuntimeError(f"Permissions missing for group {name}: {sorted(missing)}")
        group.permissions.add(*perms)


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=GROUPS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0010_punch_delivery_db_defaults"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="processedattendance",
            options={
                "ordering": ["-work_date", "user_id"],
                "permissions": [
                    ("resend_processedattendance", "Can resend daily records to the CRM"),
                    (
                        "process_processedattendance",
                        "Can run processing of punches into daily records",
                    ),
                    ("reset_failed_processedattendance", "Can make failed deliveries due again"),
                ],
                "verbose_name": "daily attendance",
                "verbose_name_plural": "daily attendance",
            },
        ),
        migrations.RunPython(create_groups, remove_groups),
    ]
