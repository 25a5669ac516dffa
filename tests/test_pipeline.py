"""The whole pipeline through its entry points: exact CLI perplexity, pruning end to end,
errors a user can cause."""
import json

import numpy as np
import pytest

from blockprune_jax import pipeline
from blockprune_jax import validate
from blockprune_jax.prune import pruning
from blockprune_jax import model as model_lib
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax.errors import UserError
import cli
from conftest import tiny_config
from test_eval import torch_reference

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building.\n"
        " = Gameplay = \n\nPlayers move through the city at night, avoiding guards. ") * 6



@pytest.fixture
def text_dir(tmp_path):
  d = tmp_path / "wiki"
  d.mkdir()
  (d / "wiki.valid.raw").write_text(TEXT)
  (d / "wiki.test.raw").write_text(TEXT[::-1])
  (d / "wiki.train.raw").write_text(TEXT * 3)
  return str(d)


def _eval_flags(hf_dir, text, workdir, cache):
  return cli.command(workdir, f"--config.model.name_or_path={hf_dir}",
                     "--config.data.source=text", f"--config.data.text_dir={text}",
                     f"--config.data.cache_dir={cache}", "--config.data.seq_len=32",
                     "--config.eval.batch_size=3", config="configs/eval.py")


@pytest.mark.slow
def test_cli_perplexity_equals_a_pytorch_loop(hf_tiny_dir, text_dir, tmp_path):
  workdir = tmp_path / "zero_shot"
  cli.run(_eval_flags(hf_tiny_dir, text_dir, workdir, tmp_path / "cache"), check=True)
  results = json.load(open(workdir / "results.json"))
  tok = tok_lib.offline_gpt2_tokenizer()  # the tiny checkpoint has no tokenizer of its own
  for split, text in (("validation", TEXT), ("test", TEXT[::-1])):
    stream = tok(text)["input_ids"]
    ppl, count = torch_reference(hf_tiny_dir, stream, 32, 32)
    assert results["eval"][split]["tokens_scored"] == count
    assert abs(results["perplexity"][split] - ppl) / ppl < 1e-4
    assert results["eval"][split]["tokens_per_s"] > 0
  assert results["model"]["params_total"] == results["model"]["params_nonzero"]
  assert results["runtime"]["devices"] == 1 and results["runtime"]["backend"] == "cpu"


@pytest.mark.slow
def test_smaller_stride_equals_a_pytorch_loop(hf_tiny_dir, text_dir, tmp_path):
  config = tiny_config(model__init="pretrained", model__name_or_path=hf_tiny_dir,
                       data__source="text", data__text_dir=text_dir, data__tokenizer="",
                       data__cache_dir=str(tmp_path / "cache"), eval__stride=12,
                       eval__max_tokens=0)
  results = pipeline.run(config, str(tmp_path / "strided"))
  stream = tok_lib.offline_gpt2_tokenizer()(TEXT)["input_ids"]
  ppl, count = torch_reference(hf_tiny_dir, stream, 32, 12)
  assert results["eval"]["validation"]["tokens_scored"] == count == len(stream) - 1
  assert abs(results["perplexity"]["validation"] - ppl) / ppl < 1e-4
  assert results["runtime"]["devices"] == 4  # four fake CPU devices in-process


@pytest.mark.slow
def test_masked_finetuning_keeps_zero_pattern_and_measures_sparsity(tmp_path):
  config = tiny_config(prune__method="magnitude", prune__allocation="explicit",
                       prune__ratios=(0.3, 0.6), train__steps=8, export__hf=True)
  results = pipeline.run(config, str(tmp_path / "run"))
  # The masks of the initial parameters (one-shot before fine-tuning) ...
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=64,
                             dropout=0.0)
  masks = pruning.compute_masks(model_lib.init_params(cfg, config.seed), [0.3, 0.6],
                                method="magnitude", targets="mlp")
  # ... are exactly the zeros of the exported, fine-tuned model.
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "run" / "export"))
  for layer in range(2):
    for name in ("c_fc", "c_proj"):
      w = getattr(hf.transformer.h[layer].mlp, name).weight.detach().numpy()
      keep = np.asarray(masks[f"h_{layer}"]["mlp"][name]["kernel"])
      np.testing.assert_array_equal(w != 0, keep)
  sp = results["sparsity"]
  assert sp["per_block"] == pytest.approx([0.3, 0.6], abs=1e-4)
  assert sp["per_layer"][1]["c_fc"] == pytest.approx(0.6, abs=1e-4)
  assert results["pruning"]["ratios_per_block"] == [0.3, 0.6]
  assert results["pruning"]["block_layers"] == [[0], [1]]
  assert results["model"]["params_nonzero"] < results["model"]["params_total"]
  del torch


@pytest.mark.slow
def test_gradual_pruning_reaches_its_target(tmp_path):
  config = tiny_config(prune__method="magnitude", prune__targets="all", prune__schedule="gradual",
                       prune__target=0.5, prune__start=0.2, prune__end=0.6, prune__every=2.0,
                       train__steps=20)
  results = pipeline.run(config, str(tmp_path / "gmp"))
  assert results["sparsity"]["overall"] == pytest.approx(0.5, abs=2e-3)
  assert results["train"]["steps"] == 20


@pytest.mark.slow
def test_neurons_compacted_evaluation_equals_masked(tmp_path):
  runs = [pipeline.run(tiny_config(prune__method="neurons", prune__target=0.5,
                                   prune__compact=compact), str(tmp_path / str(compact)))
          for compact in (True, False)]
  assert runs[0]["pruning"]["compacted_mlp_widths"] == [64, 64]
  assert runs[1]["pruning"]["compacted_mlp_widths"] is None
  assert runs[0]["perplexity"]["validation"] == pytest.approx(runs[1]["perplexity"]["validation"],
                                                              rel=1e-5)


@pytest.mark.slow
def test_wanda_with_owl_allocation_runs(tmp_path):
  results = pipeline.run(tiny_config(prune__method="wanda", prune__allocation="owl",
                                     prune__target=0.4, prune__owl_lambda=0.1),
                         str(tmp_path / "wanda"))
  ratios = results["pruning"]["ratios_per_layer"]
  assert all(0.3 - 1e-9 <= r <= 0.5 + 1e-9 for r in ratios)
  assert results["sparsity"]["overall"] == pytest.approx(0.4, abs=0.02)


@pytest.mark.slow
def test_a_user_error_is_one_clear_line_from_the_cli(tmp_path):
  r = cli.run(cli.command(tmp_path / "w", "--config.data.source=wiki"))
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "error: data.source='wiki' is not one of hf, text, builtin")
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("overrides,needle", [
    (dict(data__source="text", data__text_dir="/nonexistent/dir"), "/nonexistent/dir"),
    (dict(prune__method="magnitude", prune__allocation="explicit", prune__ratios=(0.5,)),
     "prune.ratios"),
    (dict(prune__method="magnitude", prune__allocation="explicit", prune__ratios=(0.5, 1.2)),
     "1.2"),
    (dict(prune__method="magnitude", prune__blocks=5), "prune.blocks"),
    (dict(train__grad_accum=0), "train.grad_accum"),
    (dict(model__init="pretrained", model__name_or_path="/no/such/model"), "model.name_or_path"),
])
def test_user_errors_name_the_key(tmp_path, overrides, needle):
  with pytest.raises(UserError) as e:
    pipeline.run(tiny_config(**overrides), str(tmp_path / "w"))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_validate_rejects_bad_stride():
  with pytest.raises(UserError, match="eval.stride"):
    validate.validate(tiny_config(eval__stride=100))
