"""The codebase's own rules (docs/design.md, "Rules"), checked on the source with ast: no module imported,
nothing compiled, a second or two.

* modules in vggjax/ at most 500 lines, functions and classes at most 100, command modules (the values of
  ``cli.COMMANDS``) at most 250: commands are shells over library modules;
* no import circle among vggjax's modules, imports inside functions included;
* no library module imports a command module;
* no config file loaded by path (``spec_from_file_location``) in vggjax/;
* the process and CPU-device flags are defined in cli.py only;
* no private access across modules (``noqa: SLF001``);
* imports inside functions only for optional dependencies (and JAX in cli.py, which runs before JAX may be
  touched; etils in rundir.py, which launch/ reads without the package's dependencies).
"""

from __future__ import annotations

import ast
import functools
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'vggjax'

MAX_MODULE_LINES = 500
MAX_DEFINITION_LINES = 100
MAX_COMMAND_LINES = 250
PROCESS_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'num_cpu_devices')
# Imported where they are used, never at a module's top: dependencies of one feature, not installed with
# the package (extras), or installed on some platforms only.
OPTIONAL = frozenset({
    'torch', 'torchvision', 'safetensors', 'h5py', 'keras', 'tensorflow', 'tensorboardX', 'matplotlib',
    'libtpu', 'cv2', 'jax2onnx', 'onnx', 'onnxruntime', 'wandb', 'mlflow', 'gcsfs', 'google', 'IPython',
    'array_record', 'requests',
    # Absent where vggjax runs on a bare JAX install (a GPU machine without TF, TFDS or Grain):
    'grain',  # checkpoints.TrainCheckpointer only (the data iterator's state): loading weights needs none
    'tensorflow_datasets',  # data.sources' data.source=tfds only
    'sklearn',  # data.sources' built-in digits demo only
})
OPTIONAL_IN = {'vggjax.cli': frozenset({'jax'}), 'vggjax.rundir': frozenset({'etils'})}


@functools.cache
def modules() -> dict[str, tuple[pathlib.Path, ast.Module, str]]:
  """vggjax's modules by dotted name: (path, tree, source). The shipped configs are included."""
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')) + sorted((PACKAGE / 'configs').glob('*.py')):
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    name = '.'.join(('vggjax', *parts[:-1]) if parts[-1] == '__init__' else ('vggjax', *parts))
    if name not in out:
      source = path.read_text()
      out[name] = (path, ast.parse(source, str(path)), source)
  return out


def command_modules() -> set[str]:
  tree = modules()['vggjax.cli'][1]
  for node in ast.walk(tree):
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, 'target', None)]
    if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict) and
        any(isinstance(t, ast.Name) and t.id == 'COMMANDS' for t in targets)):
      return {ast.literal_eval(v)[0] for v in node.value.values}
  raise AssertionError('cli.py has no COMMANDS table')


def rel(name: str) -> str:
  return str(modules()[name][0].relative_to(REPO))


def imports(name: str) -> list[tuple[ast.AST, str, bool]]:
  """(node, imported module, inside a function) of every import of a module; `from P import x` names the
  module P.x where that is one of vggjax's modules."""
  path, tree, _ = modules()[name]
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = []

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((child, a.name, in_function) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ''
        if child.level:
          base = '.'.join(package.split('.')[:len(package.split('.')) - child.level + 1] + ([base] if base else []))
        for a in child.names:
          sub = f'{base}.{a.name}'
          found.append((child, sub if sub in modules() else base, in_function))
      visit(child, inner)

  visit(tree, False)
  return found


def internal_edges() -> dict[str, set[str]]:
  edges = {}
  for name in modules():
    edges[name] = {m for _, m, _ in imports(name) if m in modules() and m != name}
  return edges


def test_modules_at_most_500_lines():
  long = {rel(n): len(src.splitlines()) for n, (_, _, src) in modules().items()
          if len(src.splitlines()) > MAX_MODULE_LINES}
  assert not long, f'modules over {MAX_MODULE_LINES} lines: {long}'


def test_functions_and_classes_at_most_100_lines():
  long = {}
  for name, (_, tree, _) in modules().items():
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        lines = node.end_lineno - start + 1
        if lines > MAX_DEFINITION_LINES:
          long[f'{rel(name)}:{node.lineno} {node.name}'] = lines
  assert not long, f'functions and classes over {MAX_DEFINITION_LINES} lines: {long}'


def test_command_modules_are_shells():
  commands = command_modules()
  assert commands and commands <= set(modules()), commands - set(modules())
  long = {rel(n): len(modules()[n][2].splitlines()) for n in commands
          if len(modules()[n][2].splitlines()) > MAX_COMMAND_LINES}
  assert not long, f'command modules over {MAX_COMMAND_LINES} lines (move the feature into a library): {long}'


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm: the components of more than one module (each an import circle)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      connect(v)
  return out


def test_strongly_connected_finds_circles():
  assert strongly_connected({'a': {'b'}, 'b': {'a'}, 'c': {'a'}}) == [['a', 'b']]
  assert strongly_connected({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_no_import_circles():
  circles = strongly_connected(internal_edges())
  assert not circles, f'import circles (imports inside functions included): {circles}'


def test_no_library_module_imports_a_command():
  commands = command_modules()
  found = sorted(f'{rel(name)}:{node.lineno} imports {m}' for name in modules()
                 if name not in commands and name != 'vggjax.cli'
                 for node, m, _ in imports(name) if m in commands)
  assert not found, f'library modules importing a command module: {found}'


def test_no_config_loaded_by_path():
  found = sorted(rel(n) for n, (_, tree, _) in modules().items()
                 if any(isinstance(node, (ast.Attribute, ast.Name)) and
                        getattr(node, 'attr', getattr(node, 'id', None)) == 'spec_from_file_location'
                        for node in ast.walk(tree)))
  assert not found, f'modules loading a file by path (spec_from_file_location): {found}'


def test_process_flags_defined_in_cli_only():
  found = []
  for name, (_, tree, _) in modules().items():
    if name == 'vggjax.cli':
      continue
    for node in ast.walk(tree):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and
          node.func.attr.startswith('DEFINE') and node.args and isinstance(node.args[0], ast.Constant) and
          node.args[0].value in PROCESS_FLAGS):
        found.append(f'{rel(name)}:{node.lineno} --{node.args[0].value}')
  assert not found, f'process or CPU-device flags defined outside cli.py (cli.define_process_flags): {found}'


def test_no_private_access_across_modules():
  found = sorted(f'{rel(n)}:{i + 1}' for n, (_, _, src) in modules().items()
                 for i, line in enumerate(src.splitlines()) if 'noqa: SLF001' in line)
  assert not found, f'private access across modules (noqa: SLF001): {found}'


def test_imports_inside_functions_only_for_optional_dependencies():
  found = []
  for name in modules():
    allowed = OPTIONAL | OPTIONAL_IN.get(name, frozenset())
    for node, m, in_function in imports(name):
      if in_function and m.split('.')[0] not in allowed:
        found.append(f'{rel(name)}:{node.lineno} {m}')
  assert not found, (f'{len(found)} imports inside functions of modules that are not optional dependencies '
                     f'(import them at the top): {found}')
