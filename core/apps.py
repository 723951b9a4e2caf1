from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class CoreConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "core"
    verbose_name = "Attendance"


class BridgeAdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin, with the HR status page as the admin's first page
    (settings.INSTALLED_APPS names it in place of django.contrib.admin)."""

    # Not the default config of the core app, which stays CoreConfig.
    default = False
    default_site = "core.admin_status.BridgeAdminSite"
