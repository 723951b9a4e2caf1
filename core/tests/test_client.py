"""Decoders of the device's bulk buffers, on buffers built byte by byte."""

import datetime
import struct

import pytest

from core.zk.client import (
    DeviceProtocolError,
    decode_attendance,
    decode_device_time,
    decode_users,
    name_warnings,
    proven_count,
    record_counts,
)
from core.zk.protocol import encode_time

T1 = datetime.datetime(2026, 11, 2, 8, 1, 7)
T2 = datetime.datetime(2026, 11, 2, 17, 3, 59)


def blob(records: list[bytes]) -> bytes:
    body = b"".join(records)
    return struct.pack("<I", len(body)) + body


def record_40(uid, user_id, status, moment, punch, extra=b""):
    raw = struct.pack(
        "<H24sB4sB8s",
        uid,
        user_id.encode(),
        status,
        struct.pack("<I", encode_time(moment)),
        punch,
        b"\x00\x00\x00\x00\xff\x00\x00\x00",
    )
    return raw + extra


def test_time_codec_round_trips_across_years_and_leap_days():
    for moment in [
        datetime.datetime(2000, 1, 1, 0, 0, 0),
        datetime.datetime(2024, 2, 29, 23, 59, 58),
        datetime.datetime(2026, 12, 31, 12, 30, 1),
        datetime.datetime(2099, 6, 15, 6, 5, 4),
    ]:
        assert decode_device_time(encode_time(moment)) == (moment, None)


def test_time_decoder_flags_a_date_that_does_not_exist():
    # The device calendar gives every month 31 days: 2026-02-30 is encodable.
    value = ((26 * 12 + 1) * 31 + 29) * 86400 + (9 * 60 + 15) * 60
    moment, problem = decode_device_time(value)
    assert problem == "device date 2026-02-30 does not exist"
    assert moment == datetime.datetime(2026, 3, 2, 9, 15)


def test_40_byte_records_decode_user_id_time_status_and_punch():
    buffer = blob([record_40(1, "1001", 1, T1, 0), record_40(2, "123456789", 15, T2, 1)])
    punches = decode_attendance(buffer, 2)
    assert [(p.user_id, p.timestamp, p.status, p.punch, p.problem) for p in punches] == [
        ("1001", T1, 1, 0, None),
        ("123456789", T2, 15, 1, None),
    ]


def test_longer_records_of_newer_firmware_are_stepped_by_their_own_size():
    # SpeedFace-style 49-byte records: the 40-byte layout plus 9 more bytes.
    buffer = blob(
        [record_40(1, "7", 15, T1, 0, b"\xaa" * 9), record_40(2, "8", 15, T2, 1, b"\xbb" * 9)]
    )
    punches = decode_attendance(buffer, 2)
    assert [(p.user_id, p.timestamp, p.punch) for p in punches] == [("7", T1, 0), ("8", T2, 1)]


def test_16_byte_records_carry_a_numeric_user_id():
    records = [
        struct.pack("<I4sBB2sI", 1001, struct.pack("<I", encode_time(T1)), 1, 0, b"\0\0", 0),
        struct.pack("<I4sBB2sI", 42, struct.pack("<I", encode_time(T2)), 4, 1, b"\0\0", 7),
    ]
    punches = decode_attendance(blob(records), 2)
    assert [(p.user_id, p.timestamp, p.status, p.punch) for p in punches] == [
        ("1001", T1, 1, 0),
        ("42", T2, 4, 1),
    ]


def test_8_byte_records_map_the_internal_uid_to_the_user_id():
    records = [
        struct.pack("<HBBI", 3, 1, 0, encode_time(T1)),
        struct.pack("<HBBI", 4, 1, 1, encode_time(T2)),
    ]
    punches = decode_attendance(blob(records), 2, user_ids_by_uid={3: "1003", 4: "17"})
    assert [(p.user_id, p.timestamp, p.punch, p.problem) for p in punches] == [
        ("1003", T1, 0, None),
        ("17", T2, 1, None),
    ]


def test_8_byte_record_of_an_unknown_uid_is_never_credited_to_the_user_id_equal_to_it():
    # uid 17 has no user on the device; user id "17" belongs to someone else (uid 4).
    records = [struct.pack("<HBBI", 17, 1, 0, encode_time(T1))]
    (punch,) = decode_attendance(blob(records), 1, user_ids_by_uid={3: "1003", 4: "17"})
    assert punch.user_id == "uid:17"
    assert punch.problem == "uid 17 matches no user on the device"


def test_8_byte_record_with_an_unknown_uid_and_an_impossible_date_names_both_problems():
    feb_30 = ((26 * 12 + 1) * 31 + 29) * 86400
    (punch,) = decode_attendance(blob([struct.pack("<HBBI", 5, 1, 0, feb_30)]), 1)
    assert punch.problem == (
        "device date 2026-02-30 does not exist; uid 5 matches no user on the device"
    )


def test_a_truncated_buffer_is_a_protocol_error_not_a_short_log():
    buffer = blob([record_40(1, "1", 1, T1, 0), record_40(2, "2", 1, T2, 0)])
    with pytest.raises(DeviceProtocolError, match="cut short"):
        decode_attendance(buffer[:-10], 2)


def test_a_count_that_does_not_divide_the_buffer_is_a_protocol_error():
    buffer = blob([record_40(1, "1", 1, T1, 0), record_40(2, "2", 1, T2, 0)])
    with pytest.raises(DeviceProtocolError, match="not a whole number of records"):
        decode_attendance(buffer, 3)


def test_an_unknown_record_size_is_a_protocol_error():
    with pytest.raises(DeviceProtocolError, match="unknown attendance record size 12"):
        decode_attendance(blob([b"\x01" * 12]), 1)


@pytest.mark.parametrize("size", [41, 48, 50, 80])
def test_a_stride_of_40_bytes_or_more_that_is_no_known_layout_is_refused(size):
    # Two 40-byte records read with a count of one would otherwise decode as
    # one 80-byte record, silently dropping the second punch.
    with pytest.raises(DeviceProtocolError, match=f"unknown attendance record size {size}"):
        decode_attendance(blob([b"\x01" * size]), 1)


def test_record_counts_accept_only_known_sizes_within_the_counts_read():
    assert record_counts(400, low=10, high=10, sizes=(8, 16, 40, 49)) == [10]
    assert record_counts(440, low=10, high=10, sizes=(8, 16, 40, 49)) == []
    # The device recorded one punch during the read: 11 records, between 10 and 12.
    assert record_counts(440, low=10, high=12, sizes=(8, 16, 40, 49)) == [11]
    # 80 bytes are 10 eight-byte or 5 sixteen-byte records: both are in 5..10.
    assert record_counts(80, low=5, high=10, sizes=(8, 16, 40, 49)) == [10, 5]
    assert record_counts(0, low=0, high=3, sizes=(8, 16)) == [0]
    assert record_counts(0, low=1, high=3, sizes=(8, 16)) == []


ATTENDANCE_SIZES = (8, 16, 40, 49)


def never_read() -> int:
    raise AssertionError("the counts were read again although the first ones proved the buffer")


def test_a_buffer_that_fits_the_count_read_before_needs_no_second_read():
    buffer = blob([record_40(1, "1", 1, T1, 0)] * 3)
    count = proven_count(
        buffer, before=3, read_after=never_read, sizes=ATTENDANCE_SIZES, what="records"
    )
    assert count == 3


def test_a_log_that_grew_during_the_read_is_proven_by_the_count_read_after():
    buffer = blob([record_40(1, "1", 1, T1, 0)] * 4)
    count = proven_count(
        buffer, before=3, read_after=lambda: 5, sizes=ATTENDANCE_SIZES, what="records"
    )
    assert count == 4


def test_bytes_that_fit_no_known_layout_for_the_counts_read_fail_saying_what_came():
    buffer = blob([b"\x01" * 41] * 4)
    with pytest.raises(DeviceProtocolError) as caught:
        proven_count(buffer, before=4, read_after=lambda: 4, sizes=ATTENDANCE_SIZES, what="records")
    assert str(caught.value).startswith(
        "the device sent 164 bytes of records while reporting 4; at the record sizes this "
        "bridge knows (8, 16, 40, 49 bytes) it fits none, so nothing was stored."
    )


def test_bytes_that_fit_two_layouts_between_the_counts_are_refused_as_ambiguous():
    # 160 bytes: 10 sixteen-byte records or 20 eight-byte ones, both between 9 and 20.
    with pytest.raises(
        DeviceProtocolError, match="it fits 20 records of 8 bytes and 10 records of 16 bytes"
    ):
        proven_count(
            blob([b"\x00" * 160]),
            before=9,
            read_after=lambda: 20,
            sizes=ATTENDANCE_SIZES,
            what="records",
        )


def test_after_the_log_was_cleared_only_the_new_count_proves_the_buffer():
    buffer = blob([record_40(1, "1", 1, T1, 0)] * 2)
    count = proven_count(
        buffer, before=7, read_after=lambda: 2, sizes=ATTENDANCE_SIZES, what="records"
    )
    assert count == 2
    with pytest.raises(DeviceProtocolError, match="7 before the read and 3 after"):
        proven_count(buffer, before=7, read_after=lambda: 3, sizes=ATTENDANCE_SIZES, what="records")


def test_72_byte_users_decode_names_and_string_user_ids():
    raw = struct.pack("<HB8s24sIx7sx24s", 5, 14, b"pw", "Ana Silvã".encode(), 99, b"1", b"A-1001")
    (user,) = decode_users(blob([raw]), 1)
    assert (user.uid, user.user_id, user.name, user.privilege, user.password, user.card) == (
        5,
        "A-1001",
        "Ana Silvã",
        14,
        "pw",
        99,
    )
    assert user.group_id == "1"


def test_28_byte_users_decode_numeric_user_ids():
    raw = struct.pack("<HB5s8sIxBhI", 2, 0, b"", b"Rui", 0, 1, 0, 1002)
    (user,) = decode_users(blob([raw]), 1)
    assert (user.uid, user.user_id, user.name, user.group_id) == (2, "1002", "Rui", "1")


def test_an_empty_table_decodes_to_nothing_without_reading_the_buffer():
    assert decode_attendance(b"", 0) == []
    assert decode_users(b"", 0) == []


def test_a_record_with_a_date_that_does_not_exist_is_decoded_and_named():
    feb_30 = ((26 * 12 + 1) * 31 + 29) * 86400 + (7 * 60 + 59) * 60 + 1
    raw = struct.pack("<H24sBIB8x", 1, b"1001", 1, feb_30, 0)
    (punch,) = decode_attendance(blob([raw]), 1)
    assert punch.timestamp == datetime.datetime(2026, 3, 2, 7, 59, 1)
    assert punch.problem == "device date 2026-02-30 does not exist"


def user_72(uid, user_id, name: bytes) -> bytes:
    return struct.pack("<HB8s24sIx7sx24s", uid, 0, b"", name, 0, b"", user_id.encode())


def test_names_decode_in_the_device_encoding():
    raw = user_72(1, "1001", "Иван Петров".encode("cp1251"))
    (user,) = decode_users(blob([raw]), 1, encoding="cp1251")
    assert (user.name, user.name_problem) == ("Иван Петров", "")
    assert name_warnings([user], encoding="cp1251") == []


def test_a_name_not_valid_in_the_device_encoding_is_kept_and_reported():
    raw = [user_72(1, "1001", "Иван".encode("cp1251")), user_72(2, "1002", b"Rui")]
    users = decode_users(blob(raw), 2, encoding="utf-8")
    assert "\ufffd" in users[0].name and users[0].name_problem == "not valid utf-8"
    assert (users[1].name, users[1].name_problem) == ("Rui", "")
    (warning,) = name_warnings(users, encoding="utf-8")
    assert "1 user name(s) are not valid utf-8" in warning
    assert "user 1001" in warning and "device's Encoding" in warning and "cp1251" in warning


def test_utf8_names_read_with_a_single_byte_code_page_are_reported():
    raw = user_72(1, "1001", "João Gonçalves".encode())
    (user,) = decode_users(blob([raw]), 1, encoding="cp1252")
    assert user.name_problem == "valid UTF-8"
    (warning,) = name_warnings([user], encoding="cp1252")
    assert "look like UTF-8" in warning and "UTF-8" in warning


def test_a_name_cut_mid_character_by_the_field_size_is_not_reported():
    # 24 bytes of UTF-8 ending in the first byte of "ã": the clock cut it there.
    name = ("Anas " + "ã" * 9).encode() + "ã".encode()[:1]
    assert len(name) == 24
    (user,) = decode_users(blob([user_72(1, "1001", name)]), 1)
    assert user.name_problem == ""
    assert user.name == "Anas " + "ã" * 9
