"""The shape of the package: one home per concept, no cycles, no re-export shims."""

from __future__ import annotations

import ast
from pathlib import Path

import batchfit

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "batchfit"

# Every public name batchfit had before the subpackages; each must still import from batchfit.
PUBLIC_BEFORE_SUBPACKAGES = """
AccumulationPlan BackoffEvent BatchfitError CheckpointError ConfigError DoesNotFitError
GradientNormWatch MemoryModel NoiseScaleCallback NoiseScaleResult NoiseScaleTracker Plan
RangeTestResult ScaledRate ScheduleConfig SearchResult Task TaskError ThroughputMeter
ThroughputResult TrainConfig TrainResult accumulate_gradients batchnorm_advice build_scheduler
convert_batchnorm count_memory default_rule default_warmup_steps estimate_gradient_statistics
find_knee find_max_batch_size fit_memory_model format_bytes is_out_of_memory load_example
load_plan load_task lr_multiplier lr_range_test max_batch_size measure_noise_scale
measure_step_memory measure_throughput micro_batch_weights needs_warmup parse_size
plan_accumulation plot_noise_scale plot_range_test plot_schedule plot_throughput
predict_step_memory recommended_schedule render_schedule resolve_device round_down
run_with_backoff scale_lr scaled_rate schedule_table split_batch train write_report
""".split()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the batchfit modules it imports, at module or function level."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "batchfit"):
                    edges[name].add(target)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_subpackage_inits_are_docstrings_only():
    for path in PACKAGE.rglob("__init__.py"):
        if path.parent == PACKAGE:
            continue  # batchfit/__init__.py is the public surface
        body = ast.parse(path.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), path
        assert isinstance(body[0].value, ast.Constant) and body[0].value.value.strip(), path


def test_no_module_forwards_names():
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        forwards = [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__")
        ]
        if name == "batchfit":
            continue  # the lazy public surface
        assert forwards == [], f"{name} forwards names with {forwards}"
        assert "still importable" not in path.read_text(), name


def test_public_surface_points_at_each_names_home():
    """batchfit._EXPORTS names the module that defines each name, not one that re-imports it."""
    for name, module_name in batchfit._EXPORTS.items():
        tree = ast.parse(_modules()[module_name].read_text())
        defined = {
            node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
        } | {
            target.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        assert name in defined, f"{name} is not defined in {module_name}"


def test_every_public_name_from_before_the_subpackages_still_imports():
    missing = [name for name in PUBLIC_BEFORE_SUBPACKAGES if getattr(batchfit, name, None) is None]
    assert missing == []
    assert set(PUBLIC_BEFORE_SUBPACKAGES) <= set(batchfit.__all__)


def test_public_names_are_not_shadowed_by_subpackages():
    """`from batchfit import TrainConfig, train` gives the train function: no subpackage shares
    a public name (importing a subpackage sets it as an attribute of batchfit)."""
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert set(batchfit.__all__) & (subpackages | modules) == set()
    from batchfit import TrainConfig, train  # noqa: F401  (TrainConfig imports its subpackage)

    assert callable(train) and train.__module__ == "batchfit.training.loop"
