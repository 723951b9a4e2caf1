"""ZK protocol facts shared by the reader (client.py) and the emulator.

Stdlib only: the emulator runs without Django.
"""

import struct
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


# User records (../shared/ZK_PROTOCOL.md §4.1), as the device sends them and as
# pyzk writes them with CMD_USER_WRQ.
# 72-byte ZK8 (TCP): uid, privilege, password, name, card, pad, group_id, pad, user_id.
USER_72 = struct.Struct("<HB8s24sIx7sx24s")
# 28-byte ZK6 (UDP): uid, privilege, password, name, card, pad, group, timezone, user_id (u32).
USER_28 = struct.Struct("<HB5s8sIxBhI")
