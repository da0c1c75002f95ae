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
from drain import incr_app, loaded_worker  # (bench/ is not a package: run from bench/)

logging.basicConfig(level=logging.ERROR)
N = 3000
with incr_app() as app:
    for batch in (1, 16):
        w = loaded_worker(app, N, batch)
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
