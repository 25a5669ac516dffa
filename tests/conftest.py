"""Test setup: four fake CPU devices (set before JAX starts) and small shared fixtures.

`python -m pytest -m "not slow"` skips the tests marked slow (training runs, sweeps, subprocesses):
the quick loop; CI (`.ci/run`) runs them all. The command-line harness is tests/cli.py."""
import os
import signal
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# As flax's lm1b tests do: XLA's optimisation passes cost more compile time than the tiny test
# models ever win back (subprocesses inherit it through the environment).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
# Token caches and JAX's persistent compilation cache of this session only: a test that counts
# compilations must not find programs an earlier session left in ~/.cache.
os.environ.setdefault("BLOCKPRUNE_CACHE", tempfile.mkdtemp(prefix="blockprune_tests_"))
# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would the runs the Ctrl-C tests start (an ignored signal stays ignored across
# exec): give them the terminal's default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


TINY_CONFIG = os.path.join(os.path.dirname(__file__), "tiny.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra):
  """Environment for `python -m blockprune_jax...` subprocesses: one CPU device, this checkout."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory):
  """A tiny random GPT-2 saved by transformers (PyTorch), with every parameter perturbed so
  biases and LayerNorms are not trivially 0 / 1."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)
  model = transformers.GPT2LMHeadModel(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "wte" not in name:
        p.add_(0.05 * torch.randn_like(p))
  d = tmp_path_factory.mktemp("hf_tiny")
  model.save_pretrained(d)
  return str(d)


@pytest.fixture
def rng():
  return np.random.RandomState(0)


def tiny_config(**overrides):
  """tests/tiny.py's config with dotted keys given as '__', e.g. tiny_config(train__steps=5)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny_config", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from blockprune_jax import config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.apply_overrides(module.get_config(),
                               {k.replace("__", "."): v for k, v in overrides.items()})


@pytest.fixture
def small_disk(tmp_path):
  """`make(size_kb)`: a directory on a tmpfs of that size, unmounted at the end, with
  `make.resize(path, size_kb)` to give it more room. Skipped where mounting is not allowed
  (not root, no mount command, or a container without the capability)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  mounted = []

  def mount(*args):
    try:
      r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
      pytest.skip(f"cannot run mount here ({e}): the full-disk test needs a small tmpfs")
    if r.returncode:
      pytest.skip(f"cannot mount a small tmpfs here (mount: {r.stderr.strip()}; it needs root "
                  "or CAP_SYS_ADMIN): the full-disk test needs one")

  def make(size_kb):
    path = tmp_path / f"disk{len(mounted)}"
    path.mkdir()
    mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path))
    mounted.append(path)
    return path

  make.resize = lambda path, size_kb: mount("-o", f"remount,size={size_kb}k", str(path))
  yield make
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """`get(command)`: the workdir and process of `command(workdir)` run once to its end without a
  fault. Each distinct command runs once a session; every test that compares an interrupted run
  with it shares that one reference."""
  import cli  # pylint: disable=import-outside-toplevel  (cli imports this module)
  done = {}

  def get(command):
    key = tuple(command("{workdir}"))
    if key not in done:
      workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
      done[key] = workdir, cli.run(command(workdir), check=True)
    return done[key]
  return get


def tiny_training(dropout=0.0, learning_rate=1e-2):
  """A 2-layer, 32-wide GPT-2 config and the AdamW settings of the step-level training tests:
  (model config, train config, optimizer, learning rates of a 10-step cosine schedule)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from blockprune_jax import train  # pylint: disable=import-outside-toplevel
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=32,
                             dropout=dropout)
  t_cfg = ml_collections.ConfigDict(dict(warmup_steps=1, learning_rate=learning_rate,
                                         schedule="cosine", grad_clip=1.0, b1=0.9, b2=0.99,
                                         weight_decay=0.1))
  opt, schedule = train.make_optimizer(t_cfg, 10)
  return cfg, t_cfg, opt, train.learning_rates(schedule, 10)
