"""Processing: raw punches → one ProcessedAttendance row per employee and work day.

The package, in the order a run uses it:

- planning.py: what a run must recompute (new punches since the watermark,
  the late-commit margin, anchors and settling, date ranges and `--full`);
- storage.py: reading punches and stored rows in bulk, writing the
  differences; the PostgreSQL and SQLite paths, side by side;
- shifts.py: punches → shifts → day values (pure);
- rules.py: the outlier rules, their overrides, the wording of reasons (pure);
- diff.py: computed days against stored rows: what to write (pure);
- services.py: the attendance_* functions below, each read → compute → write.

docs/processing.md describes the rules and why incremental runs are correct.
"""

from core.processing.services import (
    ProcessingResult,
    attendance_discard_edits,
    attendance_edit,
    attendance_mark_reviewed,
    attendance_process,
    attendance_recompute,
)

__all__ = [
    "ProcessingResult",
    "attendance_discard_edits",
    "attendance_edit",
    "attendance_mark_reviewed",
    "attendance_process",
    "attendance_recompute",
]
