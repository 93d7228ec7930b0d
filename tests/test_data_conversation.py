"""Templates against hand-written ids and label masks (ids: tests/data_fixtures.py)."""

import numpy as np
import pytest

from llamavid_jax.data import SampleError
from llamavid_jax.data import conversation as conv
from llamavid_jax.data import tokenizer as tok_lib
from tests import data_fixtures as fx

S = fx.SYSTEM_IDS
X = -100  # ignored label
IMG = -200


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
  return tok_lib.load_llm_tokenizer(fx.make_llm_tokenizer(str(tmp_path_factory.mktemp("llm"))))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  return tok_lib.load_qformer_tokenizer(fx.make_bert_tokenizer(str(tmp_path_factory.mktemp("bert"))))


def _check(enc, ids, labels, instruction):
  assert ((enc.labels == X) | (enc.labels == enc.input_ids)).all()   # a label is ignored or its own token
  assert enc.input_ids.tolist() == ids
  assert enc.labels.tolist() == labels
  assert enc.instruction == instruction


MULTI_TURN = fx.qa("What is this?\n<image>", "A cat.", "What color?", "Red.")
# SYS USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What color? ASSISTANT: Red.</s>
MULTI_IDS = [1, *S, 25, 27, IMG, 28, 29, 30, 31, 26, 3, 32, 2, 25, 29, 33, 26, 34, 2]
# Round 1 masks bos .. "ASSISTANT:" (32 tokens); "A cat.</s>" is supervised; round 2 masks
# "USER: What color? ASSISTANT:" (4 tokens); "Red.</s>" is supervised.
MULTI_LABELS = [X] * 32 + [3, 32, 2] + [X] * 4 + [34, 2]


def test_v1_multi_turn_with_image(llm):
  enc = conv.encode_conversation(MULTI_TURN, llm, "vicuna_v1", has_media=True)
  _check(enc, MULTI_IDS, MULTI_LABELS, "What is this?")
  # the supervised tokens are exactly the two replies, each tokenized on its own, with their </s>
  replies = [llm(r, add_special_tokens=False).input_ids + [llm.eos_token_id] for r in ("A cat.", "Red.")]
  assert enc.labels[enc.labels != X].tolist() == replies[0] + replies[1]
  assert enc.has_image and enc.instructions == ("What is this?",)


class Coin:
  """A stand-in for np.random.Generator: `integers(2)` always gives `side`."""

  def __init__(self, side):
    self.side, self.calls = side, 0

  def integers(self, n):
    assert n == 2
    self.calls += 1
    return self.side


# imgsp_v1: the second human turn gets its own <image>, at its start (coin 0) ...
# SYS USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: <image>\nWhat color? ASSISTANT: Red.</s>
IMGSP_START_IDS = [1, *S, 25, 27, IMG, 28, 29, 30, 31, 26, 3, 32, 2, 25, 27, IMG, 28, 29, 33, 26, 34, 2]
# ... or at its end (coin 1): "USER: What color?\n<image> ASSISTANT: Red.</s>" (this
# tokenizer reads the chunk " ASSISTANT: ..." after the image as "▁ASSISTANT:").
IMGSP_END_IDS = [1, *S, 25, 27, IMG, 28, 29, 30, 31, 26, 3, 32, 2, 25, 29, 33, 28, IMG, 26, 34, 2]
# Round 1: 34 tokens, the first 31 after bos masked; round 2: 9 (8) tokens, its bos
# standing for round 1's </s>, 7 (6) masked ("USER:" .. "ASSISTANT:"), "Red.</s>" supervised.
IMGSP_START_LABELS = [X] * 32 + [3, 32, 2] + [X] * 7 + [34, 2]
IMGSP_END_LABELS = [X] * 32 + [3, 32, 2] + [X] * 6 + [34, 2]


@pytest.mark.parametrize("side,ids,labels", [(0, IMGSP_START_IDS, IMGSP_START_LABELS),
                                             (1, IMGSP_END_IDS, IMGSP_END_LABELS)])
def test_imgsp_v1_image_and_instruction_per_turn(llm, side, ids, labels):
  coin = Coin(side)
  enc = conv.encode_conversation(MULTI_TURN, llm, "imgsp_v1", has_media=True, rng=coin)
  _check(enc, ids, labels, "What is this?")
  assert coin.calls == 1 and enc.num_images == 2
  assert enc.instructions == ("What is this?", "What color?")


def test_imgsp_v1_instruction_text_and_default_side(llm):
  """Each instruction is its turn with <image> and newlines removed (lines joined as the
  release joins them); the first turn's <image> moves to the start; rng=None -> start."""
  turns = fx.qa("Hello\nWhat is this? <image>", "A cat.", "What\ncolor?", "Red.", "Hello", "Hi.")
  enc = conv.encode_conversation(turns, llm, "imgsp_v1", has_media=True)
  assert enc.instructions == ("HelloWhat is this?", "Whatcolor?", "Hello")
  assert enc.num_images == 3
  prompt = conv.build_prompt(conv.TEMPLATES["imgsp_v1"], conv.add_turn_images(
      conv.normalize_turns(turns, has_media=True, per_turn_images=True), None))
  assert prompt == (fx.SYSTEM + " USER: <image>\nHello\nWhat is this? ASSISTANT: A cat.</s>"
                    "USER: <image>\nWhat\ncolor? ASSISTANT: Red.</s>USER: <image>\nHello ASSISTANT: Hi.</s>")


def test_imgsp_v1_text_only_and_single_turn(llm):
  """Without media nothing is added (ids as vicuna_v1); one turn: the same as vicuna_v1."""
  multi = fx.qa("Hello", "Hi.", "What color?", "Red.")
  a = conv.encode_conversation(multi, llm, "imgsp_v1", has_media=False, rng=Coin(1))
  b = conv.encode_conversation(multi, llm, "vicuna_v1", has_media=False)
  assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
  assert a.num_images == 0 and a.instructions == ("Hello", "What color?")
  one = fx.qa("What is this?\n<image>", "A cat.")
  a = conv.encode_conversation(one, llm, "imgsp_v1", has_media=True, rng=Coin(1))
  assert a.input_ids.tolist() == MULTI_IDS[:35] and a.instructions == ("What is this?",)


def test_imgsp_v1_placeholder_per_turn_rules(llm):
  # A turn may carry its own <image> (kept, moved to its start); two in one turn, or
  # one in a reply, are errors; vicuna_v1 allows one per sample.
  two = fx.qa("<image>\nWhat is this?", "A cat.", "What color? <image>", "Red.")
  enc = conv.encode_conversation(two, llm, "imgsp_v1", has_media=True, rng=Coin(1))
  assert enc.input_ids.tolist() == IMGSP_START_IDS
  for turns, template, reason in [
      (two, "vicuna_v1", "multiple_image_tokens"),
      (fx.qa("<image>\nWhat <image>", "A cat."), "imgsp_v1", "multiple_image_tokens"),
      (fx.qa("<image>\nWhat is this?", "A <image> cat."), "imgsp_v1", "image_token_in_reply")]:
    with pytest.raises(SampleError) as e:
      conv.encode_conversation(turns, llm, template, has_media=True)
    assert e.value.reason == reason and e.value.field == "conversations"


def test_v1_prompt_text():
  turns = conv.normalize_turns(MULTI_TURN, has_media=True)
  assert conv.build_prompt(conv.TEMPLATES["vicuna_v1"], turns) == (
      fx.SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What color? "
      "ASSISTANT: Red.</s>")


def test_v1_text_only(llm):
  enc = conv.encode_conversation(fx.qa("Hello", "Hi."), llm, "vicuna_v1", has_media=False)
  _check(enc, [1, *S, 25, 35, 26, 36, 2], [X] * 27 + [36, 2], "Hello")
  assert not enc.has_image


def test_v1_leading_gpt_turn_dropped(llm):
  turns = [{"from": "gpt", "value": "Red."}] + fx.qa("Hello", "Hi.")
  enc = conv.encode_conversation(turns, llm, "vicuna_v1", has_media=False)
  assert enc.input_ids.tolist() == [1, *S, 25, 35, 26, 36, 2]


def test_plain_guided(llm):
  enc = conv.encode_conversation(fx.qa("Describe it.\n<image>", "A dog runs."), llm,
                                 "plain_guided", has_media=True)
  # "<image>A dog runs.\n": bos and the image are masked, no </s>.
  _check(enc, [1, IMG, 3, 39, 40, 28], [X, X, 3, 39, 40, 28], "Describe it.")


def test_plain_guided_rejects_multi_turn(llm):
  with pytest.raises(SampleError, match="template plain_guided needs one human turn"):
    conv.encode_conversation(MULTI_TURN, llm, "plain_guided", has_media=True)


def test_tokenization_mismatch_is_an_error(llm):
  turns = fx.qa("<image>\nWhat is this? ASSISTANT: A", "A cat.")
  with pytest.raises(SampleError) as e:
    conv.encode_conversation(turns, llm, "vicuna_v1", has_media=True)
  assert e.value.reason == "tokenization_mismatch" and e.value.field == "conversations"
  assert "rounds tokenize to 1 tokens but the whole prompt to 37" in str(e.value)


@pytest.mark.parametrize("turns,has_media,reason", [
    (fx.qa("Hello", "Hi.")[:1], False, "no_gpt_turn"),
    (fx.qa("Hello", "Hi.", "What?"), False, "bad_roles"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
      {"from": "gpt", "value": "c"}], False, "bad_roles"),
    (fx.qa("Hello", " "), False, "empty_message"),
    (fx.qa("Hello", "Hi."), True, "missing_image_token"),
    (fx.qa("<image> a <image>", "Hi."), True, "multiple_image_tokens"),
    (fx.qa("<image>\nHello", "Hi."), False, "unexpected_image_token"),
    ("not a list", False, "bad_conversations"),
])
def test_bad_conversations(llm, turns, has_media, reason):
  with pytest.raises(SampleError) as e:
    conv.encode_conversation(turns, llm, "vicuna_v1", has_media=has_media)
  assert e.value.reason == reason and e.value.field == "conversations"


def test_no_gpt_turn_message(llm):
  with pytest.raises(SampleError, match=r"field 'conversations': no_gpt_turn: no gpt turn \(roles \['human'\]\)"):
    conv.encode_conversation(fx.qa("Hello", "x")[:1], llm, "vicuna_v1", has_media=False)


def test_llm_tokenizer_pad_is_unk(llm):
  assert llm.pad_token_id == 0 and llm.bos_token_id == 1 and llm.eos_token_id == 2


def test_qformer_tokenizer(bert):
  assert bert.bos_token == "[DEC]" and bert.bos_token_id == 14 and len(bert) == 15
  assert bert("What is this?").input_ids == [2, 5, 6, 7, 8, 3]
  # Left truncation keeps the end of the question.
  assert bert("What is this?", truncation=True, max_length=4).input_ids == [2, 7, 8, 3]
  assert bert.model_max_length == 256


def test_llm_tokenizer_from_sentencepiece_dir(tmp_path):
  """A Vicuna-style directory (tokenizer.model only) loads; multi-turn rounds line up."""
  import sentencepiece as spm   # in the test extra: a missing install is an error, not a skip
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join([fx.SYSTEM, "USER: What is this? ASSISTANT: A cat.", "Red color"] * 20))
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  d = tmp_path / "vicuna"
  d.mkdir()
  (tmp_path / "tokenizer.model").rename(d / "tokenizer.model")
  (d / "tokenizer_config.json").write_text(
      '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
      '"unk_token": "<unk>", "legacy": false, "add_bos_token": true}')
  tok = tok_lib.load_llm_tokenizer(str(d))
  assert tok.pad_token_id == tok.unk_token_id == 0 and tok("a").input_ids[0] == 1
  enc = conv.encode_conversation(MULTI_TURN, tok, "vicuna_v1", has_media=True)
  ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
  assert ids.count(IMG) == 1 and ids.count(2) == 2
  # As with LLaMA: "USER: " ends in a lone "▁", the text after <image> starts "▁", "<0x0A>".
  assert tok.convert_ids_to_tokens(ids[ids.index(IMG) - 1: ids.index(IMG) + 3][:1]) == ["▁"]
  assert tok.convert_ids_to_tokens(ids[ids.index(IMG) + 1: ids.index(IMG) + 3]) == ["▁", "<0x0A>"]
  # Supervised: exactly the two replies and their </s>.
  sup = [i for i, l in zip(ids, labels) if l != X]
  assert tok.decode(sup) == "A cat.</s> Red.</s>"
  # imgsp_v1's <image> at either end of turn 2: the rounds still line up.
  for side in (0, 1):
    enc = conv.encode_conversation(MULTI_TURN, tok, "imgsp_v1", has_media=True, rng=Coin(side))
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    assert ids.count(IMG) == 2
    assert tok.decode([i for i, l in zip(ids, labels) if l != X]) == "A cat.</s> Red.</s>"
  # Without legacy spacing (transformers' default for this config) round 2 is one token off.
  from transformers import AutoTokenizer
  with pytest.raises(SampleError, match="rounds tokenize to 67 tokens but the whole prompt to 68"):
    conv.encode_conversation(MULTI_TURN, AutoTokenizer.from_pretrained(str(d)), "vicuna_v1",
                             has_media=True)
