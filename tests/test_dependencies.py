"""Task graphs by composition: chains, fan-in, failures passed on as arguments."""

from __future__ import annotations

import pytest
from helpers import drain

from minicelery import Client, RemoteError


def test_child_receives_each_parents_result_in_place(app: Client) -> None:
    add, echo = app.tasks["add"], app.tasks["echo"]
    a, b = echo(2).start(), echo(3).start()
    total = add(a, 10, b)
    drain(app)
    assert total.result(timeout=5) == 15


def test_keyword_argument_dependency(app: Client) -> None:
    child = app.tasks["describe"](value=app.tasks["echo"](7).start())
    drain(app)
    assert child.result(timeout=5) == "value:7"


def test_fan_in_of_many_parents_waits_for_all(app: Client) -> None:
    parents = [app.tasks["echo"](n) for n in range(20)]
    child = app.tasks["add"](*parents)
    for parent in parents[:19]:
        parent.start()
    drain(app)
    assert child.state == "waiting"
    parents[19].start()
    drain(app)
    assert child.result(timeout=5) == sum(range(20))


def test_long_chain_runs_in_order(app: Client) -> None:
    add = app.tasks["add"]
    head = app.tasks["echo"](0)
    tail = head
    for _ in range(50):
        tail = add(tail, 1)
    head.start()
    drain(app)
    assert tail.result(timeout=5) == 50


def test_starting_a_child_starts_parents_never_started(app: Client) -> None:
    echo, add = app.tasks["echo"], app.tasks["add"]
    grandparent = echo(1)
    parent = add(grandparent, 1)
    child = add(parent, 1)
    assert grandparent.state == "created"
    child.start()
    assert grandparent.state == "ready"
    drain(app)
    assert child.result(timeout=5) == 3


def test_a_parent_never_started_leaves_its_child_waiting(app: Client) -> None:
    child = app.tasks["describe"](app.tasks["echo"](1))
    drain(app)
    assert child.state == "waiting"


def test_parent_finished_before_child_was_made_still_feeds_it(app: Client) -> None:
    parent = app.tasks["echo"]("early").start()
    drain(app)
    child = app.tasks["describe"](parent)
    assert child.state == "ready"
    drain(app)
    assert child.result(timeout=5) == "value:'early'"


def test_exception_propagates_through_a_three_level_chain(app: Client) -> None:
    boom, describe = app.tasks["boom"], app.tasks["describe"]
    first = boom("deep").start()
    second = describe(first)
    third = describe(second)
    drain(app)
    with pytest.raises(ValueError, match="deep"):
        first.result(timeout=5)
    assert second.result(timeout=5) == "error:ValueError:deep"
    assert third.result(timeout=5) == "value:'error:ValueError:deep'"


def test_child_of_a_failed_parent_that_ignores_the_error_fails_itself(app: Client) -> None:
    child = app.tasks["add"](app.tasks["custom_boom"]("x").start(), 1)
    drain(app)
    with pytest.raises(TypeError):
        child.result(timeout=5)


def test_custom_parent_error_reaches_child_as_remote_error(app: Client) -> None:
    @app.task
    def inspect_error(value: object) -> list[str]:
        assert isinstance(value, RemoteError)
        return [value.type_name, value.message, ("custom_boom" in value.traceback and "tb") or ""]

    child = inspect_error(app.tasks["custom_boom"]("bad").start())
    drain(app)
    assert child.result(timeout=5) == ["CustomError", "bad", "tb"]


def test_child_wait_delays_it_after_its_parents(app: Client) -> None:
    parent = app.tasks["echo"](1)
    child = app.tasks["describe"](parent).wait(3600)
    assert parent.state == "ready"  # .wait on the child started its parent
    drain(app)
    assert child.state == "scheduled"
