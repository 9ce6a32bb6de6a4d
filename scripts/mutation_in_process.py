"""Mutation testing of the model-dependent scoring code, in one warm pytest session.

mutmut forks a fresh pytest for each mutant, and a fresh pytest rebuilds the
tiny model, so the tests of ``score_rollout``, ``policy_forward``,
``reward.encode`` and the like time out there (a timeout counts as "caught",
which would flatter the score). This runner keeps one pytest session, and with
it the session's tiny model, across all mutants:

1. a baseline run of the selected tests records which of them call each target
   function (a profile hook) and how long each takes;
2. each mutant is one small change to one target function's syntax tree
   (an operator, a comparison, a number, a dropped statement or ``with``, a
   swapped pair, a flipped slice), compiled and swapped in as the function's
   ``__code__``, so every caller, wherever it imported the function from, runs it;
3. the tests that call the function run, fastest first, until one fails
   (killed), runs past its time limit (timeout, counted apart) or all pass
   (survived); then the code, and the shared model's tensors, are restored;
4. every 75 mutants and at the end the baseline runs again: a failure there
   means a mutant leaked into shared state, and the run stops rather than
   report wrong figures.

Lines marked ``# pragma: no mutate`` are skipped, as mutmut does.

    python scripts/mutation_in_process.py [--only score_rollout,lm_loss] [--list] [--report mutants.json]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
from _pytest.runner import runtestprotocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The model-dependent code that decides what is scored, masked and learned.
TARGETS = {
    "rlhf_chat.learning.ppo": [
        "full_prefix", "policy_forward", "stored_layout", "rollout_layout", "reward_model_scores",
        "ScoreNormalizer.normalize", "score_rollout", "minibatch_update",
    ],
    "rlhf_chat.learning.reward": ["encode", "score_prefix", "score_sequences", "score_texts", "pair_scores", "train_step", "evaluate"],
    "rlhf_chat.model.heads": ["answer_summary", "frozen_prefix", "top_hidden"],
    "rlhf_chat.learning.supervised": ["example_sequences", "lm_loss"],
}
TESTS = ["tests/test_ppo.py", "tests/test_reward.py", "tests/test_learning.py"]
RECHECK_EVERY = 75
SKIP = "pragma: no mutate"

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
              ast.Pow: ast.Mult, ast.Mod: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
              ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SWAP_CMP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
            ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    target: str  # module:qualname
    line: int
    what: str
    index: int  # position of the mutated node in a walk of the function's body
    variant: int = 0
    status: str = ""  # killed | timeout | survived | no tests
    killed_by: str = ""
    seconds: float = 0.0


# --- making mutants -----------------------------------------------------------------------------------


def body_nodes(func: ast.FunctionDef) -> list[ast.AST]:
    """Every node of the function's body in a fixed order, docstring and annotations left out."""
    nodes: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        nodes.append(node)
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child)

    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    for stmt in body:
        visit(stmt)
    return nodes


def variants(node: ast.AST) -> list[str]:
    """Descriptions of the mutations that apply to one node (the order is the variant number)."""
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in SWAP_BINOP:
        out = [f"{type(node.op).__name__} -> {SWAP_BINOP[type(node.op)].__name__}"]
        return out + (["x op= y -> x = y"] if isinstance(node, ast.AugAssign) else [])
    if isinstance(node, ast.Compare):
        return [f"{type(op).__name__} -> {SWAP_CMP[type(op)].__name__}" for op in node.ops if type(op) in SWAP_CMP]
    if isinstance(node, ast.BoolOp):
        return ["and <-> or"]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
        return [f"drop {type(node.op).__name__}"]
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return [f"{node.value} -> {not node.value}"]
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return [f"{node.value!r} -> {node.value + 1!r}"]
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return ["drop the call"]
    if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
        already_none = isinstance(node.value, ast.Constant) and node.value.value is None
        return [] if already_none else ["value -> None"]
    if isinstance(node, ast.With):
        return ["drop the with (run its body bare)"]
    if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and len(node.value.elts) >= 2:
        return ["swap the first two returned values"]
    if isinstance(node, ast.Slice) and (node.lower is None) != (node.upper is None):
        return ["flip the slice ([:n] <-> [n:])"]
    if isinstance(node, ast.If):
        return ["negate the condition"]
    return []


def apply(node: ast.AST, variant: int, func: ast.FunctionDef) -> None:
    """Mutate ``node``, a node of a fresh copy of ``func``, in place."""
    if isinstance(node, ast.BinOp | ast.AugAssign) and variant == 0:
        node.op = SWAP_BINOP[type(node.op)]()
    elif isinstance(node, ast.AugAssign):  # x += y -> x = y
        replace(func, node, [ast.Assign(targets=[node.target], value=node.value)])
    elif isinstance(node, ast.Compare):
        i = [i for i, op in enumerate(node.ops) if type(op) in SWAP_CMP][variant]
        node.ops[i] = SWAP_CMP[type(node.ops[i])]()
    elif isinstance(node, ast.BoolOp):
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif isinstance(node, ast.UnaryOp):
        replace(func, node, node.operand)
    elif isinstance(node, ast.Constant):
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    elif isinstance(node, ast.Expr):
        replace(func, node, [ast.Pass()])
    elif isinstance(node, ast.Assign | ast.AnnAssign):
        node.value = ast.Constant(None)
    elif isinstance(node, ast.With):
        replace(func, node, node.body)
    elif isinstance(node, ast.Return):
        elts = node.value.elts
        elts[0], elts[1] = elts[1], elts[0]
    elif isinstance(node, ast.Slice):
        node.lower, node.upper = node.upper, node.lower
    elif isinstance(node, ast.If):
        node.test = ast.UnaryOp(ast.Not(), node.test)


def replace(func: ast.AST, old: ast.AST, new) -> None:
    """Put ``new`` (a node, or a list of statements for a statement) where ``old`` is."""
    for parent in ast.walk(func):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                i = next(i for i, v in enumerate(value) if v is old)
                value[i : i + 1] = new if isinstance(new, list) else [new]
                return
    raise LookupError("node not found")


def find_def(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    node: ast.AST = tree
    for part in qualname.split("."):
        node = next(n for n in node.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == part)
    return node


def function_object(module, qualname: str):
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)  # past @torch.no_grad(): the code that runs


def mutants_of(module_name: str, qualname: str) -> list[Mutant]:
    module = importlib.import_module(module_name)
    source = Path(module.__file__).read_text()
    lines = source.splitlines()
    func = find_def(ast.parse(source), qualname)
    out = []
    for index, node in enumerate(body_nodes(func)):
        line = getattr(node, "lineno", func.lineno)
        if SKIP in lines[line - 1]:
            continue
        for variant, what in enumerate(variants(node)):
            out.append(Mutant(f"{module_name}:{qualname}", line, what, index, variant))
    return out


def mutated_code(mutant: Mutant):
    """The code object of the target function with this one mutation."""
    module_name, qualname = mutant.target.split(":")
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__).read_text())
    func = find_def(tree, qualname)
    func.decorator_list = []  # the decorators wrap the function object we patch; its code runs inside them
    node = body_nodes(func)[mutant.index]
    apply(node, mutant.variant, func)
    holder = ast.Module(body=[func], type_ignores=[])
    if "." in qualname:  # a method: compile it inside a class of the same name, as the original was
        holder = ast.Module(body=[ast.ClassDef(qualname.split(".")[0], [], [], [func], [])], type_ignores=[])
    code = compile(ast.fix_missing_locations(holder), module.__file__, "exec")
    return find_code(code, qualname.split(".")[-1])


def find_code(code, name: str):
    for const in code.co_consts:
        if inspect.iscode(const):
            if const.co_name == name:
                return const
            found = find_code(const, name)
            if found is not None:
                return found
    return None


# --- running tests in one session ---------------------------------------------------------------------


class TestTimeout(Exception):
    """A test ran past its limit under a mutant (an endless loop, a huge tensor)."""


def on_alarm(signum, frame):
    raise TestTimeout("past the time limit")


@dataclass
class Runner:
    """A pytest plugin that runs the mutants inside pytest's own test loop."""

    mutants: list[Mutant]
    report: Path
    durations: dict = field(default_factory=dict)
    callers: dict = field(default_factory=dict)  # target -> item nodeids that call it
    problems: list = field(default_factory=list)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        items = {item.nodeid: item for item in session.items}
        if not self.baseline(session, coverage=True):
            return True
        self.shared = shared_models(session.items)
        signal.signal(signal.SIGALRM, on_alarm)
        for n, mutant in enumerate(self.mutants, 1):
            self.run_mutant(session, items, mutant)
            print(f"[{n}/{len(self.mutants)}] {mutant.status:9} {mutant.target} line {mutant.line}: {mutant.what}"
                  + (f"  ({mutant.killed_by})" if mutant.killed_by else ""), flush=True)
            if n % RECHECK_EVERY == 0 and not self.baseline(session):
                break
        else:
            self.baseline(session)
        self.write()
        return True

    def run_item(self, session, item, limit: float | None = None) -> tuple[bool, bool]:
        """(passed, timed out) for one run of ``item``, leaving the session's fixtures up."""
        session._setupstate.teardown_exact(item)  # whatever the last item left that this one does not use
        if limit:
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            reports = runtestprotocol(item, log=False, nextitem=item.parent)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        failed = [r for r in reports if r.failed]
        timed_out = any("TestTimeout" in str(r.longrepr) for r in failed)
        return not failed, timed_out

    def baseline(self, session, coverage: bool = False) -> bool:
        """Every selected test passes on the unmutated code; with ``coverage``, who calls what."""
        codes = {function_object(importlib.import_module(m), q).__code__: f"{m}:{q}"
                 for m, names in TARGETS.items() for q in names}
        for item in session.items:
            called: set[str] = set()

            def profile(frame, event, arg):
                if event == "call" and frame.f_code in codes:
                    called.add(codes[frame.f_code])

            start = time.perf_counter()
            if coverage:  # the worker's threads too: the live-loop tests score there
                sys.setprofile(profile)
                threading.setprofile(profile)
            try:
                passed, _ = self.run_item(session, item)
            finally:
                sys.setprofile(None)
                threading.setprofile(None)
            if coverage:
                self.durations[item.nodeid] = time.perf_counter() - start
                for target in called:
                    self.callers.setdefault(target, []).append(item.nodeid)
            if not passed:
                self.problems.append(f"the unmutated code fails {item.nodeid}: results so far are not trusted")
                print(self.problems[-1], flush=True)
                self.write()
                return False
        return True

    def run_mutant(self, session, items, mutant: Mutant) -> None:
        module_name, qualname = mutant.target.split(":")
        func = function_object(importlib.import_module(module_name), qualname)
        tests = sorted(self.callers.get(mutant.target, []), key=self.durations.get)
        if not tests:
            mutant.status = "no tests"
            return
        original, start = func.__code__, time.perf_counter()
        try:
            func.__code__ = mutated_code(mutant)
        except (SyntaxError, ValueError, TypeError) as exc:  # not a valid program: nothing to test
            mutant.status, mutant.killed_by = "invalid", str(exc)
            return
        mutant.status = "survived"
        try:
            for nodeid in tests:
                passed, timed_out = self.run_item(session, items[nodeid], limit=5 * self.durations[nodeid] + 10)
                if not passed:
                    mutant.status, mutant.killed_by = ("timeout" if timed_out else "killed"), nodeid.split("::")[-1]
                    break
        finally:
            func.__code__ = original
            restore_models(self.shared)
            mutant.seconds = round(time.perf_counter() - start, 1)

    def write(self) -> None:
        self.report.write_text(json.dumps({"problems": self.problems, "mutants": [asdict(m) for m in self.mutants],
                                           "durations": self.durations, "callers": self.callers},
                                          indent=1))
        print(summary(self.mutants, self.problems))


def shared_models(items) -> list:
    """The session-scoped models the tests share, with a copy of every tensor in them."""
    shared = []
    for item in items:
        for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values():
            fixture = defs[-1]
            if fixture.scope == "session" and fixture.cached_result is not None:
                value = fixture.cached_result[0]
                if hasattr(value, "trainer") and all(id(value) != id(s[0]) for s in shared):
                    shared.append((value, snapshot(value)))
    return shared


def snapshot(models) -> dict:
    saved = {"attrs": {k: v for k, v in vars(models).items() if not isinstance(v, torch.nn.Module)}}
    for name in ("serving", "trainer", "value_head", "reward_head"):
        module = getattr(models, name)
        saved[name] = {k: t.detach().clone() for k, t in [*module.named_parameters(), *module.named_buffers()]}
    saved["adapter"] = models.trainer.active_adapter
    return saved


@torch.no_grad()
def restore_models(shared) -> None:
    for models, saved in shared:
        for name in ("serving", "trainer", "value_head", "reward_head"):
            tensors = dict([*getattr(models, name).named_parameters(), *getattr(models, name).named_buffers()])
            for key, value in saved[name].items():
                tensors[key].data.copy_(value)
        vars(models).update(saved["attrs"])
        models.trainer.set_adapter(saved["adapter"])
        if models.prefix_cache is not None:
            models.prefix_cache = type(models.prefix_cache)(models.prefix_cache.max_tokens)


def summary(mutants: list[Mutant], problems: list[str]) -> str:
    rows = [f"{'function':48} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}"]
    by_target: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_target.setdefault(m.target, []).append(m)
    everything = [m for m in mutants if m.status not in ("", "invalid")]
    for target, ms in [*by_target.items(), ("all", everything)]:
        done = [m for m in ms if m.status not in ("", "invalid")]
        count = {s: sum(m.status == s for m in done) for s in ("killed", "timeout", "survived", "no tests")}
        score = count["killed"] / max(1, len(done))
        rows.append(f"{target:48} {len(done):7d} {count['killed']:6d} {count['timeout']:7d} {count['survived']:8d} "
                    f"{count['no tests']:8d} {score:6.2f}")
    rows += [f"survived: {m.target} line {m.line}: {m.what}" for m in mutants if m.status == "survived"]
    return "\n".join(rows + problems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="targets whose name contains one of these, comma-separated "
                        "(e.g. score_rollout,lm_loss)")
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--report", default="mutants-in-process.json")
    args = parser.parse_args()
    mutants = [m for module, names in TARGETS.items() for q in names for m in mutants_of(module, q)
               if any(part in f"{module}:{q}" for part in args.only.split(","))]
    if args.list:
        for m in mutants:
            print(f"{m.target} line {m.line}: {m.what}")
        print(f"{len(mutants)} mutants")
        return
    runner = Runner(mutants, Path(args.report))
    sys.exit(pytest.main([*TESTS, "-q", "-m", "not slow", "-p", "no:cacheprovider", "-p", "no:randomly"],
                         plugins=[runner]))


if __name__ == "__main__":
    main()
