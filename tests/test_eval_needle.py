"""eval.needle: the accuracy table, needle.json and the heat map on a fake predictor,
the flags (checked before any model loads), and one tiny end-to-end run."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval import needle
from llamavid_jax.data import synthetic
from llamavid_jax.data.video import load_video
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(tmp_path, **kw):
  a = dict(ckpt="fake_model", lengths=[4, 8], depths=[0.0, 50.0, 100.0], per_cell=2, seed=0, out=str(tmp_path / "out"))
  a.update(kw)
  return argparse.Namespace(**a)


def _wrong(color):
  return "blue" if color != "blue" else "red"


def fake_predict(asked):
  """Right for every clip of (4, 0) and (8, 100), for clip 0 only of (8, 50); no answer
  (unreadable media) for clip 1 of (4, 100); wrong elsewhere."""
  def predict(its):
    asked.append([it.meta["length"] for it in its])
    out = []
    for it in its:
      m = it.meta
      cell = (m["length"], m["depth"])
      if cell == (4, 100.0) and m["index"] == 1:
        out.append(None)
      elif cell in ((4, 0.0), (8, 100.0)) or (cell == (8, 50.0) and m["index"] == 0):
        out.append(m["color"].capitalize() + ".")   # case and a final period do not matter
      else:
        out.append(_wrong(m["color"]))
    return out
  return predict


def test_table_json_and_heat_map_from_a_fake_predictor(tmp_path, capsys):
  args, asked = _args(tmp_path), []
  out = needle.run(args, fake_predict(asked), size=28, info=dict(frame_chunk=4))
  assert asked == [[4] * 6, [8] * 6]   # one call per length, shortest first
  with open(tmp_path / "out" / "needle.json") as f:
    saved = json.load(f)
  assert saved["accuracy"] == [[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]] == out["accuracy"]
  cells = {(c["length"], c["depth"]): (c["count"], c["correct"], c["failed"]) for c in saved["cells"]}
  assert cells == {(4, 0.0): (2, 2, 0), (4, 50.0): (2, 0, 0), (4, 100.0): (1, 0, 1),
                   (8, 0.0): (2, 0, 0), (8, 50.0): (2, 1, 0), (8, 100.0): (2, 2, 0)}
  assert saved["overall"] == 5 / 11 and saved["frame_chunk"] == 4 and saved["per_cell"] == 2
  assert [r["length"] for r in saved["runs"]] == [4, 8] and all(r["peak_rss_mb"] > 0 for r in saved["runs"])
  clip = {c["id"]: c for c in saved["clips"]}["needle_L8_d100_0_seed0"]
  assert clip["frame"] == 5 and clip["correct"] and clip["answer"].lower() == clip["color"] + "."
  text = capsys.readouterr().out
  rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["4"], ["8"], ["mean"])]
  assert rows == [["4", "1.00", "0.00", "0.00", "0.33"], ["8", "0.00", "0.50", "1.00", "0.50"],
                  ["mean", "0.50", "0.25", "0.50", "0.45"]]
  png = Image.open(tmp_path / "out" / "needle.png")
  assert png.format == "PNG" and png.size[0] > 200 and png.size[1] > 150
  # the clip on disk: 8 frames at 1 fps, the needle lit in frames 5-7, in its colour
  frames, _ = load_video(clip["video"], fps=1.0)
  rgb = np.asarray(synthetic.COLORS[clip["color"]])
  lit = [k for k, f in enumerate(frames) if (np.abs(f.astype(int) - rgb).sum(-1) < 60).sum() > 10]
  assert len(frames) == 8 and lit == [5, 6, 7]
  # a second run reuses the cached clips and asks the same needles
  mtime = os.path.getmtime(clip["video"])
  again = needle.run(args, fake_predict([]), size=28)
  assert again["accuracy"] == saved["accuracy"] and os.path.getmtime(clip["video"]) == mtime


def test_a_cells_clips_do_not_depend_on_the_other_cells():
  a = needle.clip_specs([64], [50.0], 3, seed=1)
  b = needle.clip_specs([16, 64], [0.0, 50.0], 3, seed=1)
  assert a == [s for s in b if s["length"] == 64 and s["depth"] == 50.0]
  assert [s["frame"] for s in needle.clip_specs([64], [0.0, 100.0], 1, 0)] == [0, 61]


def test_help_and_bad_flags_are_named_before_the_model_loads(tmp_path, monkeypatch, capsys):
  r = subprocess.run([sys.executable, "-m", "eval.needle", "--help"], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0 and "--lengths" in r.stdout and "--prefill-chunk" in r.stdout, r.stderr
  from llamavid_jax import inference
  monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("the model was loaded"))
  ckpt = str(tmp_path)
  for flags, named in ((["--lengths", "64,abc"], "--lengths"), (["--lengths", "2,64"], "--lengths [2]"),
                       (["--depths", "0,120"], "--depths [120.0]"), (["--per-cell", "0"], "--per-cell 0"),
                       (["--frame-chunk", "3"], "--frame-chunk 3")):
    with pytest.raises(SystemExit) as e:
      needle.main(["--ckpt", ckpt, *flags])
    assert e.value.code == 2
    assert named in capsys.readouterr().err, flags
  with pytest.raises(SystemExit):
    needle.main(["--ckpt", str(tmp_path / "nowhere")])
  assert "--ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path):
  """The documented commands on the tiny variant: needle clips of 4-8 frames, then
  `python -m train.train --config configs/needle.py:tiny` (4 steps), then `python -m
  eval.needle` at 2 lengths x 2 depths (frame-chunked Q-Former, chunked prefill), one
  CPU device, then `eval.run needle` in-process on the same clips (the same greedy answers).
  ~45 s on 2 busy cores for the commands, most of it compiling; the eval.run part adds a load
  and a compile."""
  from configs import needle as needle_config
  data, wd, ev = str(tmp_path / "data"), str(tmp_path / "wd"), str(tmp_path / "eval")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  synthetic.main(["--out", data, *needle_config.TINY_SYNTHETIC_ARGS.split(), "--workers", "1"])
  run = lambda *cmd: subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=900)
  r = run("train.train", "--config=configs/needle.py:tiny", f"--config.data.root={data}", f"--config.workdir={wd}")
  assert r.returncode == 0 and "finished at step 4" in r.stdout, r.stderr[-3000:]
  r = run("eval.needle", "--ckpt", os.path.join(wd, "inference"), "--lengths", "8,16", "--depths", "0,100",
          "--per-cell", "1", "--out", ev, "--prefill-chunk", "16", "--frame-chunk", "4")
  assert r.returncode == 0 and "needle accuracy" in r.stdout, r.stderr[-3000:]
  with open(os.path.join(ev, "needle.json")) as f:
    saved = json.load(f)
  assert saved["frame_chunk"] == 4 and saved["prefill_chunk"] == 16 and saved["tokens_per_frame"] == 2
  assert [(c["length"], c["depth"], c["count"]) for c in saved["cells"]] == [
      (8, 0.0, 1), (8, 100.0, 1), (16, 0.0, 1), (16, 100.0, 1)]
  assert all(isinstance(c["answer"], str) for c in saved["clips"])
  assert [r["positions"] for r in saved["runs"]] == [36 - 1 + 2 * 8, 36 - 1 + 2 * 16]   # 36 prompt ids, one -200
  assert Image.open(os.path.join(ev, "needle.png")).format == "PNG"
  # the same clips through `eval.run needle` (its predictor, the clip size read off the checkpoint's config)
  from eval import run as runner
  pred = os.path.join(str(tmp_path), "run", "pred.jsonl")
  s = runner.main(["needle", "--ckpt", os.path.join(wd, "inference"), "--out", pred, "--lengths", "16,8",
                   "--depths", "100,0", "--per-cell", "1", "--prefill-chunk", "16", "--frame-chunk", "4",
                   "--dtype", "float32", "--no-progress", "--clip-dir", os.path.join(ev, "clips")])
  assert s["counts"]["predicted"] == 4 and s["metric"]["lengths"] == [8, 16]
  with open(pred) as f:
    got = {r["id"]: r["answer"] for r in map(json.loads, f)}
  assert got == {c["id"]: c["answer"] for c in saved["clips"]}


def test_eval_run_runs_the_needle_benchmark_and_resumes(tmp_path):
  """`python -m eval.run needle`: the same cells through the benchmark runner (records,
  resume, --score-only, the heat map as --export) on the fake predictor."""
  from eval import run as runner
  pred, png = tmp_path / "pred" / "needle.jsonl", tmp_path / "heat.png"
  argv = ["needle", "--ckpt", str(tmp_path), "--out", str(pred), "--lengths", "4,8", "--depths", "0,50,100",
          "--per-cell", "2", "--size", "28", "--batch-size", "4", "--no-progress"]
  asked = []
  predictor = argparse.Namespace(predict=fake_predict(asked))
  s = runner.main([*argv, "--export", str(png)], predictor=predictor)
  assert s["counts"] == dict(items=12, predicted=11, skipped_existing=0, missing_media=0, failed=1)
  assert s["metric"]["accuracy"] == [[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]] and s["metric"]["overall"] == 5 / 11
  assert s["metric"]["lengths"] == [4, 8] and s["metric"]["depths"] == [0.0, 50.0, 100.0]
  assert Image.open(png).format == "PNG" and s["export"]["entries"] == 6
  assert sorted(os.listdir(tmp_path / "pred" / "needle_clips"))[0] == "needle_L4_d0_0_seed0_s28.mp4"
  with open(pred) as f:
    first = json.loads(f.readline())
  assert first["id"] == "needle_L4_d0_0_seed0" and first["correct"] and first["frame"] == 0
  again = runner.main(argv, predictor=argparse.Namespace(predict=fake_predict(asked := [])))
  assert asked == [[4]] and again["counts"]["skipped_existing"] == 11   # only the unanswered clip again
  scored = runner.main(["needle", "--score-only", "--pred", str(pred)])
  assert scored["metric"]["accuracy"] == s["metric"]["accuracy"]
