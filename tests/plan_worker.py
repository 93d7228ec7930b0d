"""One process of the two-process planning tests (tests/test_multihost_plan.py):
  python -m tests.plan_worker PORT PROCESS_ID ROOT DATA_JSON MODE FAULT
MODE: `independent` (each process plans by itself, then the plan hashes are compared)
or `shared` (make_pipeline: process 0 plans and broadcasts). FAULT: `none`, or
`transient:P` / `persistent:P` (OSError(EIO) probing v1, v4, v7 on process P: once, or
always). Prints one line `RESULT {json}`: the plan hash and the skipped ids."""

import json
import os
import sys

import jax

from llamavid_jax.data import pipeline as pl
from llamavid_jax.data import plan
from tests import data_fixtures as fx
from tests import plan_fixtures as pf


def main(port, pid, root, data, mode, fault):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", 2, int(pid), heartbeat_timeout_seconds=10)
  kind, _, on = fault.partition(":")
  faults = {f"v{i}.mp4": (1 if kind == "transient" else -1) for i in (1, 4, 7)} if on == pid else {}
  pf.FakeProbe(faults).install()
  cfg = pf.config(root, os.path.join(root, data), io_attempts=3, max_skip_rate=0.9,
                  plan_cache_dir=os.path.join(root, f"cache{pid}"))
  if mode == "independent":   # each process probes for itself (no manifest), then the hashes are compared
    p = pl.make_pipeline(cfg, fx.SPEC, shard_index=int(pid), shard_count=1)   # one shard: no collective
    p.processor.planned.clear()
    p.processor.planned.update(plan.compute_verdicts(p.processor, progress=False,
                                                     policy=plan.RetryPolicy(attempts=3)))
    p = pl.make_pipeline(cfg, fx.SPEC, shard_index=int(pid), shard_count=2, processor=p.processor)
    plan.check_same(p.plan.digest, "data plans")
  else:
    p = pl.make_pipeline(cfg, fx.SPEC, shard_index=int(pid), shard_count=2)
  print("RESULT " + json.dumps(dict(digest=p.plan.digest, skips=sorted(s.id for s in p.plan.skips),
                                    reasons=sorted({s.reason for s in p.plan.skips}))), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
