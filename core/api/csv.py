"""CSV export of any list view: ?format=csv, streamed row by row.

`CSVExportMixin` goes before a list view's other bases; with ?format=csv its
list() streams the filtered queryset (every row, not a page) through the
view's serializer, the columns named and ordered as the JSON's fields, with a
header row. Rows are read with .iterator(), so a year of punches never sits
in memory. A view whose rows are not a queryset calls
core.csv_export.csv_response with any iterable of dicts; the cells are
written by core.csv_export.cell, as in the admin's downloads.
"""

from __future__ import annotations

from collections.abc import Mapping

from rest_framework.renderers import BaseRenderer

from core.csv_export import csv_lines, csv_response

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
        items = data.items() if isinstance(data, Mapping) else enumerate(data)
        rows = ({"field": key, "value": value} for key, value in items)
        return "".join(csv_lines(columns=("field", "value"), rows=rows)).encode()


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
