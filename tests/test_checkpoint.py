"""Release checkpoint conversion: parity with a PyTorch forward, bit-exact export,
sharded restore, the whole EVA-CLIP tower (one block less, as LAVIS; --vit-depth),
refused pickles against corrupt files, and the error messages."""

import copy
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import linen as nn

from llamavid_jax import convert, export, sharding
from llamavid_jax.checkpoint import orbax_io, torch_io
from llamavid_jax.checkpoint.stream import ConversionError
from llamavid_jax.models import LlamaVid
from tests import torch_llamavid as tl

TOL = 1e-4


@pytest.fixture(scope="session")
def release(tmp_path_factory):
  """Tiny release files: .bin (fp32) and safetensors (bf16) model dirs, eva_vit_g.pth,
  a sentencepiece LLaMA tokenizer and a BERT vocab; plus the torch reference."""
  root = tmp_path_factory.mktemp("release")
  tok = str(root / "sp")
  llm_vocab = tl.write_sp_tokenizer(tok)
  bert = str(root / "bert")
  bert_vocab = tl.write_bert_vocab(bert)
  ref = tl.TorchLlamaVid(tl.tiny_config(llm_vocab, bert_vocab))
  vit = str(root / "eva_vit_g.pth")
  torch.save({k: torch.from_numpy(v) for k, v in ref.vit_state().items()}, vit)
  return dict(root=root, ref=ref, tok=tok, bert=bert, vit=vit,
              bin=tl.write_release(str(root / "bin"), ref, tok, fmt="bin"),
              st=tl.write_release(str(root / "st"), ref, tok, fmt="safetensors", dtype=ml_dtypes.bfloat16))


@pytest.fixture(scope="session")
def converted(release):
  out = str(release["root"] / "out_bin")
  cfg = convert.convert_release(release["bin"], release["vit"], release["bert"], out, image_size=42)
  return out, cfg


def test_config_read_off_config_json_and_weights(converted, release):
  out, cfg = converted
  assert cfg == release["ref"].cfg      # every size inferred: heads 176/88, 128/64, cross every 2nd layer
  assert cfg.vision.pos_embed_grid == 2 and cfg.llm.rope_scaling == 2.0
  from llamavid_jax.data.tokenizer import load_llm_tokenizer, load_qformer_tokenizer
  assert len(load_llm_tokenizer(os.path.join(out, "tokenizer"))) == cfg.llm.vocab_size
  qtok = load_qformer_tokenizer(os.path.join(out, "qformer_tokenizer"))
  assert len(qtok) == cfg.qformer.vocab_size and qtok.bos_token == "[DEC]"
  assert json.load(open(os.path.join(out, "conversion.json")))["skipped"] == {"position_ids": 1, "inv_freq": 1}


def _batch(cfg, rng):
  """Two samples: 10 and 8 text tokens (placeholder at 3 / 5), 2 and 1 valid frames,
  instructions of 5 and 3 tokens."""
  ids = rng.randint(3, cfg.llm.vocab_size, (2, 10)).astype(np.int32)
  ids[0, 3] = ids[1, 5] = cfg.image_token_id
  text_mask = np.arange(10)[None] < np.array([[10], [8]])
  qids = rng.randint(5, cfg.qformer.vocab_size, (2, 5)).astype(np.int32)
  qmask = np.arange(5)[None] < np.array([[5], [3]])
  frames = rng.randn(2, 2, 42, 42, 3).astype(np.float32)
  return dict(input_ids=ids, text_mask=text_mask, frame_mask=np.array([[True, True], [True, False]]),
              qformer_ids=qids, qformer_mask=qmask, frames=frames)


def _max_diff(out, cfg, ref) -> float:
  """Max |logits| difference of the converted `out` against torch `ref` on `_batch`."""
  params = orbax_io.restore(out)
  batch = _batch(cfg, np.random.RandomState(0))
  logits, lay = jax.jit(LlamaVid(cfg).apply)({"params": params}, **batch)
  logits, valid = np.asarray(logits), np.asarray(lay["layout"].valid)
  diff = 0.0
  for b, (n_text, n_frames, n_q) in enumerate([(10, 2, 5), (8, 1, 3)]):
    vis = ref.frame_tokens(batch["frames"][b, :n_frames], batch["qformer_ids"][b, :n_q].tolist())
    want = ref.logits(batch["input_ids"][b, :n_text].tolist(), vis)
    assert want.shape[0] == valid[b].sum() == n_text - 1 + 2 * n_frames
    diff = max(diff, float(np.abs(logits[b, valid[b]] - want).max()))
  return diff


def test_converted_logits_match_torch_reference(converted, release):
  out, cfg = converted
  diff = _max_diff(out, cfg, release["ref"])
  print(f"PARITY converted release vs torch LLaMA-VID: max abs diff {diff:.3e}")
  assert diff <= TOL


@pytest.fixture(scope="session")
def tower(release):
  """eva_vit_g.pth as released: the whole EVA-CLIP tower, one block more than the model
  (3 here, 40 in the release) plus `norm` and `head`."""
  path = str(release["root"] / "tower" / "eva_vit_g.pth")
  os.makedirs(os.path.dirname(path))
  sd = tl.eva_tower_state(release["ref"].cfg)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  return path, sd


@pytest.mark.parametrize("vit_depth", [None, 1])
def test_whole_eva_tower_builds_one_block_less(release, tower, tmp_path, caplog, vit_depth):
  """The 3-block tower converts at depth 2 (or --vit-depth 1, through the CLI); logits
  match the torch reference whose ViT of that depth is loaded from the same file
  non-strictly (as LAVIS); the ignored keys are logged, recorded and not exported."""
  path, sd = tower
  out = str(tmp_path / "out")
  with caplog.at_level("INFO", logger="llamavid_jax"):
    if vit_depth is None:
      cfg = convert.convert_release(release["bin"], path, release["bert"], out, image_size=42)
    else:
      convert.main(["--model", release["bin"], "--vision-tower", path, "--bert-tokenizer", release["bert"],
                    "--out", out, "--image-size", "42", "--vit-depth", str(vit_depth)])
      cfg = orbax_io.load_config(out)
  depth = vit_depth or 2
  assert cfg.vision.depth == depth and sd["blocks.2.attn.qkv.weight"].shape == (3 * 176, 176)
  ref, not_taken = tl.with_vit_from(release["ref"], sd, depth)
  ignored = json.load(open(os.path.join(out, "conversion.json")))["vit_ignored"]
  assert sorted(ignored) == sorted(not_taken)
  assert {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k in ignored} == \
      {f"blocks.{i}" for i in range(depth, 3)} | {"norm", "head"}
  want_log = ", ".join([f"blocks.{i}.* (13 tensors)" for i in range(depth, 3)] +
                       ["norm.weight", "norm.bias", "head.weight", "head.bias"])
  assert any(want_log in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
  diff = _max_diff(out, cfg, ref)
  print(f"PARITY whole EVA tower at ViT depth {depth} vs torch (non-strict load): max abs diff {diff:.3e}")
  assert diff <= TOL
  caplog.clear()
  with caplog.at_level("INFO", logger="llamavid_jax"):
    export.export(out, str(tmp_path / "exported"), write_pth=False)
  got = torch_io.read_file(str(tmp_path / "exported" / "eva_vit_g.safetensors"))
  assert set(got) == set(sd) - set(ignored)
  assert any(r.getMessage().startswith(f"not written: {want_log}") for r in caplog.records)


def test_tower_with_an_unknown_key_is_refused(release, tower, tmp_path):
  path, sd = tower
  bad = str(tmp_path / "eva_vit_g.pth")
  torch.save({k: torch.from_numpy(v) for k, v in (sd | {"rel_pos_bias.weight": np.zeros((3, 5), np.float32)}).items()},
             bad)
  with pytest.raises(ConversionError, match=r"eva_vit_g.pth: unexpected key 'rel_pos_bias.weight' with shape \(3, 5\)"):
    convert.convert_release(release["bin"], bad, release["bert"], str(tmp_path / "out"), image_size=42)
  with pytest.raises(ValueError, match=r"eva_vit_g.pth: ViT depth 4 \(--vit-depth\): the file holds 3 blocks"):
    convert.convert_release(release["bin"], path, release["bert"], str(tmp_path / "out"), image_size=42, vit_depth=4)


def _source_tensors(model_dir, vit):
  out = {}
  for f in torch_io.shard_files(model_dir) + [vit]:
    out.update(torch_io.read_file(f))
  return out


@pytest.mark.parametrize("variant", ["bin", "st"])
def test_convert_export_is_bit_exact(converted, release, tmp_path, variant):
  if variant == "bin":
    out = converted[0]
  else:   # bf16 safetensors, dtype kept
    out = str(tmp_path / "out")
    convert.convert_release(release["st"], release["vit"], release["bert"], out, image_size=42)
  names = export.export(out, str(tmp_path / "exported"), max_shard_bytes=200_000)
  assert sum(n.startswith("model-") for n in names) >= 2 and "eva_vit_g.pth" in names
  src = _source_tensors(release[variant], release["vit"])
  got = _source_tensors(str(tmp_path / "exported"), str(tmp_path / "exported" / "eva_vit_g.pth"))
  assert set(src) - set(got) == set(tl.BUFFERS) and not set(got) - set(src)
  for k, v in got.items():
    assert v.dtype == src[k].dtype and v.shape == src[k].shape, k
    assert v.tobytes() == src[k].tobytes(), f"{k} differs"
  assert {v.dtype.name for k, v in got.items() if k.startswith("model.")} == {"float32" if variant == "bin" else "bfloat16"}
  vit_st = torch_io.read_file(str(tmp_path / "exported" / "eva_vit_g.safetensors"))
  assert all(vit_st[k].tobytes() == got[k].tobytes() for k in vit_st)
  assert json.load(open(tmp_path / "exported" / "config.json")) == tl.release_config(release["ref"].cfg)
  assert os.path.exists(tmp_path / "exported" / "tokenizer.model")


def test_restore_sharded_on_mesh_in_bf16(converted):
  out, cfg = converted
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  host = orbax_io.restore(out)
  params = orbax_io.restore(out, mesh=mesh, dtype=jax.numpy.bfloat16)
  boxed = orbax_io.abstract_params(cfg)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  specs = jax.tree.map(lambda b: sharding.fit_spec(sharding.logical_to_spec(b.names), b.value.shape, mesh),
                       boxed, is_leaf=is_box)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert len(flat) == len(jax.tree.leaves(host)) > 50
  used = set()
  for path, arr in flat:
    spec = specs
    for k in path:
      spec = spec[k.key]
    name = jax.tree_util.keystr(path)
    assert arr.sharding.mesh == mesh and arr.sharding.spec == spec, (name, arr.sharding.spec, spec)
    assert arr.dtype == jax.numpy.bfloat16, name
    want = host
    for k in path:
      want = want[k.key]
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(want).astype(ml_dtypes.bfloat16), err_msg=name)
    used |= {a for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)}
    shard_shape = arr.addressable_shards[0].data.shape
    assert shard_shape == arr.sharding.shard_shape(arr.shape), name
  assert used == {"fsdp", "sequence", "tensor"}   # parameters shard over fsdp x sequence (size 1 here)


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def test_pickle_that_runs_code_is_refused(release, tmp_path):
  model = str(tmp_path / "evil")
  shutil.copytree(release["bin"], model)
  marker = str(tmp_path / "code_ran")
  shard = os.path.join(model, "pytorch_model-00002-of-00002.bin")
  sd = torch.load(shard, weights_only=True)
  sd["model.norm.weight"] = _RunsCode(marker)
  torch.save(sd, shard)
  with pytest.raises(torch_io.UnsafePickleError, match="pytorch_model-00002-of-00002.bin: refused") as e:
    convert.convert_release(model, release["vit"], release["bert"], str(tmp_path / "out"), image_size=42)
  assert not os.path.exists(marker)
  assert "could run code" in str(e.value) and "GLOBAL os.makedirs" in str(e.value) and "corrupt" not in str(e.value)


def _truncated(data: bytes) -> bytes:
  return data[:len(data) // 2]


@pytest.mark.parametrize("case,make,pattern", [
    ("truncated zip", lambda sd, f: open(f, "wb").write(_truncated(_saved(sd))),
     "corrupt or truncated: a zip archive without its central directory"),
    ("truncated legacy", lambda sd, f: open(f, "wb").write(_truncated(_saved(sd, zip_format=False))),
     "corrupt or truncated legacy torch file"),
    ("random bytes", lambda sd, f: open(f, "wb").write(np.random.RandomState(0).bytes(4096)),
     "corrupt or truncated: neither a torch zip archive nor a torch pickle"),
    ("git lfs pointer", lambda sd, f: open(f, "w").write("version https://git-lfs.github.com/spec/v1\n"),
     r"corrupt or truncated: neither a torch zip archive nor a torch pickle \(a Git LFS pointer"),
])
def test_corrupt_weight_file_is_named_corrupt_not_hostile(release, tmp_path, case, make, pattern):
  model = str(tmp_path / "corrupt")
  shutil.copytree(release["bin"], model)
  shard = os.path.join(model, "pytorch_model-00001-of-00002.bin")
  make(torch.load(shard, weights_only=True), shard)
  with pytest.raises(torch_io.CorruptCheckpointError, match=f"pytorch_model-00001-of-00002.bin: {pattern}") as e:
    convert.convert_release(model, release["vit"], release["bert"], str(tmp_path / "out"), image_size=42)
  assert not isinstance(e.value, torch_io.UnsafePickleError) and "could run code" not in str(e.value)


def _saved(sd, zip_format=True) -> bytes:
  import io
  buf = io.BytesIO()
  torch.save(sd, buf, _use_new_zipfile_serialization=zip_format)
  return buf.getvalue()


def _broken(release, tmp_path, edit):
  """A safetensors copy of the release model with `edit(state_dict)` applied."""
  sd = {}
  for f in torch_io.shard_files(release["st"]):
    sd.update(torch_io.read_file(f))
  edit(sd)
  return tl.write_release(str(tmp_path / "broken"), release["ref"], release["tok"], fmt="safetensors", sd=sd)


K = "model.layers.1.mlp.down_proj.weight"   # torch [D, F] = (32, 64)


@pytest.mark.parametrize("case,edit,pattern", [
    ("missing", lambda sd: sd.pop(K), rf"missing key.*'{K}' \(expected shape \(32, 64\), found: none\)"),
    ("unexpected", lambda sd: sd.update({"model.extra_proj.weight": np.zeros((3, 5), np.float32)}),
     r"unexpected key 'model.extra_proj.weight' with shape \(3, 5\).*expected shape: none"),
    ("shape", lambda sd: sd.update({K: np.zeros((64, 32), np.float32)}),
     rf"shape mismatch for '{K}': checkpoint has \(64, 32\), the model expects \(32, 64\)"),
])
def test_conversion_errors_name_key_and_shapes(release, tmp_path, case, edit, pattern):
  model = _broken(release, tmp_path, edit)
  with pytest.raises(ConversionError, match=pattern):
    convert.convert_release(model, release["vit"], release["bert"], str(tmp_path / "out"), image_size=42)


def test_stage1_from_hf_llama_and_instructblip(converted, release, tmp_path):
  """Plain HF LLaMA dir + InstructBLIP .pth -> same LLM / Q-Former / ViT params as the
  release conversion of the same weights; fresh projectors of the right shapes."""
  ref = release["ref"]
  llm = tmp_path / "vicuna"
  llm.mkdir()
  ref.llama.config.to_json_file(str(llm / "config.json"))
  torch.save({k: torch.from_numpy(v) for k, v in tl.torch_ref.state(ref.llama).items()}, llm / "pytorch_model.bin")
  for n in os.listdir(release["tok"]):
    shutil.copyfile(os.path.join(release["tok"], n), llm / n)
  blip = {"Qformer." + k[len("model.vlm_att_encoder."):]: v for k, v in tl.torch_ref.qformer_state(ref.qformer).items()}
  blip |= {"query_tokens": ref.extra["model.vlm_att_query"].numpy(), "Qformer.bert.embeddings.position_ids":
           np.arange(64)[None], "ln_vision.weight": ref.extra["model.vlm_att_ln.weight"].numpy(),
           "ln_vision.bias": ref.extra["model.vlm_att_ln.bias"].numpy(), "llm_proj.weight": np.zeros((4, 128), np.float32)}
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in blip.items()}}, tmp_path / "blip.pth")
  out = str(tmp_path / "stage1")
  cfg = convert.convert_stage1(str(llm), str(tmp_path / "blip.pth"), release["vit"], release["bert"], out,
                               image_size=42)
  assert cfg.qformer == ref.cfg.qformer and cfg.llm == ref.cfg.llm
  got, want = orbax_io.restore(out), orbax_io.restore(converted[0])
  for part in ("llm", "qformer", "vit"):
    jax.tree.map(np.testing.assert_array_equal, got[part], want[part])
  assert jax.tree.map(np.shape, got["token_gen"]) == jax.tree.map(np.shape, want["token_gen"])
  assert json.load(open(os.path.join(out, "conversion.json")))["skipped"] == {"position_ids": 1, "unused:llm_proj": 1}


def test_score_cli_matches_torch_reference(converted, release, tmp_path, capsys):
  """eval.score on stored ViT features: the release prompt, and the answer's summed
  log-probability equal to the torch reference's on the same ids."""
  from eval import score
  out, cfg = converted
  ref = release["ref"]
  frames = np.random.RandomState(1).randn(2, 42, 42, 3).astype(np.float32)
  with torch.no_grad():
    feats = ref.vit(torch.from_numpy(frames).permute(0, 3, 1, 2), output_hidden_states=True,
                    interpolate_pos_encoding=True).hidden_states[-1]
  np.save(tmp_path / "feats.npy", feats.numpy())
  question, answer = "what is in the video?", "a cat runs on the grass."
  score.main(["--ckpt", out, "--features", str(tmp_path / "feats.npy"), "--question", question,
              "--answer", answer])
  got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

  scorer = score.Scorer(out)
  ids, n_prompt = scorer.token_ids(question, answer)
  assert score.inference_prompt(question) == (
      "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
      "detailed, and polite answers to the user's questions. USER: <image>\nwhat is in the video? ASSISTANT:")
  tok = scorer.tokenizer
  before, after = score.inference_prompt(question).split("<image>")
  assert ids[:n_prompt] == tok(before).input_ids + [-200] + tok(after).input_ids[1:]
  assert ids.count(-200) == 1 and tok.decode(ids[n_prompt:]).strip() == answer
  qids = scorer.qtokenizer(question).input_ids
  logits = torch.from_numpy(ref.logits(ids, ref.tokens_from_features(feats, qids)))
  logp = logits.log_softmax(-1)
  shift = 2 * 2 - 1                                   # 2 frames x 2 tokens replace one placeholder
  want = [float(logp[i + shift - 1, ids[i]]) for i in range(n_prompt, len(ids))]
  assert got["num_tokens"] == len(want) == len(ids) - n_prompt > 3
  np.testing.assert_allclose(got["token_logprobs"], want, atol=TOL)
  assert abs(got["logprob"] - sum(want)) <= 10 * TOL
  print(f"SCORE logprob {got['logprob']:.5f} vs torch {sum(want):.5f}")


def test_release_names_come_from_the_registries():
  """config.json's `compress_type` (null = none) and `mm_projector_type`, and the
  projector's torch keys, are read off the `token_gen` registry entries."""
  from llamavid_jax.checkpoint import mapping
  from llamavid_jax.models import config as C
  from llamavid_jax.models import token_gen as TG
  for ours, theirs in (("mean", "mean"), ("grid:4", "grid:4"), ("none", None)):
    assert TG.compress_to_release(ours) == theirs and TG.compress_from_release(theirs) == ours
  with pytest.raises(ValueError, match="compress_type 'avg'"):
    TG.compress_from_release("avg")
  keys = lambda kind: sorted(mapping.projector_rules(C.LlamaVidConfig(mm_projector_type=kind, use_context_token=False)))
  assert keys("linear") == ["model.mm_projector.bias", "model.mm_projector.weight"]
  assert keys("mlp2x_gelu") == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
  assert mapping.projector_rules(C.LlamaVidConfig())["model.mm_projector.2.weight"].path == \
      ("token_gen", "mm_projector", "fc2", "kernel")


@pytest.fixture(scope="module")
def peaked(release, tmp_path_factory):
  """The release fixture's model with its LM head scaled by 24, written in the release
  layout and converted: next-token distributions peaked as a trained model's (the
  fixture's own log-probs sit within 0.05 of -log V, which no quantization moves)."""
  ref = copy.deepcopy(release["ref"])
  with torch.no_grad():
    ref.llama.lm_head.weight.mul_(24)
  root = tmp_path_factory.mktemp("peaked")
  src = tl.write_release(str(root / "bin"), ref, release["tok"], fmt="bin")
  out = str(root / "out")
  return out, convert.convert_release(src, release["vit"], release["bert"], out, image_size=42)


@pytest.mark.parametrize("mode, mean_max", [("int8", 0.05), ("int4", 0.3)])
@pytest.mark.slow
def test_a_converted_release_checkpoint_quantized_stays_close_to_fp32(peaked, mode, mean_max):
  """Qwix weights (`inference.load(quant=)`, as served) of a converted release-layout
  checkpoint: the log-prob of each next text token, teacher-forced on `_batch`, moves
  from fp32's by at most 0.05 on average in int8 and 0.3 in int4 (the max is printed)."""
  from llamavid_jax import inference
  from tests.test_quant import token_logprobs
  out, cfg = peaked
  batch = _batch(cfg, np.random.RandomState(0))
  logprobs = lambda m: token_logprobs(m.model_for([{}]), m.params, batch)
  want = logprobs(inference.load(out))
  assert want.std() > 0.8, want   # spread out (not a uniform -log V that nothing moves)
  delta = np.abs(logprobs(inference.load(out, quant=mode)) - want)
  print(f"QUANT converted release checkpoint, {mode}: mean |delta logprob| {delta.mean():.4f}, "
        f"max {delta.max():.4f} over {delta.size} tokens (fp32 log-probs {want.mean():.2f} +- {want.std():.2f})")
  assert 0 < delta.mean() <= mean_max, (delta.mean(), delta.max())
