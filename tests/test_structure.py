"""The package's shape: no import cycle between its modules (function-level imports included),
no function over 80 lines."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blockprune_jax")


def _imports(path):
  """Names of blockprune_jax modules imported anywhere in a file."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == "blockprune_jax":
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blockprune_jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found.update(a.name.split(".")[1] for a in node.names
                   if a.name.startswith("blockprune_jax."))
  return found


def test_no_import_cycles():
  modules = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
  graph = {m: _imports(os.path.join(PKG, m + ".py")) & modules for m in modules}
  assert graph["pipeline"] and "sweep" not in graph["pipeline"]

  def cycle_from(m, stack):
    if m in stack:
      return stack[stack.index(m):] + [m]
    for n in sorted(graph[m]):
      found = cycle_from(n, stack + [m])
      if found:
        return found
    return None
  for m in sorted(modules):
    assert cycle_from(m, []) is None, " -> ".join(cycle_from(m, []))


MAX_FUNCTION_LINES = 80


def _long_functions(source: str, limit: int) -> list[str]:
  """'name (n lines)' of every function or method in `source` longer than `limit` lines (its
  decorators, docstring and nested functions counted)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      if n > limit:
        found.append(f"{node.name} ({n} lines)")
  return found


def test_no_function_over_80_lines():
  long_one = "def f():\n" + "  x = 1\n" * MAX_FUNCTION_LINES
  assert _long_functions(long_one, MAX_FUNCTION_LINES) == [f"f ({MAX_FUNCTION_LINES + 1} lines)"]
  found = []
  for f in sorted(os.listdir(PKG)):
    if f.endswith(".py"):
      found += [f"{f}: {x}" for x in _long_functions(open(os.path.join(PKG, f)).read(),
                                                      MAX_FUNCTION_LINES)]
  assert not found, "split these functions (at most 80 lines each): " + ", ".join(found)
