#!/bin/bash
# A/B: drain (in-process, batch 1 and 16) and idle latency (a worker process), alternating trees.
# usage: bench/ab.sh TREE_A TREE_B RUNS  (each tree a checkout with its own .venv: make .venv/.installed)
A=$1; B=$2; RUNS=${3:-5}
for i in $(seq 1 $RUNS); do
  for T in $A $B; do
    d=$(cd $T/bench && $T/.venv/bin/python drain.py --tasks 10000 --runs 1 --batch 1 16 2>/dev/null | grep "^run" | awk '{printf "%s ", $5}')
    l=$(cd $T/bench && $T/.venv/bin/python -c "
import run, statistics
from minicelery.redis_server import RedisServer
with RedisServer() as s:
    r = run.latency(run.Bench(s), 200)
print('%.2f %.2f' % (r['p50 ms'], r['p99 ms']))" 2>/dev/null)
    echo "$(basename $T) run$i drain_b1_b16: $d latency_p50_p99: $l"
  done
done
