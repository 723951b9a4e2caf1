"""Who may call what: a login, then the Django permissions an action declares.

A view declares `action_permissions`, a map from its action (a viewset's
action name, or an HTTP method for a plain APIView) to the permissions it
needs. An action it does not list needs Django's model permission for the
method: `view_` to read, `add_` to create, `change_` to update, `delete_` to
delete. A view with neither fails closed: nobody may call it.

A method the view does not handle at all (TRACE, or PUT on a read-only list)
is answered 405 to a logged-in user, as DRF would answer it after the check:
no permission can allow it, so naming one would mislead.
"""

from rest_framework.exceptions import MethodNotAllowed
from rest_framework.permissions import BasePermission

METHOD_ACTIONS = {
    "GET": "view",
    "HEAD": "view",
    "OPTIONS": "view",
    "POST": "add",
    "PUT": "change",
    "PATCH": "change",
    "DELETE": "delete",
}


def required_permissions(request, view) -> list[str] | None:
    """The permissions this request needs, or None when the view declares none."""
    declared = getattr(view, "action_permissions", {})
    action = getattr(view, "action", None)
    if action == "metadata":  # OPTIONS on a viewset: reading what it takes
        action = "list" if "list" in declared else None
    for key in (action, request.method):
        if key in declared:
            return list(declared[key])
    queryset = getattr(view, "queryset", None)
    if queryset is None or request.method not in METHOD_ACTIONS:
        return None
    meta = queryset.model._meta
    return [f"{meta.app_label}.{METHOD_ACTIONS[request.method]}_{meta.model_name}"]


class ActionPermissions(BasePermission):
    message = "You do not have the permission this action needs."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active):
            return False
        method = request.method.lower()
        if method not in view.http_method_names or getattr(view, method, None) is None:
            raise MethodNotAllowed(request.method)
        needed = required_permissions(request, view)
        if needed is None:
            return False
        if not user.has_perms(needed):
            missing = [perm for perm in needed if not user.has_perm(perm)]
            self.message = f"This needs the permission {', '.join(missing)}."
            return False
        return True
