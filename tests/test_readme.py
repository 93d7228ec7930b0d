"""The README's code example runs as written, and the docs stay inside the repository:
no `../shared` pointers, every path the layout section names exists."""

import os
import re

import numpy as np
import pytest

from llamavid_jax.models.splice import spliced_length

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
  with open(os.path.join(REPO, name), encoding="utf-8") as f:
    return f.read()


def _section(text, title):
  """The text of the `## title` section (up to the next `## ` heading)."""
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end != -1 else len(text)]


@pytest.mark.slow
def test_model_in_code_example_runs_and_its_shapes_hold():
  section = _section(_read("README.md"), "The model in code")
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  ns = {"__name__": "readme_example"}
  exec(compile(code, "README.md:The model in code", "exec"), ns)
  cfg, batch, logits, out, tokens = ns["cfg"], ns["batch"], ns["logits"], ns["out"], ns["tokens"]
  b, s = batch["input_ids"].shape
  t = batch["frame_mask"].shape[1]
  p = batch["qformer_ids"].shape[1]
  s_out = spliced_length(s, t, cfg.tokens_per_frame, p)
  assert s_out > s                                   # frame tokens were spliced in
  assert logits.shape == (b, s_out, cfg.llm.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()
  assert out["layout"].valid.shape == (b, s_out)
  # every valid frame gives tokens_per_frame visual positions; text padding and padding frames drop out
  n_vis = np.asarray(out["layout"].is_vis).sum(1)
  np.testing.assert_array_equal(n_vis, np.asarray(batch["frame_mask"]).sum(1) * cfg.tokens_per_frame * p)
  n_text = np.asarray(batch["text_mask"]).sum(1) - (np.asarray(batch["input_ids"]) == cfg.image_token_id).sum(1)
  np.testing.assert_array_equal(np.asarray(out["layout"].valid).sum(1), n_vis + n_text)
  m, n = cfg.qformer.num_query, cfg.vision.grid ** 2
  assert out["context_attention"].shape == (b, p, t, m, n)
  max_new = int(re.search(r"max_new_tokens=(\d+)", code).group(1))   # what the example asks for
  assert tokens.shape == (b, max_new)
  tok = np.asarray(tokens)
  assert ((tok >= 0) & (tok < cfg.llm.vocab_size)).all()


def test_docs_have_no_pointer_outside_the_repository():
  names = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                           if f.endswith(".md")]
  assert len(names) >= 3, names                     # README + architecture.md + release_facts.md
  for name in names:
    assert "../shared" not in _read(name), name
    assert "DESIGN.md" not in _read(name), name


def _layout_tree_paths(block):
  """Paths of the layout tree: indentation (2 spaces a level) gives the parent folder;
  the name column ends at the first run of 2+ spaces (a line may name several files)."""
  paths, parents = [], []
  for line in block.splitlines():
    if not line.strip():
      continue
    depth = (len(line) - len(line.lstrip(" "))) // 2
    names = re.split(r"\s{2,}", line.strip())[0].split()
    parents = parents[:depth]
    for name in names:
      path = "".join(parents) + name
      paths.append(path)
    if names[-1].endswith("/"):
      parents = parents + [names[-1]]
  return paths


def test_every_path_in_the_readme_layout_exists():
  section = _section(_read("README.md"), "Layout")
  block = re.search(r"```\n(.*?)```", section, re.S).group(1)
  tree = _layout_tree_paths(block)
  assert {"llamavid_jax/models/llamavid.py", "llamavid_jax/ops/attention/", "docs/"} <= set(tree), tree
  ticked = [p for p in re.findall(r"`([^`\s]+)`", section) if "/" in p or p.endswith((".py", ".md"))]
  assert "docs/architecture.md" in ticked and "docs/release_facts.md" in ticked, ticked
  missing = [p for p in tree + ticked if not os.path.exists(os.path.join(REPO, p))]
  assert not missing, missing
