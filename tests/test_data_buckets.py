"""Bucketing (pure) and the one skip budget."""

import pytest

from llamavid_jax.data import DataError, SampleError
from llamavid_jax.data.buckets import Bucket, BucketKey, as_buckets, choose_bucket, llm_length
from llamavid_jax.data.skips import Skip, SkipBudget
from tests import data_fixtures as fx

# The pipeline tests' table: text-only (29 tokens) -> 0, images (35, 1 frame) -> 1,
# features (35 tokens, 3 steps) -> 2.
TABLE = as_buckets(((32, 1), (36, 1), (40, 4)))


def _choose(text_len, frames, prompts, *, features=False, table=TABLE, max_len=64):
  return choose_bucket(text_len, frames, prompts, features=features, buckets=table, spec=fx.SPEC,
                       max_len=max_len)


def test_buckets_from_config_tuples():
  assert TABLE == (Bucket(32, 1, 1), Bucket(36, 1, 1), Bucket(40, 4, 1))
  assert as_buckets([[56, 1, 2]]) == (Bucket(text_len=56, frames=1, prompts=2),)
  for bad in [(8,), (8, 1, 0), (8, 1, 2, 3)]:
    with pytest.raises(ValueError, match="expected \\(max_text_len, max_frames\\[, prompts\\]\\)"):
      as_buckets([bad])
  # S' = S + P * (T * tokens_per_frame - 1), the model's spliced length
  assert [llm_length(b, fx.SPEC) for b in TABLE] == [33, 37, 47]
  assert llm_length(Bucket(56, 1, 2), fx.SPEC) == 58 and llm_length(Bucket(12, 0), fx.SPEC) == 12


def test_smallest_fit_by_kind():
  assert _choose(29, 0, 0) == BucketKey("frames", 0) == ("frames", 0)
  assert _choose(35, 1, 1) == BucketKey("frames", 1)
  assert _choose(35, 3, 1, features=True) == BucketKey("features", 2)
  # the smallest LLM length wins, not the table order: (20, 4) is 27 positions, (30, 1) is 31
  assert _choose(10, 1, 1, table=as_buckets(((30, 1), (20, 4)))) == BucketKey("frames", 1)


def test_misfits_raise_the_pipelines_messages():
  with pytest.raises(SampleError) as e:
    _choose(60, 3, 1)
  assert (e.value.reason, e.value.field, e.value.detail) == (
      "too_long", "conversations",
      "60 text tokens + 1 placeholder(s) x (3 frames x 2 tokens - 1) = 65 > max_len 64")
  with pytest.raises(SampleError) as e:
    _choose(69, 0, 0, max_len=64)
  assert e.value.detail == "69 text tokens > max_len 64"
  with pytest.raises(SampleError) as e:
    _choose(41, 1, 1)
  assert (e.value.reason, e.value.detail) == (
      "too_long", "41 text tokens, 1 frames fit no bucket [(32, 1, 1), (36, 1, 1), (40, 4, 1)]")
  with pytest.raises(SampleError) as e:
    _choose(30, 1, 2)
  assert (e.value.reason, e.value.detail) == (
      "too_many_turns", "2 <image> placeholders (one per human turn) fit no bucket's instruction slots "
      "[(32, 1, 1), (36, 1, 1), (40, 4, 1)]")


def _skip(i, reason):
  return Skip(i, f"s{i}", reason, "image", "file not found", f"/d/{i}.png")


def test_skip_budget_one_rule():
  budget = SkipBudget(0.25, min_samples=4)
  budget.seen = 3
  budget.record(_skip(0, "missing_file"))
  budget.check()                                   # 1/3 > 0.25, but only 3 < 4 seen
  budget.seen = 4
  budget.check()                                   # 1/4 = 0.25 is not past the bound
  budget.seen = 5
  budget.record(_skip(4, "unreadable_image"))
  assert budget.exceeded() and budget.skipped == 2
  with pytest.raises(DataError) as e:
    budget.check(" while planning")
  assert str(e.value) == (
      "skip rate 2/5 = 0.400 exceeds max_skip_rate 0.25 while planning; last: sample 's4' (index 4) "
      "field 'image' (file /d/4.png): unreadable_image: file not found; by reason: "
      "{'missing_file': 1, 'unreadable_image': 1}")
  state = budget.get_state()
  assert state == {"seen": 5, "skips": {"missing_file": 1, "unreadable_image": 1}}
  other = SkipBudget(0.25, min_samples=4)
  other.set_state(state)
  assert other.get_state() == state and other.exceeded() and other.last is None
  assert not SkipBudget(0.25, 1).exceeded()        # nothing skipped, nothing seen
