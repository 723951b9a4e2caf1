"""ZK protocol facts shared by the reader (client.py) and the emulator.

Stdlib only: the emulator runs without Django.
"""

from datetime import datetime


def encode_time(moment: datetime) -> int:
    """The clock's u32 time of a naive local datetime (../shared/ZK_PROTOCOL.md §2.2).

    The format gives every month 31 days and covers the years 2000-2099; its
    values are not contiguous seconds, so never do arithmetic on them.
    """
    return (
        ((moment.year % 100) * 12 * 31 + (moment.month - 1) * 31 + moment.day - 1) * 86400
        + (moment.hour * 60 + moment.minute) * 60
        + moment.second
    )


def split_time(value: int) -> tuple[int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second) of a u32 time; the day may be 29-31
    in a month that has fewer."""
    value, second = divmod(value, 60)
    value, minute = divmod(value, 60)
    value, hour = divmod(value, 24)
    value, day = divmod(value, 31)
    year, month = divmod(value, 12)
    return year + 2000, month + 1, day + 1, hour, minute, second


def decode_time(value: int) -> datetime:
    """The naive local datetime of a u32 time; ValueError for a date that does not
    exist (say 31 February)."""
    return datetime(*split_time(value))
