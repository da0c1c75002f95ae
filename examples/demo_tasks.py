"""The original README's demo tasks: squaring, multiplying, a task that fails now and then."""

import random

from minicelery import Client, JSONTransport, RedisBroker

transport = JSONTransport()
broker = RedisBroker(transport)  # the URL comes from settings: $MINICELERY_REDIS__URL here
app = Client(broker)


@app.task
def hello(thing):
    print(f"Hello {thing}!", flush=True)


@app.task
def world():
    return "World!"


@app.task
def square(x):
    result = x * x
    print(f"{x} squared is {result}", flush=True)
    return result


@app.task
def multiply(a, b):
    result = a * b
    print(f"{a} multiplied by {b} is {result}", flush=True)
    return result


@app.task
def add_up(*numbers):
    total = sum(numbers)
    print(f"{' + '.join(map(str, numbers))} = {total}", flush=True)
    return total


@app.task
def unreliable(x):
    if random.random() < 0.3:
        raise ValueError(f"unlucky {x}")
    return x


@app.task
def report(value):
    if isinstance(value, Exception):
        print(f"a parent task failed, so this child got its exception: {value!r}", flush=True)
        return "failed"
    print(f"parent succeeded with {value}", flush=True)
    return "ok"
