"""CSV export of any list view: ?format=csv, streamed row by row.

`CSVExportMixin` goes before a list view's other bases; with ?format=csv its
list() streams the filtered queryset (every row, not a page) through the
view's serializer, the columns named and ordered as the JSON's fields, with a
header row. Rows are read with .iterator(), so a year of punches never sits
in memory. A view whose rows are not a queryset calls `csv_response` with
any iterable of dicts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence

from django.http import StreamingHttpResponse
from rest_framework.renderers import BaseRenderer

CHUNK_ROWS = 2000


class CSVRenderer(BaseRenderer):
    """Makes ?format=csv acceptable. Lists are streamed by CSVExportMixin; what
    reaches render() is a single answer (a row, or an error), written as
    field,value lines."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if data is None:
            return b""
        buffer = _Echo()
        writer = csv.writer(buffer)
        lines = [writer.writerow(["field", "value"])]
        items = data.items() if isinstance(data, Mapping) else enumerate(data)
        lines += [writer.writerow([key, cell(value)]) for key, value in items]
        return "".join(lines).encode()


class _Echo:
    """A file-like object whose write() hands back what it was given."""

    def write(self, value: str) -> str:
        return value


# A text cell starting with one of these is a formula to a spreadsheet; names
# come from clocks and people, so such a cell is written with a leading quote,
# as the admin's timesheet download does.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(value) -> str:
    """One CSV cell: empty for null, true/false, JSON for lists and objects;
    text a spreadsheet would run as a formula gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return str(value)


def csv_lines(*, columns: Sequence[str], rows: Iterable[Mapping]) -> Iterable[str]:
    """The header line, then one line per row (values picked by column name)."""
    writer = csv.writer(_Echo())
    yield writer.writerow(columns)
    for row in rows:
        yield writer.writerow([cell(row.get(column)) for column in columns])


def csv_response(
    *, columns: Sequence[str], rows: Iterable[Mapping], filename: str
) -> StreamingHttpResponse:
    """A streamed text/csv download of `rows` under these column names."""
    response = StreamingHttpResponse(
        csv_lines(columns=columns, rows=rows), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    return response


class CSVExportMixin:
    """Streams list() as CSV when the request asked for ?format=csv."""

    csv_filename = "export"

    def list(self, request, *args, **kwargs):
        renderer = getattr(request, "accepted_renderer", None)
        if renderer is None or renderer.format != CSVRenderer.format:
            return super().list(request, *args, **kwargs)
        queryset = self.filter_queryset(self.get_queryset())
        serializer = self.get_serializer()
        columns = [name for name, field in serializer.fields.items() if not field.write_only]
        rows = (serializer.to_representation(obj) for obj in queryset.iterator(CHUNK_ROWS))
        return csv_response(columns=columns, rows=rows, filename=self.csv_filename)
