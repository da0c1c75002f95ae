"""Send the demo's task graphs, then print each result as it arrives."""

import datetime

from demo_tasks import add_up, hello, multiply, report, square, unreliable, world


def main():
    handles = []

    # The original README's two examples.
    handles.append(hello("World!").start_at(datetime.datetime.now() + datetime.timedelta(seconds=2)))
    handles.append(hello(world().wait(1)))

    # Chains: square the square, then multiply it by 2.
    for n in range(1, 6):
        handles.append(multiply(square(square(n).start()), 2))

    # Fan-in: add up several squares once all of them are done.
    parents = [square(n) for n in range(6, 10)]
    handles.append(add_up(*parents).start())  # starting the child starts its unstarted parents

    # A task that fails now and then: its child receives the exception as its argument.
    for n in range(10):
        handles.append(report(unreliable(n).start()))

    for handle in handles:
        try:
            value = handle.result(timeout=60)
            print(f"  result of {handle.name}: {value!r}", flush=True)
        except Exception as exc:  # the demo shows failures, it does not stop on them
            print(f"  {handle.name} raised {exc!r}", flush=True)


if __name__ == "__main__":
    main()
