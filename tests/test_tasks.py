"""Zero-shot tasks (blockprune_jax/tasks.py) against lm-evaluation-harness's own Hugging Face
backend (HFLM) on the same tiny GPT-2, on local tasks the tests write (JSONL + YAML)."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from blockprune_jax import compile_stats
from blockprune_jax import hf_io
from blockprune_jax import parallel
from blockprune_jax.prune import pruning
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import validate
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax.bench.tasks import write_tasks
from blockprune_jax.errors import UserError

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_tasks(str(tmp_path_factory.mktemp("lm_tasks")))


@pytest.fixture(scope="module")
def models(hf_tiny_dir, tmp_path_factory):
  """(model_cfg, dense params, pruned params, dir of the pruned export, tokenizer)."""
  tok = tok_lib.offline_gpt2_tokenizer()
  cfg = hf_io.load_config(hf_tiny_dir)
  params = hf_io.load_params(hf_tiny_dir, cfg)
  masks = pruning.compute_masks(params, [0.5] * cfg.n_layer, method="magnitude", targets="all")
  pruned = pruning.apply_masks(params, masks)
  out = hf_io.export(jax.device_get(pruned), cfg, str(tmp_path_factory.mktemp("pruned")), tok)
  return cfg, params, pruned, out, tok


def _samples(lm, task_dir, names):
  """{task: [each document's filtered responses]} from the harness's own evaluation loop."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, log_samples=True,
                                task_manager=tasks_lib.task_manager(task_dir),
                                bootstrap_iters=0)
  return ({t: [s["filtered_resps"] for s in sorted(v, key=lambda s: s["doc_id"])]
           for t, v in out["samples"].items()},
          {t: tasks_lib.metrics_of(e) for t, e in out["results"].items()})


@pytest.fixture(scope="module")
def reference(models, hf_tiny_dir, task_dir):
  """HFLM's samples and metrics for the dense and the pruned model."""
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  cfg, _, _, pruned_dir, tok = models
  del cfg
  names = ["tiny_mc", "tiny_rolling", "tiny_gen"]
  return {pruned: _samples(HFLM(pretrained=d, tokenizer=tok, batch_size=4, device="cpu"),
                           task_dir, names)
          for pruned, d in ((False, hf_tiny_dir), (True, pruned_dir))}


def _close(ours, theirs):
  """Same strings / greedy flags; log-likelihoods within 1e-4, plus float32 rounding of a sum
  over many tokens for whole documents (2e-7 relative: 1.2e-4 apart at -973 over ~200 tokens)."""
  if isinstance(theirs, str):
    return ours == theirs
  if isinstance(theirs, (list, tuple)):
    return len(ours) == len(theirs) and all(_close(a, b) for a, b in zip(ours, theirs))
  if isinstance(theirs, bool):
    return bool(ours) == theirs
  return abs(float(ours) - float(theirs)) <= 1e-4 + 2e-7 * abs(float(theirs))


@pytest.mark.slow
@pytest.mark.parametrize("n_dev,pruned", [(1, False), (4, True), (4, False), (1, True)])
def test_matches_hflm(models, reference, task_dir, n_dev, pruned):
  cfg, dense, masked, _, tok = models
  mesh = Mesh(np.array(jax.devices()[:n_dev]), (parallel.AXIS,))
  lm = tasks_lib.FlaxLM(masked if pruned else dense, cfg, tok, mesh, batch_size=3,
                         progress=False)
  with compile_stats.counting() as compiled:
    ours, our_metrics = _samples(lm, task_dir, ["tiny_mc", "tiny_rolling", "tiny_gen"])
  # ~40 scoring batches of lengths 5..64 (3 per batch): one program per bucket (16, 32, 64)
  scoring = compiled["by_name"].get("jit(score_step)", 0)
  assert scoring <= 3, compiled
  if (n_dev, pruned) == (1, False):  # the first case compiles them (later ones reuse them)
    assert scoring >= 2, compiled
  theirs, their_metrics = reference[pruned]
  for task in theirs:
    assert _close(ours[task], theirs[task]), (task, ours[task], theirs[task])
  assert our_metrics["tiny_mc"]["acc"] == their_metrics["tiny_mc"]["acc"]
  assert our_metrics["tiny_mc"]["acc_norm"] == their_metrics["tiny_mc"]["acc_norm"]
  assert our_metrics["tiny_rolling"]["word_perplexity"] == pytest.approx(
      their_metrics["tiny_rolling"]["word_perplexity"], rel=1e-5)
  if pruned:  # the masks change the model: the pruned scores differ from the dense ones
    assert not _close(ours["tiny_rolling"], reference[False][0]["tiny_rolling"])


@pytest.mark.slow
def test_sweep_scores_tasks_one_shot_and_fine_tuned(task_dir, tmp_path, capsys):
  """A pruned run and its dense control side by side (batched.py), each scored by the pipeline:
  results.json's `tasks` / `oneshot_tasks`, and the report's and console table's columns."""
  from blockprune_jax import sweep  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__steps=2, prune__method="magnitude", prune__target=0.5,
                       eval__tasks=("tiny_mc,tiny_rolling",), eval__task_dir=task_dir,
                       eval__task_limit=6, sweep__batch_runs=2)
  rows = sweep.run_sweep(config, str(tmp_path), [{"seed": 0}])
  assert [r["status"] for r in rows] == ["done", "done"], rows
  results = {r["name"]: json.load(open(os.path.join(r["workdir"], "results.json"))) for r in rows}
  pruned = next(r for r in results.values() if r["role"] != "control")
  control = next(r for r in results.values() if r["role"] == "control")
  for scores in (pruned["tasks"], pruned["oneshot_tasks"], control["tasks"]):
    assert set(scores) == {"tiny_mc", "tiny_rolling"}
    assert 0.0 <= scores["tiny_mc"]["acc"] <= 1.0 and scores["tiny_mc"]["acc_stderr"] > 0
    assert scores["tiny_rolling"]["word_perplexity"] > 1.0
  assert "oneshot_tasks" not in control  # a dense run has no one-shot stage
  assert pruned["runtime"]["batch"]["runs"] == 2  # trained side by side, scored per run
  from blockprune_jax import config_lib  # pylint: disable=import-outside-toplevel  # W&B summary keys
  assert config_lib.flatten(pruned, sep="/")["tasks/tiny_mc/acc"] == pruned["tasks"]["tiny_mc"]["acc"]
  # fine-tuning changed the weights: the rolling task scores differently than right after pruning
  assert pruned["tasks"]["tiny_rolling"] != pruned["oneshot_tasks"]["tiny_rolling"]
  table = capsys.readouterr().out
  md = open(os.path.join(tmp_path, "report.md")).read()
  csv = open(os.path.join(tmp_path, "report.csv")).read()
  for text in (table, md, csv):
    assert "tiny_mc/acc" in text and "oneshot/tiny_rolling/word_perplexity" in text
  assert f"{pruned['tasks']['tiny_mc']['acc']:.4f}" in md
  from blockprune_jax import pipeline  # pylint: disable=import-outside-toplevel
  summary = pipeline.summary_table(pruned)  # what a single run prints at its end
  assert f"acc {pruned['tasks']['tiny_mc']['acc']:.4f} (one-shot " in summary


@pytest.mark.slow
def test_bad_task_input_is_one_line(task_dir, tmp_path):
  from blockprune_jax import pipeline  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel

  def refused(**overrides):
    with pytest.raises(UserError) as e:
      validate.validate(tiny_config(**overrides))
    assert "\n" not in str(e.value)
    return str(e.value)

  message = refused(eval__tasks=("tiny_mcq",), eval__task_dir=task_dir)
  assert "'tiny_mcq'" in message and "tiny_mc" in message  # the name and a near match
  # the harness's own tasks too (the same task manager: indexing ~15k YAMLs takes seconds)
  assert "hellaswag" in refused(eval__tasks=("hellaswg",), eval__task_dir=task_dir)
  not_dir = tmp_path / "file.yaml"
  not_dir.write_text("task: x\n")
  assert "eval.task_dir" in refused(eval__tasks=("tiny_mc",), eval__task_dir=str(not_dir))
  # a hub task with the hub unreachable (the tests run with HF_HUB_OFFLINE=1): one line, before
  # the run trains (no checkpoint written)
  workdir = tmp_path / "offline"
  with pytest.raises(UserError) as e:
    pipeline.run(tiny_config(eval__tasks=("piqa",), eval__task_dir=task_dir, train__steps=50),
                 str(workdir), echo=False)
  assert "'piqa'" in str(e.value) and "\n" not in str(e.value)
  assert not (workdir / "checkpoints").exists() and not (workdir / "results.json").exists()


def test_allocation_study_takes_tasks_in_one_override(task_dir):
  """configs/allocation_study.py:offline with --config.eval.tasks: every run of the sweep
  validates (the check main makes before the first run starts)."""
  from blockprune_jax import config_lib, sweep  # pylint: disable=import-outside-toplevel
  from conftest import REPO  # pylint: disable=import-outside-toplevel
  path = os.path.join(REPO, "configs", "allocation_study.py")
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("allocation_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = config_lib.apply_overrides(module.get_config("offline"), {
      "eval.tasks": ("tiny_mc,tiny_rolling",), "eval.task_dir": task_dir})
  runs = sweep.expand_sweep(config, None, module.get_sweep("offline"))
  for run in runs:
    validate.validate(config_lib.apply_overrides(config, run))
  assert tasks_lib.task_names(config) == ["tiny_mc", "tiny_rolling"]
