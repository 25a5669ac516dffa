"""bench.allocation on a folder of text (--corpus), as issue 24 runs it on WikiText-2's files."""
import os

import pytest

from blockprune_jax.bench import allocation as bench_allocation
from blockprune_jax.errors import UserError

# WikiText-2's .tokens layout: lines of " = Title = " and paragraphs, blank lines holding a space.
ARTICLE = (" \n = {title} = \n \n The {title} is a small {thing} that lives near the river , and it "
           "is known for its long {thing} . \n \n")


def write_corpus(folder, articles=60):
  os.makedirs(folder, exist_ok=True)
  for name, offset in (("wiki.valid.tokens", 0), ("wiki.test.tokens", articles)):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      f.write("".join(ARTICLE.format(title=f"Bird {i}", thing=("song", "tail", "wing")[i % 3])
                      for i in range(offset, offset + articles)))
  return folder


def test_a_corpus_without_a_train_file_is_split_from_its_validation_text(tmp_path):
  corpus = write_corpus(str(tmp_path / "wikitext"))
  out = bench_allocation.corpus_dir(corpus, str(tmp_path / "root"))
  read = lambda d, n: open(os.path.join(d, n), encoding="utf-8").read()
  train, validation = read(out, "train.txt"), read(out, "validation.txt")
  assert train + validation == read(corpus, "wiki.valid.tokens")
  assert train.endswith("\n") and 0.85 < len(train) / (len(train) + len(validation)) < 0.95
  assert read(out, "test.txt") == read(corpus, "wiki.test.tokens")
  mtime = os.stat(os.path.join(out, "train.txt")).st_mtime_ns
  assert bench_allocation.corpus_dir(corpus, str(tmp_path / "root")) == out
  assert os.stat(os.path.join(out, "train.txt")).st_mtime_ns == mtime  # the token cache stays valid
  with open(os.path.join(corpus, "train.txt"), "w", encoding="utf-8") as f:
    f.write(train)
  assert bench_allocation.corpus_dir(corpus, str(tmp_path / "root")) == corpus


def test_the_tokenizer_option_picks_the_offline_gpt2_vocabulary(tmp_path):
  config = bench_allocation.model_config(4, 128, 0, 600, str(tmp_path), text_dir="/data/wikitext",
                                         tokenizer="gpt2")
  assert config.data.tokenizer == "gpt2-offline" and config.data.source == "text"
  assert config.base.dir.endswith("4x128_s0_600_t64_wikitext_gpt2")
  builtin = bench_allocation.model_config(4, 128, 0, 600, str(tmp_path))
  assert builtin.data.source == "builtin" and builtin.base.dir.endswith("4x128_s0_600_t64")


@pytest.mark.parametrize("extra, why", [("0.8,0.8,0.8", "need 2 ratios"), ("0.5,0.5", "theirs is 0.5000"),
                                        ("a,b", "as numbers")])
def test_a_wrong_hand_picked_vector_is_one_clear_line(extra, why):
  with pytest.raises(UserError, match=why):
    bench_allocation.extra_vectors([extra], [10, 10], 0.8)


def test_the_bench_scores_a_hand_picked_vector_on_a_text_corpus(tmp_path):
  """A 2-layer model trained briefly on the folder's text: every allocation, the --extra vector
  among them, is scored on the test file, and the measured ones spend calibration evaluations
  (here on held-out validation sequences, --score_split)."""
  corpus = write_corpus(str(tmp_path / "wikitext"))
  args = bench_allocation.parse_args([
      f"--corpus={corpus}", "--steps=10", "--seq_len=32", "--grid_step=0", "--calib_batches=8", "--rounds=1",
      "--search_evals=6", "--eval_tokens=2000", "--extra=0.7,0.9", "--score_split=validation",
      f"--root={tmp_path / 'root'}"])
  rec = bench_allocation.run_model("2x32:0", args)
  assert rec["ratios"]["extra 0.7,0.9"] == [0.7, 0.9] and rec["score_split"] == "validation"
  assert set(rec["ppl"]) == set(bench_allocation.GENERATED) | {"sensitivity", "search",
                                                              "extra 0.7,0.9"}
  assert all(1 < p < 300 for p in rec["ppl"].values()), rec["ppl"]
  assert rec["dense_ppl"] < rec["ppl"]["uniform"]
  assert 0 < rec["calib_evals"]["sensitivity"] < rec["calib_evals"]["search"]
  assert "| 2x32:0 |" in bench_allocation.table([rec])
