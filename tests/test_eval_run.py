"""eval.run with a fake predictor: chunks and merge, resume after a kill, torn lines,
missing media, score-only on a file in the release's layout, arguments named early."""

import json
import logging
import os

import pytest

from eval import run
from eval.benchmarks import common
from tests.test_eval_benchmarks import POPE_A, pope_files, write

QUESTIONS = [{"video_id": f"vid{i}", "question": f"question {i}?", "answer": f"a{i}", "id": i} for i in range(7)]


class Fake:
  """Answers `a{id}` for even ids, `b` otherwise; raises once it has answered `fail_after` items."""

  def __init__(self, fail_after=None):
    self.fail_after, self.asked = fail_after, []

  def predict(self, items):
    if self.fail_after is not None and len(self.asked) >= self.fail_after:
      raise RuntimeError("killed")
    self.asked += [it.id for it in items]
    return [f"a{it.id}" if int(it.id) % 2 == 0 else "b" for it in items]


def no_model(args):
  raise AssertionError("the model must not be loaded")


@pytest.fixture
def msvd(tmp_path, monkeypatch):
  monkeypatch.setattr(run, "model_predictor", no_model)
  vids = tmp_path / "video"
  vids.mkdir()
  for q in QUESTIONS:
    if q["id"] != 5:   # vid5 is missing
      (vids / f"{q['video_id']}.mp4").write_bytes(b"x")
  qfile = write(tmp_path / "test_qa.json", QUESTIONS)
  (tmp_path / "ckpt").mkdir()

  def main(out, *extra, predictor=None):
    argv = ["msvd_qa", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--gt-file", qfile,
            "--video-folder", str(vids), "--no-progress", *extra]
    return run.main(argv, predictor=predictor)
  return main


def lines(path):
  return [json.loads(x) for x in open(path).read().splitlines()]


def test_chunks_and_merge_equal_one_run(tmp_path, msvd):
  whole = msvd(tmp_path / "all.json", predictor=Fake())
  assert whole["counts"] == {"items": 7, "predicted": 6, "skipped_existing": 0, "missing_media": 1, "failed": 0}
  sizes = []
  for i in range(3):
    s = msvd(tmp_path / f"3_{i}.json", "--num-chunks", "3", "--chunk-idx", str(i), "--batch-size", "2",
             predictor=Fake())
    sizes.append(s["counts"]["items"])
  assert sizes == [3, 3, 1]                 # ceil(7 / 3) per chunk, as the release's split_list
  run.main(["msvd_qa", "--merge", "--out", str(tmp_path / "merged.json")] +
           [str(tmp_path / f"3_{i}.json") for i in range(3)])
  assert lines(tmp_path / "merged.json") == lines(tmp_path / "all.json")
  # a glob, in natural order, and a repeated file: duplicates dropped
  m = run.main(["msvd_qa", "--merge", "--out", str(tmp_path / "globbed.json"), str(tmp_path / "3_*.json"),
                str(tmp_path / "3_0.json")])
  assert m["duplicates_dropped"] == 3 and lines(tmp_path / "globbed.json") == lines(tmp_path / "all.json")


def test_resume_after_kill(tmp_path, msvd):
  msvd(tmp_path / "all.json", predictor=Fake())
  out = tmp_path / "pred.json"
  with pytest.raises(RuntimeError, match="killed"):
    msvd(out, "--batch-size", "2", predictor=Fake(fail_after=4))
  assert [r["id"] for r in lines(out)] == [0, 1, 2, 3]
  again = Fake()
  s = msvd(out, "--batch-size", "2", predictor=again)
  assert again.asked == ["4", "6"]
  assert (s["counts"]["skipped_existing"], s["counts"]["predicted"]) == (4, 2)
  assert lines(out) == lines(tmp_path / "all.json")
  done = msvd(out)                          # nothing left: no model is loaded
  assert done["counts"]["predicted"] == 0 and done["metric"]["count"] == 6


def test_torn_last_line(tmp_path, msvd, caplog):
  out = tmp_path / "pred.json"
  msvd(out, "--limit", "3", predictor=Fake())
  with open(out, "a") as f:
    f.write('{"id": 3, "question": "quest')   # killed mid-write
  with caplog.at_level(logging.WARNING):
    s = msvd(out, predictor=Fake())
  assert "torn last line" in caplog.text
  assert s["counts"]["skipped_existing"] == 3 and s["counts"]["predicted"] == 3
  assert [r["id"] for r in lines(out)] == [0, 1, 2, 3, 4, 6]


def test_missing_media_named_and_counted(tmp_path, msvd, caplog):
  with caplog.at_level(logging.WARNING):
    s = msvd(tmp_path / "pred.json", "--summary", str(tmp_path / "summary.json"), predictor=Fake())
  path = str(tmp_path / "video" / "vid5.{mp4,avi,mov,mkv}")
  assert s["counts"]["missing_media"] == 1 and s["missing_media"] == [["5", path]]
  assert f"1 of 7 items have no media file: 5: {path}; they are skipped" in caplog.text
  saved = json.load(open(tmp_path / "summary.json"))
  assert saved["counts"] == s["counts"] and saved["benchmark"] == "msvd_qa"
  # 0, 2, 4, 6 answered exactly, 1, 3 not: 4 of 6
  assert saved["metric"]["exact"] == pytest.approx(400 / 6)
  assert set(saved) >= {"metric", "counts", "seconds", "questions_per_second"}


def test_multi_host_takes_its_chunk(tmp_path, msvd, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  s = msvd(tmp_path / "pred.json", predictor=Fake())
  assert s["chunk"] == [1, 3] and s["pred"] == str(tmp_path / "pred.json") + ".3_1"
  assert [r["id"] for r in lines(tmp_path / "pred.json.3_1")] == [3, 4]   # 5 has no video


def test_score_only_on_a_release_file(tmp_path):
  qfile, coco = pope_files(tmp_path)
  qs = common.read_jsonl(qfile)[0]
  # as model_vqa_loader.py writes it (8 chunks cat-ed together), in the release's key order
  release = [{"question_id": q["question_id"], "prompt": q["text"], "text": a, "answer_id": "hK3vPm9XqZrTu2LwYd8sNb",
              "model_id": "llama-vid-7b-full-336", "metadata": {}} for q, a in zip(qs, POPE_A)]
  pred = write(tmp_path / "merge.jsonl", release, lines=True)
  s = run.main(["pope", "--score-only", "--pred", pred, "--question-file", qfile, "--annotations", coco,
                "--out", str(tmp_path / "summary.json")])
  assert s["metric"]["random"]["accuracy"] == 0.75 and s["metric"]["adversarial"]["f1"] == 0.5
  assert json.load(open(tmp_path / "summary.json"))["metric"] == s["metric"]


def test_bad_arguments_are_named_before_the_model(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(run, "model_predictor", no_model)
  (tmp_path / "ckpt").mkdir()
  with pytest.raises(SystemExit) as e:
    run.main(["pope", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "p.jsonl"),
              "--question-file", str(tmp_path / "nope.jsonl"), "--image-folder", str(tmp_path / "val2014"),
              "--num-chunks", "2", "--chunk-idx", "2"])
  err = capsys.readouterr().err
  assert e.value.code == 2
  for what in ("--question-file", "nope.jsonl", "--image-folder", "val2014", "--chunk-idx 2"):
    assert what in err
  with pytest.raises(SystemExit):
    run.main(["pope", "--score-only", "--pred", str(tmp_path / "p.jsonl")])
  err = capsys.readouterr().err
  assert "--pred" in err and "--question-file is required" in err and "--annotation-dir is required" in err
  assert not os.path.exists(tmp_path / "p.jsonl")


@pytest.mark.slow
def test_the_models_predictions_are_generates_answers(tiny_ckpt, clip28, tmp_path):
  """eval.run on the tiny checkpoint (the engine's 2 slots, 3 questions of other
  lengths): each prediction is `Model.generate`'s greedy answer to its question alone."""
  import shutil
  from eval import predict
  from eval.benchmarks import BENCHMARKS
  from llamavid_jax import inference
  vids = tmp_path / "video"
  vids.mkdir()
  shutil.copy(clip28, vids / "v0.mp4")
  qs = [{"video_id": "v0", "question": q, "answer": "x", "id": i}
        for i, q in enumerate(["What is this?", "Hello What is this?", "Describe it."])]
  argv = ["msvd_qa", "--ckpt", tiny_ckpt, "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "8",
          "--batch-size", "2", "--out", str(tmp_path / "pred.jsonl"), "--gt-file", write(tmp_path / "q.json", qs),
          "--video-folder", str(vids), "--no-progress"]
  summary = run.main(argv)
  assert summary["counts"]["predicted"] == 3
  m = inference.load(tiny_ckpt)
  args, _ = run.parse_args(argv)
  reqs = predict.Predictor(m).requests(BENCHMARKS["msvd_qa"].load(args))
  alone = [m.generate([r], max_new_tokens=8)[0].text for r in reqs]
  assert [r["pred"] for r in lines(tmp_path / "pred.jsonl")] == alone
  assert any(alone)   # not all empty: the comparison says something


@pytest.mark.slow
def test_the_predictor_answers_through_one_engine_as_generate_alone(tiny_ckpt, clip28, tmp_path, monkeypatch):
  """eval.predict.Predictor (batch 2, the benchmark's fitted 1024-token budget) on a video,
  text-only, image, unreadable video, video and text-only question: each answer is
  `Model.generate([its request])`'s greedy tokens with its own budget (what the model's
  positions leave: unequal here, as the untrained model runs to its budget); the
  unreadable one is None and a named problem. A slot freed by a shorter answer takes the
  next question while the other slot still decodes, and the engine's compiles are a
  decode step per span and one prefill per shape: a second call on it compiles nothing."""
  from eval import predict
  from llamavid_jax import engine as engine_lib
  from llamavid_jax import inference
  from tests import data_fixtures
  import numpy as np
  data_fixtures.random_image(np.random.default_rng(1), 20, 12).save(tmp_path / "image.png")
  (tmp_path / "bad.mp4").write_text("not a video\n")
  item = lambda i, q, media, kind: common.Item(i, q, q, None if media is None else str(media), kind)
  items = [item("v0", "What is this?", clip28, "video"), item("t1", "Hello What is this?", None, "none"),
           item("bad", "Describe it.", tmp_path / "bad.mp4", "video"),
           item("i3", "Describe it.", tmp_path / "image.png", "image"),
           item("v4", "Hello What is this?", clip28, "video"), item("t5", "What is this?", None, "none")]
  handles = []
  submit = engine_lib.Engine.submit
  monkeypatch.setattr(engine_lib.Engine, "submit", lambda self, *a, **k: handles.append(submit(self, *a, **k)) or handles[-1])
  m = inference.load(tiny_ckpt)
  with predict.Predictor(m, batch_size=2, max_new_tokens=1024, fit_max_new_tokens=True) as p:
    preds = p.predict(items)
    eng, compiles = p.engine, p.engine.compiles
    assert p.predict(items[3:5]) == preds[3:5] and p.engine is eng and eng.compiles == compiles
  assert not eng.alive
  assert preds[2] is None and len(p.problems) == 1 and p.problems[0].startswith("bad: ")
  ok = [it for it in items if it.id != "bad"]
  reqs = [p.request(it) for it in ok]
  budgets = [min(1024, m.room(r)) for r in reqs]
  alone = [m.generate([r], max_new_tokens=n)[0] for r, n in zip(reqs, budgets)]
  got = [h.result() for h in handles[:len(ok)]]
  assert [g.token_ids for g in got] == [a.token_ids for a in alone]
  assert [g.text for g in got] == [preds[items.index(it)] for it in ok] and any(g.text for g in got)
  assert len(set(budgets)) > 1 and [g.completion_tokens for g in got] == budgets   # run to unequal budgets
  h = handles[:len(ok)]
  assert any(h[k].start_step < h[j].finish_step for k in range(2, len(h)) for j in range(k))   # joined mid-decode
  prefills = {(r.get("video_mode", "clip"),) + tuple((k, v.shape) for k, v in sorted(eng.batch(r).items()))
              for r in reqs}
  assert compiles <= len(eng.spans) + len(prefills) and len(prefills) < len(items)   # a decode step per span
