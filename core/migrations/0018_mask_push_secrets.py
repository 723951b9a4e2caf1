import re

from django.db import migrations
from django.db.models import Q

# Rejected USER lines (a clock's OPERLOG upload) kept a user's password, and a
# clock's answer to a command could keep a secret it reported: both are now
# stored through core.adms.command_shown, and so are the rows stored before,
# here with a copy of its rule as it was when this migration was written (a
# migration must not change with the code after it).
# The rows that can hold one are few (a USER line is rejected only without a
# usable PIN): they are read whole. The digest of a rejected line is of the
# bytes received and stays, so the same batch sent again still stores nothing.
_MAY_HOLD = ("passw", "pwd", "key=")
_SECRET_FIELD = re.compile(
    r"(?<![^\s,&])([~\w]*?(?:passwd|password|pwd|comm?key)=)[^\t\r\n,&]+", re.IGNORECASE
)


def command_shown(text: str) -> str:
    return _SECRET_FIELD.sub(r"\1***", text)


def mask(apps, schema_editor):
    for model, column in (("PushRejectedLine", "line"), ("DeviceCommand", "result")):
        rows = apps.get_model("core", model).objects
        candidates = Q()
        for text in _MAY_HOLD:
            candidates |= Q(**{f"{column}__icontains": text})
        for pk, value in rows.filter(candidates).values_list("pk", column).iterator():
            shown = command_shown(value)
            if shown != value:
                rows.filter(pk=pk).update(**{column: shown})


class Migration(migrations.Migration):
    dependencies = [("core", "0017_api_groups")]

    operations = [migrations.RunPython(mask, migrations.RunPython.noop)]
