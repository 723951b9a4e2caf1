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
        "view_timesheet",
        "auditlog.view_logentry",
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
        "view_punchdelivery",
        "resend_punchdelivery",
        "reset_failed_punchdelivery",
        "send_info_command",
        "send_check_command",
        "send_reboot_command",
        "send_reupload_command",
        "view_devicecommand",
        "view_pushrejectedline",
        "auditlog.view_logentry",
    ],
    # Read attendance and the pull feed of changes.
    "CRM": [
        "view_rawattendance",
        "view_processedattendance",
    ],
}


def create_groups(apps, schema_editor):
    for label in ("core", "auditlog"):
        config = apps.get_app_config(label)
        config.models_module = True
        create_contenttypes(config, verbosity=0, apps=apps)
        create_permissions(config, verbosity=0, apps=apps)
        config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, names in GROUPS.items():
        group, _ = Group.objects.get_or_create(name=name)
        # "codename" is a permission of core; "app.codename" one of another app.
        wanted = {tuple(n.split(".")) if "." in n else ("core", n) for n in names}
        perms = [
            perm
            for perm in Permission.objects.filter(
                codename__in={code for _, code in wanted}
            ).select_related("content_type")
            if (perm.content_type.app_label, perm.codename) in wanted
        ]
        missing = wanted - {(p.content_type.app_label, p.codename) for p in perms}
        if missing:
            raise RuntimeError(f"Permissions missing for group {name}: {sorted(missing)}")
        group.permissions.add(*perms)


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=GROUPS).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("core", "0016_feed_versions"),
        ("auditlog", "0017_add_actor_email"),
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
