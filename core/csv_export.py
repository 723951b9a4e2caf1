"""CSV downloads, for the admin and the API: cells written safely for a
spreadsheet, rows streamed as they are read.

Plain Django (no REST framework), so that the admin's downloads and the API's
(core.api.csv) share one way of writing a cell without the admin depending on
the API.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence

from django.http import StreamingHttpResponse

# A text cell starting with one of these is a formula to a spreadsheet; names
# come from clocks and people, so such a cell is written with a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class _Echo:
    """A file-like object whose write() hands back what it was given."""

    def write(self, value: str) -> str:
        return value


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
    """A streamed text/csv download of `rows` under these column names,
    saved as `filename`.csv."""
    response = StreamingHttpResponse(
        csv_lines(columns=columns, rows=rows), content_type="text/csv; charset=utf-8"
    )
    response["Content-Disposition"] = f'attachment; filename="{filename}.csv"'
    return response
