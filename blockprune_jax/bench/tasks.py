"""Zero-shot task speed (docs/tasks.md): our FlaxLM vs the harness's HFLM on the same model.

    python -m blockprune_jax.bench tasks --preset=tiny --seq_len=256 --batch=8 --steps=200

A random GPT-2 of the preset's shape scores a local multiple-choice task of --steps documents
(write_tasks) through the harness's loop, as FlaxLM (a first pass that compiles, then a compiled
one) and as HFLM on its export; the record gives requests/s, compilations, the largest difference.
"""
import json
import os
import tempfile
import time

import jax
import numpy as np

from blockprune_jax import compile_stats
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import tokenizer as tok_lib

WORDS = ("the cat sat on a mat while rain fell over quiet hills and the old river ran past "
         "stone bridges toward a grey sea where ships waited for morning light").split()


def _text(rng, n):
  return " ".join(rng.choice(WORDS, n))


def write_tasks(root: str, n_mc: int = 12) -> str:
  """Local tasks (JSONL + YAML) under root/tasks, returned: tiny_mc (multiple choice, n_mc
  documents of mixed lengths), tiny_rolling (loglikelihood_rolling), tiny_gen (generate_until)."""
  rng = np.random.RandomState(0)
  d = os.path.join(root, "tasks")
  os.makedirs(d, exist_ok=True)
  docs = {
      # contexts of mixed lengths, 2-4 choices of 1-3 words: several bucket lengths
      "mc": [{"question": _text(rng, int(rng.randint(2, 40))),
              "choices": [_text(rng, int(rng.randint(1, 4)))
                          for _ in range(int(rng.randint(2, 5)))],
              "answer": 0} for _ in range(n_mc)],
      # one text longer than n_positions=64 tokens: several rolling windows
      "rolling": [{"text": _text(rng, n)} for n in (3, 20, 90)],
      "gen": [{"question": _text(rng, int(rng.randint(3, 20))), "answer": "the"} for _ in range(3)],
  }
  for name, rows in docs.items():
    with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            "test_split: test\n")
  yamls = {
      "tiny_mc": ("mc", "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                  "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                  "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
      "tiny_rolling": ("rolling", "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
                       "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n"
                       "  - metric: bits_per_byte\n"),
      "tiny_gen": ("gen", "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
                   "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\".\"]\n"
                   "  max_gen_toks: 6\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n"),
  }
  for task, (data, body) in yamls.items():
    with open(os.path.join(d, f"{task}.yaml"), "w") as f:
      f.write(f"task: {task}\n" + common.format(path=os.path.join(d, f"{data}.jsonl")) + body)
  return d


def _timed(lm, task_dir):
  """(seconds, requests, [each document's log-likelihoods]) of tiny_mc through the harness."""
  import lm_eval  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], num_fewshot=0, log_samples=True,
                                task_manager=tasks_lib.task_manager(task_dir), bootstrap_iters=0)
  seconds = time.time() - t0
  docs = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
  lls = [float(r[0]) for d in docs for r in d["filtered_resps"]]
  return seconds, len(lls), lls


def run(*, preset_shape, n_positions, batch, docs, workdir="") -> dict:
  """Requests/s of FlaxLM and HFLM on one local multiple-choice task, and our compilations."""
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  n_layer, n_embd, n_head = preset_shape
  cfg = model_lib.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                             n_positions=n_positions, dropout=0.0)
  workdir = workdir or tempfile.mkdtemp(prefix="bench_tasks_")
  tok = tok_lib.offline_gpt2_tokenizer()
  params = jax.device_get(model_lib.init_params(cfg, seed=0))
  hf_dir = hf_io.export(params, cfg, os.path.join(workdir, "model"), tok)
  task_dir = write_tasks(workdir, n_mc=docs)
  ours = tasks_lib.FlaxLM(params, cfg, tok, batch_size=batch, progress=False)
  with compile_stats.counting() as compiled:
    first_s, n, our_ll = _timed(ours, task_dir)  # compiles one program per length bucket
  our_s = _timed(ours, task_dir)[0]  # steady state: what a task of thousands of documents sees
  their_s, _, their_ll = _timed(HFLM(pretrained=hf_dir, tokenizer=tok, batch_size=batch,
                                     device="cuda" if jax.default_backend() == "gpu" else "cpu"),
                                task_dir)
  return {"bench": "tasks", "backend": jax.default_backend(), "devices": jax.device_count(),
          "shape": list(preset_shape), "n_positions": n_positions, "batch": batch,
          "requests": n, "ours_requests_per_s": n / our_s,
          "ours_first_pass_requests_per_s": n / first_s, "hflm_requests_per_s": n / their_s,
          "speedup_vs_hflm": their_s / our_s, "compilations": compiled["compilations"],
          "compiled": compiled["by_name"],
          "max_abs_loglikelihood_diff": float(np.max(np.abs(np.subtract(our_ll, their_ll))))}

