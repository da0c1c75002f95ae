"""The payload format: version 3 is an array without what Redis already knows; 1 and 2 are still read."""

from __future__ import annotations

import pytest

from minicelery import JSONTransport, SerializationError
from minicelery.transport import TaskMessage


def test_a_payload_carries_only_the_fields_that_differ_from_their_defaults() -> None:
    transport = JSONTransport()
    plain = TaskMessage(id="ab" * 12, name="send_mail", args=[42])
    assert transport.dumps_message(plain) == b'[3,"send_mail",[42]]'  # no id: its key says it
    full = TaskMessage("ab" * 12, "add", [None, 1], {"k": 2}, {"0": "p1"}, {"x": "p2"}, 5.0, 3)
    for message in (plain, full):
        assert transport.loads_message(transport.dumps_message(message), message.id) == message


def test_a_version_1_payload_enqueued_before_an_upgrade_is_still_read() -> None:
    v1 = b'{"v":1,"id":"t1","name":"echo","args":[1],"kwargs":{},"arg_deps":{},"kwarg_deps":{},'
    v1 += b'"time_limit":null,"retries":0}'
    assert JSONTransport().loads_message(v1, "t1") == TaskMessage("t1", "echo", [1])
    with pytest.raises(SerializationError, match="'id' is not part of version 2"):
        JSONTransport().loads_message(b'{"v":2,"id":"t1","name":"echo"}', "t1")


def test_version_2_payloads_enqueued_before_an_upgrade_are_still_read_and_bad_arrays_are_refused() -> None:
    transport = JSONTransport()
    assert transport.loads_message(b'{"v":2,"name":"echo","args":[1],"retries":2}', "t1") == TaskMessage(
        "t1", "echo", [1], retries=2
    )
    for bad, said in (
        (b'[2,"echo",[1]]', "must be \\[3, name, args, fields\\]"),
        (b'[3,"echo",[1],{"id":"x"}]', "fields must be an object of kwargs"),
        (b'[3,"echo",{"a":1}]', "'args' is missing or of the wrong type"),
    ):
        with pytest.raises(SerializationError, match=said):
            transport.loads_message(bad, "t1")
