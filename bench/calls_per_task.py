"""Python function calls per task in a worker draining 3,000 INCR tasks (cProfile): a count
that does not move with the machine's load, for A/B runs where wall-clock figures are noise.

    cd bench && ../.venv/bin/python calls_per_task.py [--top]
"""

import cProfile
import io
import logging
import pstats
import sys

sys.path.insert(0, ".")
import redis

from minicelery import Client, JSONTransport, RedisBroker
from minicelery.redis_server import RedisServer
from minicelery.settings import load_settings
from minicelery.worker import Worker

logging.basicConfig(level=logging.ERROR)
N = 3000
with RedisServer() as server:
    counter = redis.Redis.from_url(server.url)
    app = Client(RedisBroker(JSONTransport(), url=server.url), default_queue="bench")

    @app.task
    def bump() -> int:
        return int(counter.incr("bench:counter"))

    for batch in (1, 16):
        app.start_many([bump() for _ in range(N)])
        settings = load_settings(
            worker={"queues": ["bench"], "idle_block_max": 1, "batch_size": batch},
            metrics={"enabled": False},
            logging={"level": "WARNING"},
        )
        w = Worker(app, settings)
        p = cProfile.Profile()
        p.enable()
        w.run(burst=True, install_signals=False)
        p.disable()
        st = pstats.Stats(p)
        print(f"batch {batch}: calls per task {st.total_calls / N:.0f}")
        if batch == 1 and "--top" in sys.argv:
            s = io.StringIO()
            pstats.Stats(p, stream=s).sort_stats("ncalls").print_stats(25)
            print(s.getvalue()[-4000:])
