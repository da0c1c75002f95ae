"""The public API of the original README, run against a real Redis."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import redis
from conftest import wait_until
from helpers import drain

from minicelery import (
    Client,
    DependencyError,
    DuplicateTaskError,
    JSONTransport,
    PayloadTooLarge,
    RedisBroker,
    RemoteError,
)
from minicelery.errors import SerializationError, TaskError, TaskNotFound


def test_calling_a_task_sends_nothing_until_start(app: Client, r: redis.Redis) -> None:
    handle = app.tasks["echo"](1)
    assert handle.state == "created"
    assert r.llen(f"minicelery:{{{app.default_queue}}}:ready") == 0
    assert handle.start() is handle
    assert handle.state == "ready"
    assert len(handle.id) == 14 and handle.id.isalnum()  # 83 random bits, letters and digits


def test_start_then_result_returns_the_value(app: Client) -> None:
    handle = app.tasks["echo"]({"a": [1, 2]}).start()
    drain(app)
    assert handle.state == "succeeded"
    assert handle.result(timeout=5) == {"a": [1, 2]}


def test_a_task_that_returns_nothing_gives_none_to_its_waiter_and_its_child(app: Client) -> None:
    @app.task
    def nothing() -> None:
        return None

    parent = nothing()
    child = app.tasks["echo"](parent).start()
    parent.start()
    drain(app)
    assert parent.result(timeout=5) is None
    assert child.result(timeout=5) is None


def test_original_readme_world_wait_feeds_hello(app: Client) -> None:
    world = app.tasks["echo"]("World!").wait(0.3)
    hello = app.tasks["describe"](world)  # registered at once, waiting for its parent
    assert hello.state == "waiting"
    assert world.state == "scheduled"
    drain(app)  # nothing is due yet
    assert world.state == "scheduled"
    wait_until(lambda: drain(app) and hello.state == "succeeded", what="hello to run after world")
    assert world.result(timeout=1) == "World!"
    assert hello.result(timeout=1) == "value:'World!'"


def test_original_readme_start_at_a_past_time_runs_at_once(app: Client) -> None:
    handle = app.tasks["describe"]("World!").start_at(dt.datetime(2017, 1, 27, 13))
    assert handle.state == "ready"
    drain(app)
    assert handle.result(timeout=5) == "value:'World!'"


def test_start_at_with_aware_and_naive_datetimes_are_scheduled_at_that_instant(app: Client, r: redis.Redis) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    aware = app.tasks["echo"](1).start_at(soon)
    naive = app.tasks["echo"](2).start_at(soon.astimezone().replace(tzinfo=None))  # local time
    scores = dict(r.zrange(f"minicelery:{{{app.default_queue}}}:scheduled", 0, -1, withscores=True))
    assert scores[aware.id.encode()] == pytest.approx(soon.timestamp() * 1000, abs=1)
    assert scores[naive.id.encode()] == scores[aware.id.encode()]


def test_wait_accepts_a_timedelta(app: Client) -> None:
    handle = app.tasks["echo"](1).wait(dt.timedelta(minutes=5))
    assert handle.state == "scheduled"


def test_result_times_out_with_timeout_error(app: Client) -> None:
    handle = app.tasks["echo"](1).start()
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.2)


def test_result_of_a_task_never_started_is_an_error(app: Client) -> None:
    with pytest.raises(TaskError, match="never started"):
        app.tasks["echo"](1).result(timeout=1)


def test_failed_task_raises_its_builtin_exception(app: Client) -> None:
    handle = app.tasks["boom"]("bad things").start()
    drain(app)
    assert handle.state == "failed"
    with pytest.raises(ValueError, match="bad things") as info:
        handle.result(timeout=5)
    assert "in boom" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_custom_exception_comes_back_as_remote_error_with_traceback(app: Client) -> None:
    handle = app.tasks["custom_boom"]("nope").start()
    drain(app)
    with pytest.raises(RemoteError) as info:
        handle.result(timeout=5)
    assert info.value.type_name == "CustomError"
    assert info.value.message == "nope"
    assert "raise CustomError(message)" in info.value.traceback


def test_two_functions_under_one_name_fail_at_registration(app: Client) -> None:
    with pytest.raises(DuplicateTaskError, match="echo"):

        @app.task(name="echo")
        def other(value: object) -> object:
            return value


def test_task_options_are_kept_apart_from_task_arguments(app: Client) -> None:
    @app.task(name="options_demo", retries=2, time_limit=3)
    def options_demo(delay: int, queue: str) -> str:
        return f"{delay}/{queue}"

    handle = options_demo(delay=5, queue="q").start()
    drain(app)
    assert handle.result(timeout=5) == "5/q"
    assert options_demo.retries == 2 and options_demo.time_limit == 3


def test_broker_takes_result_ttl_and_rejects_a_bad_one(redis_url: str) -> None:
    assert RedisBroker(JSONTransport(), url=redis_url, result_ttl=5).result_ttl == 5
    with pytest.raises(ValueError, match="result_ttl"):
        RedisBroker(JSONTransport(), url=redis_url, result_ttl=0)


def test_broker_url_comes_from_the_environment_when_not_given(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setenv("MINICELERY_REDIS__URL", redis_url)
    broker = RedisBroker(JSONTransport())
    assert broker.url == redis_url
    broker.ping()


def test_nested_task_in_a_list_is_rejected_naming_the_argument(app: Client) -> None:
    parent = app.tasks["echo"](1)
    with pytest.raises(DependencyError, match="argument 0"):
        app.tasks["echo"]([parent])
    with pytest.raises(DependencyError, match="keyword argument 'value'"):
        app.tasks["echo"](value={"x": parent})


def test_passing_a_task_function_instead_of_calling_it_is_a_type_error_saying_to_call_it(
    app: Client, r: redis.Redis
) -> None:
    echo, describe = app.tasks["echo"], app.tasks["describe"]
    with pytest.raises(
        TypeError, match=r"argument 0 of task 'describe' is the task function 'echo' itself.*pass echo\(\)"
    ):
        describe(echo)
    with pytest.raises(TypeError, match=r"keyword argument 'value' of task 'describe' .*pass echo\(\) — call the task"):
        describe(value=echo)
    with pytest.raises(TypeError, match="argument 0 of task 'describe' contains the task function 'echo'"):
        describe([echo])
    assert r.keys(f"minicelery:{{{app.default_queue}}}:*") == []  # nothing was sent


def test_start_at_with_a_date_or_a_string_is_a_type_error_naming_the_datetime_to_pass(app: Client) -> None:
    handle = app.tasks["echo"](1)
    with pytest.raises(TypeError, match=r"not date .*pass datetime\.datetime\(2017, 1, 27\)"):
        handle.start_at(dt.date(2017, 1, 27))
    with pytest.raises(TypeError, match=r"pass datetime\.datetime\.fromisoformat\('2017-01-27T13:00'\)"):
        handle.start_at("2017-01-27T13:00")  # type: ignore[arg-type]
    assert handle.state == "created"


@pytest.mark.parametrize(("delay", "fix"), [("5", ": pass 5$"), ("soon", "not str 'soon'$"), (True, "not bool True$")])
def test_wait_with_a_string_or_a_bool_is_a_type_error_asking_for_seconds(app: Client, delay: object, fix: str) -> None:
    handle = app.tasks["echo"](1)
    with pytest.raises(TypeError, match="wait\\(\\) takes a number of seconds or a datetime.timedelta.*" + fix):
        handle.wait(delay)  # type: ignore[arg-type]
    assert handle.state == "created"


@pytest.mark.parametrize("delay", [-1, float("nan"), float("inf"), dt.timedelta(seconds=-1)])
def test_wait_with_a_negative_or_non_finite_delay_is_a_value_error(app: Client, delay: float | dt.timedelta) -> None:
    handle = app.tasks["echo"](1)
    with pytest.raises(ValueError, match="finite delay of 0 seconds or more"):
        handle.wait(delay)
    assert handle.state == "created"


def test_a_child_with_parents_rejects_a_bad_delay_before_rescheduling(app: Client) -> None:
    child = app.tasks["describe"](app.tasks["echo"](1))  # registered at once, waiting
    with pytest.raises(TypeError):
        child.wait("5")  # type: ignore[arg-type]
    assert child.state == "waiting"


def test_an_argument_json_cannot_encode_is_refused_at_send_naming_that_argument(app: Client) -> None:
    handle = app.tasks["echo"](value={"when": dt.datetime(2017, 1, 27)})
    with pytest.raises(SerializationError, match=r"keyword argument 'value' of task 'echo' .*type datetime"):
        handle.start()
    with pytest.raises(SerializationError, match=r"argument 0 of task 'echo' .*Out of range float"):
        app.tasks["echo"](float("nan")).start()
    assert handle.state == "created"


def test_parent_on_another_queue_is_rejected(app: Client, redis_url: str) -> None:
    @app.task(queue="elsewhere")
    def far() -> int:
        return 1

    with pytest.raises(DependencyError, match="share a queue"):
        app.tasks["echo"](far())


def test_oversize_argument_is_refused_at_enqueue_and_nothing_is_stored(redis_url: str, queue: str) -> None:
    small = Client(
        RedisBroker(JSONTransport(max_payload_bytes=1000), url=redis_url, result_ttl=60), default_queue=queue
    )
    Client.instances.remove(small)

    @small.task
    def take(blob: str) -> int:
        return len(blob)

    handle = take("x" * 5000)
    with pytest.raises(PayloadTooLarge, match="over the limit of 1000 bytes"):
        handle.start()
    assert handle.state == "created"
    assert small.broker.depths(queue)["ready"] == 0


def test_many_concurrent_waiters_all_get_the_result(app: Client, workers) -> None:
    handle = app.tasks["sleep_for"](0.5).start()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(handle.result(timeout=30))) for _ in range(20)]
    for thread in threads:
        thread.start()
    workers.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [0.5] * 20


def test_a_handle_by_id_finds_a_task_of_another_queue_and_says_where_it_looked_otherwise(app: Client) -> None:
    other = f"{app.default_queue}-other"

    @app.task(queue=other)
    def shout(text: str) -> str:
        return text.upper()

    sent = shout("hi").start()
    drain(app, queues=[other])
    assert app.handle(sent.id).result(timeout=5) == "HI"  # no queue= needed, as Celery's AsyncResult(id)
    assert app.handle(sent.id).queue == other
    with pytest.raises(TaskNotFound, match=f"not stored on queue '{app.default_queue}'.*queue="):
        app.handle("nosuchtask0000").result(timeout=1)
