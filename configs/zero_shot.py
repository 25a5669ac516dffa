"""Zero-shot accuracy of a (pruned) GPT-2 on the tasks pruning papers report, beside perplexity.

    python -m blockprune_jax.main --config=configs/zero_shot.py --workdir=runs/zero_shot_gpt2 \
        --config.model.name_or_path=gpt2

lm-evaluation-harness (`pip install -e '.[tasks]'`) scores LAMBADA (OpenAI), HellaSwag, PIQA,
ARC-Easy and WinoGrande zero-shot with our Flax model (blockprune_jax/tasks.py); the datasets come
from the Hugging Face hub on first use (then from its cache). Results: `tasks` in results.json
({task: {acc, acc_stderr, ...}}), beside WikiText-2 perplexity. Score a pruned model by pointing
model.name_or_path at its export (a workdir run with --config.export.hf=true, or that export/
directory), or prune here: --config.prune.method=magnitude --config.prune.target=0.5 (one-shot;
add --config.train.epochs=1 to fine-tune, which also scores the tasks right after pruning as
`oneshot_tasks`). Quick check: --config.eval.task_limit=100 (documents per task).
"""
from configs import eval as eval_config

TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "winogrande")


def get_config():
  c = eval_config.get_config()
  c.eval.tasks = TASKS
  c.eval.num_fewshot = 0
  return c
