"""One process of the elastic resume tests (tests/test_multihost_elastic.py):
  python -m tests.elastic_worker PORT PROCESS_ID NUM_PROCESSES WORKDIR OUT_DIR

Trains configs/demo.py:toy,tiny (6 steps, a checkpoint every 2, all kept) on a data 2 x
fsdp 2 mesh (with two processes: data across them, fsdp within each) through
`train.train.train`, resuming WORKDIR's latest checkpoint if any. Each process appends
its rows of every batch it takes to OUT_DIR/ids_<NUM_PROCESSES>_<PROCESS_ID>.jsonl
({"batch_index", "ids"}: the sample ids); process 0 prints `RESULT {"losses": ...}`."""

import json
import os
import sys

import numpy as np

from configs import demo
from train import train as T


class _Logged:
  """The run's data iterator, logging the sample ids of every batch it gives."""

  def __init__(self, it, path):
    self.it, self.path = it, path

  def __iter__(self):
    return self

  def __next__(self):
    index = self.it.get_state()["batch_index"]
    batch = next(self.it)
    with open(self.path, "a") as f:
      f.write(json.dumps({"batch_index": index, "ids": np.asarray(batch["sample_index"]).tolist()}) + "\n")
    return batch

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def main(port, pid, n, workdir, out):
  c = demo.get_config("toy,tiny")
  c.workdir, c.ckpt.keep, c.ckpt.async_save = workdir, 10, False
  c.mesh.update(data=2, fsdp=-1)   # parameters over fsdp, within each process of two
  if int(n) > 1:
    c.distributed.update(num_processes=int(n), process_id=int(pid), coordinator=f"localhost:{port}",
                         heartbeat_timeout_s=10, shutdown_timeout_s=10, initialization_timeout_s=120)
  T.init_distributed(c.distributed)
  make = T.make_data
  T.make_data = lambda *a, **kw: _Logged(make(*a, **kw), os.path.join(out, f"ids_{n}_{pid}.jsonl"))
  result = T.train(c)
  if pid == "0":
    print("RESULT " + json.dumps({"losses": result["losses"]}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
