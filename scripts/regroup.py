"""Group rlhf_chat's flat modules by stage, in one step: git mv + rewrite every reference.

    python scripts/regroup.py .   # then run make test, update the README module table, and delete this script

Dry-run on a copy on 2026-12-02: every module imported and all tests collected. Not yet applied.
"""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(sys.argv[1])
GROUPS = {
    "model": ("loading", "quantized"),
    "serving": ("chat", "candidates", "nucleus", "repetition", "modes", "batcher", "admission", "worker", "runtime",
                "ui", "dashboard",
                "controls", "arena"),
    "storage": ("tables", "store", "export"),
    "learning": ("preferences", "heads", "reward", "supervised", "ppo_math", "ppo", "training_loop", "checkpoints"),
    "evaluation": ("simulate", "labelers", "behaviours"),
}
DOCS = {
    "model": "Model: loading the base once (the weight paths, the adapters, the two copies) and the int4/int8 layers.",
    "serving": "Serving: what a person meets: chat, candidates (sampling, modes, loop stop), the model worker, the UI, "
               "the Training tab, the arena and the admin controls.",
    "storage": "Storage: the database schema, data access and the export of the votes.",
    "learning": "Learning: votes to preference pairs, the reward model, PPO (its math apart), the one supervised "
                "term, checkpoints and the background loop.",
    "evaluation": "Evaluation: judging answers and the loop: the behaviour detectors (which the Training tab "
                  "also reads), the scripted labelers and the headless simulation; tools, apart from the detectors.",
}
WHERE = {m: g for g, ms in GROUPS.items() for m in ms}
pkg = ROOT / "rlhf_chat"
for group, modules in GROUPS.items():
    (pkg / group).mkdir(exist_ok=True)
    (pkg / group / "__init__.py").write_text(f'"""{DOCS[group]}"""\n')
    for m in modules:
        subprocess.run(["git", "mv", f"rlhf_chat/{m}.py", f"rlhf_chat/{group}/{m}.py"], cwd=ROOT, check=True)
    subprocess.run(["git", "add", f"rlhf_chat/{group}/__init__.py"], cwd=ROOT, check=True)

names = "|".join(sorted(WHERE, key=len, reverse=True))
dotted = re.compile(rf"\brlhf_chat\.({names})\b")
slashed = re.compile(rf"\brlhf_chat/({names})\.py\b")
from_pkg = re.compile(r"^([ \t]*)from rlhf_chat import ([^#\n]+?)([ \t]*#.*)?$", re.M)


def split_import(match: re.Match) -> str:
    indent, items, comment = match.group(1), match.group(2), match.group(3) or ""
    parts = [p.strip() for p in items.strip("() ").split(",") if p.strip()]
    by_group: dict[str, list[str]] = {}
    for part in parts:
        name = part.split()[0]
        by_group.setdefault(WHERE.get(name, ""), []).append(part)
    lines = []
    for group, group_parts in by_group.items():
        target = f"rlhf_chat.{group}" if group else "rlhf_chat"
        lines.append(f"{indent}from {target} import {', '.join(group_parts)}")
    lines[0] += comment
    return "\n".join(lines)


def sort_runs(text: str) -> str:
    """Sort each run of consecutive one-line ``from rlhf_chat... import`` lines by module."""
    lines, out, run = text.split("\n"), [], []
    def flush():
        out.extend(sorted(run, key=lambda l: l.split(" import ")[0]) if all(not l.rstrip().endswith("(") for l in run) else run)
        run.clear()
    for line in lines:
        if line.startswith("from rlhf_chat") and " import " in line:
            run.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


files = [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
         and "mutants" not in p.parts and (p.suffix in (".py", ".md", ".toml", ".sh", ".cfg", ".ini", ".txt", ".yml", ".yaml")
                                          or p.name in ("Makefile", "run"))]
for path in files:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    new = dotted.sub(lambda m: f"rlhf_chat.{WHERE[m.group(1)]}.{m.group(1)}", text)
    new = slashed.sub(lambda m: f"rlhf_chat/{WHERE[m.group(1)]}/{m.group(1)}.py", new)
    new = from_pkg.sub(split_import, new)
    if path.suffix == ".py":
        new = sort_runs(new)
    if new != text:
        path.write_text(new, encoding="utf-8", errors="surrogateescape")
        print("rewrote", path.relative_to(ROOT))
