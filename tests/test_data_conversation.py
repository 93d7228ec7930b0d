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
  assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32
  assert enc.input_ids.tolist() == ids
  assert enc.labels.tolist() == labels
  assert enc.instruction == instruction


MULTI_TURN = fx.qa("What is this?\n<image>", "A cat.", "What color?", "Red.")
# SYS USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What color? ASSISTANT: Red.</s>
MULTI_IDS = [1, *S, 25, 27, IMG, 28, 29, 30, 31, 26, 3, 32, 2, 25, 29, 33, 26, 34, 2]
# Round 1 masks bos .. "ASSISTANT:" (32 tokens); "A cat.</s>" is supervised; round 2 masks
# "USER: What color? ASSISTANT:" (4 tokens); "Red.</s>" is supervised.
MULTI_LABELS = [X] * 32 + [3, 32, 2] + [X] * 4 + [34, 2]


@pytest.mark.parametrize("name", ["vicuna_v1", "imgsp_v1"])
def test_v1_multi_turn_with_image(llm, name):
  enc = conv.encode_conversation(MULTI_TURN, llm, name, has_media=True)
  _check(enc, MULTI_IDS, MULTI_LABELS, "What is this?")
  assert len(MULTI_IDS) == 41 and enc.has_image


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
  spm = pytest.importorskip("sentencepiece")
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
  # Without legacy spacing (transformers' default for this config) round 2 is one token off.
  from transformers import AutoTokenizer
  with pytest.raises(SampleError, match="rounds tokenize to 67 tokens but the whole prompt to 68"):
    conv.encode_conversation(MULTI_TURN, AutoTokenizer.from_pretrained(str(d)), "vicuna_v1",
                             has_media=True)
