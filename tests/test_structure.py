"""The package's shape: no import cycle between its modules (function-level imports included),
no function over 80 lines."""
import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blockprune_jax")


def _modules() -> dict:
  """{dotted module name below blockprune_jax ('train', 'prune.plan', ...): its file}."""
  found = {}
  for root, _, names in os.walk(PKG):
    for name in names:
      if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
        rel = os.path.relpath(os.path.join(root, name), PKG)[:-3]
        found[rel.replace(os.sep, ".")] = os.path.join(root, name)
      elif name == "__init__.py" and root != PKG:  # a package with code of its own (report)
        found[os.path.relpath(root, PKG).replace(os.sep, ".")] = os.path.join(root, name)
  return found


def _imports(path, modules):
  """The blockprune_jax modules imported anywhere in a file (function-level imports too)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blockprune_jax"):
      base = node.module[len("blockprune_jax."):] if "." in node.module else ""
      for a in node.names:
        name = f"{base}.{a.name}" if base else a.name
        found.add(name if name in modules else base)
    elif isinstance(node, ast.Import):
      found.update(a.name[len("blockprune_jax."):] for a in node.names
                   if a.name.startswith("blockprune_jax."))
  return found


def test_no_import_cycles():
  modules = _modules()
  graph = {m: (_imports(path, modules) & set(modules)) - {m} for m, path in modules.items()}
  assert graph["pipeline"] and "sweep" not in graph["pipeline"]
  assert "prune.plan" in graph["lifecycle"]  # names inside the subpackages are seen

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
  for root, _, names in sorted(os.walk(PKG)):
    for f in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(root, f)
      found += [f"{os.path.relpath(path, PKG)}: {x}"
                for x in _long_functions(open(path).read(), MAX_FUNCTION_LINES)]
  assert not found, "split these functions (at most 80 lines each): " + ", ".join(found)
