"""What the measurements read: held-out text, token batches and the model's accuracy tasks.

Held-out text is JSONL with a ``text`` field per line (``domain`` optional, else the file
name): ``load_texts`` reads files or folders, ``default_data`` finds the text shipped with a
model (``MODEL/eval/heldout``), ``token_batch`` cuts ``[rows, length]`` token ids for the
routing recordings and benchmarks, and ``heldout_rows`` cuts the rows ``lynx eval`` scores.

Tasks are read from the lm-evaluation-harness YAML files shipped with a model (the reference
model's ``eval/*.yaml``), so ``lynx eval`` and ``lynx lm-eval`` score the same items:

- ``output_type: multiple_choice`` -> ``Task(kind="choice")``: ``doc_to_text`` is the context,
  ``doc_to_choice`` the candidate continuations, ``doc_to_target`` the right one's index;
  chance = mean of 1 / number of choices. The headline metric is ``acc_norm`` (log-likelihood
  per byte of the choice, as lm-eval computes it) when the task's ``metric_list`` has it, else
  ``acc`` (summed log-likelihood).
- ``output_type: generate_until`` -> ``Task(kind="generate")``: ``doc_to_target`` is the
  answer, scored by exact match of the first generated word; "chance" is the share of items
  whose answer is the most common answer (what always giving that answer would score). A
  generation task scored by another metric (chrF, BLEU, ...) is left to lm-eval.

Templates are ``{{field}}`` or a bare field name (anything else goes through jinja2, which
lm-eval brings). ``loglikelihood_rolling`` tasks are the held-out text, read directly.
Bad input raises ValueError or FileNotFoundError naming the file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["encode", "load_texts", "default_data", "token_batch", "heldout_rows", "Task", "load_tasks",
           "select_tasks", "default_eval_dir", "load_inputs"]

_FIELD = re.compile(r"^\s*\{\{\s*(\w+)\s*\}\}\s*$")
_BARE = re.compile(r"^\s*(\w+)\s*$")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens. Long texts are cut into rows afterwards,
    so the tokenizer's "longer than the maximum length" warning is switched off."""
    return tokenizer.encode(text, add_special_tokens=False, verbose=False)


def load_texts(paths: list[Path]) -> dict[str, list[str]]:
    """Texts by domain from JSONL files or folders of them (``domain`` field, else the file name)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder of held-out text (JSONL)")
    texts: dict[str, list[str]] = {}
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else None
            if isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
                texts.setdefault(str(rec.get("domain") or f.stem), []).append(rec["text"])
    if not texts:
        raise ValueError(f"no JSONL records with a 'text' field in {', '.join(map(str, paths))}")
    return texts


def _eval_dirs(model_path: Path) -> list[Path]:
    """``MODEL/eval``, then the reference model's (for a model that ships none)."""
    from .. import reference_model_path
    dirs = [Path(model_path) / "eval"]
    try:
        dirs.append(reference_model_path() / "eval")
    except FileNotFoundError:
        pass
    return dirs


def default_data(model_path: Path) -> Path:
    """The held-out text shipped with a model (``eval/heldout``, else ``eval``), or, for a
    model without any, the reference model's per-domain test segments."""
    candidates = _eval_dirs(model_path)
    for eval_dir in candidates:
        if (eval_dir / "heldout").is_dir():
            return eval_dir / "heldout"
        if eval_dir.is_dir():
            return eval_dir
    raise FileNotFoundError(f"no held-out text found for {model_path} (looked for {candidates[0]}): "
                            "pass a JSONL file with a 'text' field per line")


def default_eval_dir(model_path: Path) -> Path | None:
    """The folder of lm-eval task YAMLs shipped with a model, else the reference model's."""
    return next((c for c in _eval_dirs(model_path) if c.is_dir() and any(c.glob("*.yaml"))), None)


def token_batch(texts: dict[str, list[str]], tokenizer, rows: int, length: int, vocab: int) -> torch.Tensor:
    """``[rows, length]`` token ids: row i reads domain ``i % D``'s text stream (documents
    joined) at its own offset, so a batch mixes domains like a server's would. Without a
    tokenizer, UTF-8 bytes modulo the vocabulary stand in for tokens."""
    domains = sorted(texts)
    streams = {}
    for d in domains:
        joined = "\n\n".join(texts[d])
        ids = encode(tokenizer, joined) if tokenizer is not None else list(joined.encode("utf-8"))
        streams[d] = torch.tensor(ids, dtype=torch.long) % vocab
    out = []
    for i in range(rows):
        s = streams[domains[i % len(domains)]]
        if len(s) < length:
            raise ValueError(f"domain {domains[i % len(domains)]!r} has only {len(s)} tokens; need {length} per row")
        start = (i // len(domains)) * length % max(1, len(s) - length + 1)
        out.append(s[start:start + length])
    return torch.stack(out)


def heldout_rows(texts: dict[str, list[str]], tokenizer, per_domain: int, length: int,
                 min_length: int) -> tuple[list[list[int]], list[str]]:
    """Token rows of ``length`` tokens, ``per_domain`` per domain, cut one after another from the
    domain's segments joined by blank lines (so short segments still give full rows and every
    decode step has all of a batch's rows); a domain that runs out ends with one shorter row of
    at least ``min_length`` tokens. Rows are interleaved across domains so that every batch mixes
    domains like a server's would. Returns ``(rows, domain of each row)``."""
    by_domain = {}
    for d in sorted(texts):
        stream: list[int] = []
        for text in texts[d]:
            stream += encode(tokenizer, text.strip() + "\n\n")
            if len(stream) >= per_domain * length:
                break
        rows = [stream[i:i + length] for i in range(0, min(len(stream), per_domain * length), length)]
        by_domain[d] = [r for r in rows if len(r) >= min_length]
    out, domains = [], []
    for i in range(per_domain):
        for d, rows in by_domain.items():
            if i < len(rows):
                out.append(rows[i])
                domains.append(d)
    return out, domains


# ---------------------------------------------------------------------------------------
# Tasks

@dataclass
class Task:
    """One accuracy task: ``items`` are dicts with ``context`` and either ``choices`` + ``label``
    (kind "choice") or ``answer`` (kind "generate")."""

    name: str
    kind: str                          # "choice" or "generate"
    items: list[dict[str, Any]]
    max_new_tokens: int = 8
    source: str = ""
    until: tuple[str, ...] = ()        # generation stops at the first of these (lm-eval's ``until``)
    metric: str = "acc"                # "acc", or "acc_norm" (log-likelihood per byte of the choice)
    chance: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.items:
            self.chance = 0.0
        elif self.kind == "choice":
            self.chance = sum(1 / len(it["choices"]) for it in self.items) / len(self.items)
        else:
            answers = Counter(str(it["answer"]).strip().lower() for it in self.items)
            self.chance = answers.most_common(1)[0][1] / len(self.items)


def _render(template: Any, doc: dict[str, Any]) -> Any:
    if not isinstance(template, str):
        return template
    m = _FIELD.match(template) or _BARE.match(template)
    if m and m.group(1) in doc:
        return doc[m.group(1)]
    import jinja2
    return jinja2.Template(template).render(**doc)


def _data_file(spec: dict[str, Any], yaml_path: Path) -> Path | None:
    """The task's JSONL: ``dataset_kwargs: {file: ...}`` beside the YAML (the shipped tasks'
    ``custom_dataset`` loader), or lm-eval's ``data_files``, which lm-eval resolves against the
    working directory; from anywhere else, look beside the YAML."""
    kwargs = spec.get("dataset_kwargs") or {}
    if isinstance(kwargs.get("file"), str):
        path = yaml_path.parent / kwargs["file"]
        return path if path.is_file() else None
    files = kwargs.get("data_files") or {}
    split = spec.get("test_split") or "test"
    rel = files.get(split) if isinstance(files, dict) else files
    if isinstance(rel, list):
        rel = rel[0] if rel else None
    if not isinstance(rel, str):
        return None
    rel_path = Path(rel)
    for cand in (rel_path, yaml_path.parent / rel_path.name, *(yaml_path.parent / Path(*rel_path.parts[-n:])
                                                               for n in (2, 3) if len(rel_path.parts) >= n)):
        if cand.is_file():
            return cand
    return None


def _yaml_load(path: Path) -> dict[str, Any] | None:
    import yaml

    class Loader(yaml.SafeLoader):
        pass
    # lm-eval's ``!function module.fn`` tags: keep them as strings (such tasks are skipped).
    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    spec = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)
    return spec if isinstance(spec, dict) else None


def _task_from_yaml(path: Path) -> Task | None:
    spec = _yaml_load(path)
    if not spec or spec.get("output_type") not in ("multiple_choice", "generate_until") or "task" not in spec:
        return None
    data = _data_file(spec, path)
    if data is None:
        return None
    docs = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = []
    delim = spec.get("target_delimiter", " ")
    for doc in docs:
        context = str(_render(spec.get("doc_to_text", ""), doc))
        target = _render(spec.get("doc_to_target", ""), doc)
        if spec["output_type"] == "multiple_choice":
            choices = _render(spec.get("doc_to_choice"), doc)
            if not isinstance(choices, list) or len(choices) < 2:
                continue
            label = int(target) if not isinstance(target, str) or target.strip().isdigit() else choices.index(target)
            items.append({"context": context, "choices": [delim + str(c) for c in choices], "label": label})
        else:
            items.append({"context": context, "answer": str(target)})
    kind = "choice" if spec["output_type"] == "multiple_choice" else "generate"
    gen = spec.get("generation_kwargs") or {}
    until = gen.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(str(u) for u in until)
    # The headline metric: acc_norm where the task lists it (choices of unequal length, where
    # summed log-likelihood favours short ones), else acc / exact match.
    metrics = [m.get("metric") for m in spec.get("metric_list") or [] if isinstance(m, dict)]
    if kind == "generate" and "exact_match" not in metrics:
        return None   # chrF, BLEU, ...: lm-eval scores those; lynx eval scores exact matches
    metric = "acc_norm" if kind == "choice" and "acc_norm" in metrics else "acc"
    return Task(str(spec["task"]), kind, items, int(gen.get("max_gen_toks", 8)), str(data), until, metric)


def load_tasks(eval_dir: Path) -> dict[str, Task]:
    """Multiple-choice and generation tasks defined by the YAML files in ``eval_dir``."""
    tasks = {}
    for path in sorted(Path(eval_dir).glob("*.yaml")):
        task = _task_from_yaml(path)
        if task is not None and task.items:
            tasks[task.name] = task
    return tasks


def select_tasks(tasks: dict[str, Task], names: list[str]) -> list[Task]:
    """Tasks by name (``all``; full names or their last part, e.g. ``wn_gloss`` for
    ``lynx_ref_wn_gloss``); ValueError naming the known tasks for an unknown one."""
    if names == ["all"]:
        return list(tasks.values())
    out = []
    for name in names:
        hits = [t for n, t in tasks.items() if n == name or n.endswith("_" + name)]
        if len(hits) != 1:
            known = ", ".join(sorted(tasks)) or "none found"
            raise ValueError(f"unknown task {name!r}; known tasks: {known}" if not hits else
                             f"task {name!r} is ambiguous: {', '.join(t.name for t in hits)}")
        out.append(hits[0])
    return out


# ---------------------------------------------------------------------------------------
# Everything an evaluation reads

def load_inputs(model_path: Path | None, data: list[Path] | None, eval_dir: Path | None, task_names: list[str]):
    """``(model, tokenizer, path, texts, tasks)`` of an evaluation: the model folder (default:
    the reference model), its held-out text (or ``data``) and the named tasks of its lm-eval
    YAMLs (or ``eval_dir``'s; ``["all"]``, ``["none"]``). ValueError for a bad name."""
    from .. import reference_model_path
    from .models import load_model
    path = Path(model_path) if model_path else reference_model_path()
    model, tokenizer = load_model(path)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer there (an evaluation needs one to read text and tasks)")
    tasks = []
    if task_names != ["none"]:
        eval_dir = eval_dir or default_eval_dir(path)
        try:
            tasks = select_tasks(load_tasks(eval_dir) if eval_dir else {}, task_names or ["all"])
        except ValueError as e:
            raise ValueError(f"tasks: {e} (in {eval_dir})") from None
    return model, tokenizer, path, load_texts(data or [default_data(path)]), tasks
