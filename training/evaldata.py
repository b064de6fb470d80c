"""Build the evaluation data for lynx-ref-moe from the TEST split only.

Usage: python -m training.evaldata [--corpus runs/corpus] [--out models/lynx-ref-moe/eval]

Writes (all small JSONL + lm-evaluation-harness 0.4.13 YAML task files):
* heldout/<domain>.jsonl  - 200 segments of <= 256 tokens per domain (perplexity text);
                            tasks lynx_ref_ppl_<domain> (loglikelihood_rolling), group lynx_ref_ppl
* wn_gloss.jsonl          - multiple choice: "word (pos):" -> its WordNet gloss among 4 (chance 0.25)
* wn_pos.jsonl            - multiple choice: "word (" -> "noun)"/"verb)"/"adjective)"/"adverb)", classes
                            balanced (chance 0.25)
* last_word.jsonl         - multiple choice: held-out context -> the true last word of the sentence
                            among 4 candidates of similar corpus frequency (chance 0.25)
* next_sentence.jsonl     - multiple choice: held-out context -> the true next sentence among 4 (the
                            others from other test documents of the same domain; chance 0.25)
* next_word.jsonl         - generation: held-out context -> next word (exact match), at positions where that
                            word is the clear majority continuation of the two preceding words in the TRAIN
                            split, excluding the 150 most frequent words (a "predictable next word"; chance ~0)
* continuation.jsonl      - like next_sentence, but the 3 distractors come from other domains (chance 0.25)
* next_words.jsonl        - held-out context -> the next TWO words, each the clear majority continuation of its two
                            preceding words in TRAIN (frequent words allowed); two tasks: lynx_ref_next_words
                            (loglikelihood: whole answer greedy + answer perplexity; with lynx lm-eval's
                            decode_scoring every answer token comes from a decode step) and lynx_ref_next_words_gen
                            (generate_until, whole-answer exact match; the first token comes from the prefill)
Run lm-eval from the repo root with ``--include_path models/lynx-ref-moe/eval``. The other reference models
ship byte-identical copies: ``cp -r models/lynx-ref-moe/eval models/lynx-ref-qwen3moe/`` (and lynx-ref-dsv3).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
EVAL_REL = "models/lynx-ref-moe/eval"
# lm-eval resolves ``data_files`` against the working directory; a ``custom_dataset`` loader
# beside the YAMLs (``!function`` tags resolve against the YAML's folder) reads each task's
# JSONL from there instead, so the eval folder works from anywhere it is copied.
LOADER_NAME = "lynx_data.py"
LOADER = '''"""lm-eval ``custom_dataset`` for the tasks in this folder: reads the JSONL file a task's
YAML names (``dataset_kwargs: {file: ...}``) from beside this file, whatever the working
directory. Written by training/evaldata.py."""

from pathlib import Path


def load(file, **_):
    import datasets
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).resolve().parent / file)})
'''
SEG_TOKENS = 256
SEGS_PER_DOMAIN = 200
TEXT_DOMAINS = ["bible", "fortunes", "jargon", "foldoc", "python_docs", "perl_docs", "manpages", "dictionary"]
WORD = re.compile(r"[A-Za-z]+")



def _doc_cap(per_domain: int, n_docs: int) -> int:
    """The most items a task takes from one document: a few, more when a domain has few documents."""
    return max(3, math.ceil(3 * per_domain / max(1, n_docs)))


def _spread_over_documents(cands: list[tuple], per_domain: int, rng) -> list[tuple]:
    """Shuffle candidates ``(domain, context, answer, doc_id)`` and take up to ``per_domain``,
    at most a few per document, so no single long document dominates a task."""
    rng.shuffle(cands)
    per_doc = collections.Counter()
    cap = _doc_cap(per_domain, len({c[3] for c in cands}))
    picked = []
    for c in cands:
        if per_doc[c[3]] < cap:
            per_doc[c[3]] += 1
            picked.append(c)
        if len(picked) >= per_domain:
            break
    return picked

def docs(corpus: Path, domain: str, split: str):
    with open(corpus / domain / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def yaml_header(task: str, data: str, output_type: str) -> str:
    return (f"task: {task}\n"
            f"custom_dataset: !function {LOADER_NAME.removesuffix('.py')}.load\n"
            f"dataset_kwargs:\n  file: {data}\n"
            f"test_split: test\n"
            f"output_type: {output_type}\n")


# ------------------------------------------------------------------ perplexity segments

def build_heldout(corpus: Path, out: Path, tok, rng: random.Random):
    domains = sorted(p.name for p in corpus.iterdir() if (p / "test.jsonl").exists())
    for d in domains:
        ds = list(docs(corpus, d, "test"))
        rng.shuffle(ds)
        # at most ceil(2*200/n_docs) consecutive segments per document, so small domains still give 200
        per_doc = max(1, math.ceil(2 * SEGS_PER_DOMAIN / len(ds)))
        segs = []
        for doc in ds:
            ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
            for k in range(per_doc):
                chunk = ids[k * SEG_TOKENS:(k + 1) * SEG_TOKENS]
                if len(chunk) < 16:
                    break
                text = tok.decode(chunk)
                segs.append({"domain": d, "id": f"{doc['id']}#{k}", "text": text})
            if len(segs) >= SEGS_PER_DOMAIN:
                break
        write_jsonl(out / "heldout" / f"{d}.jsonl", segs[:SEGS_PER_DOMAIN])
        (out / f"lynx_ref_ppl_{d}.yaml").write_text(
            yaml_header(f"lynx_ref_ppl_{d}", f"heldout/{d}.jsonl", "loglikelihood_rolling")
            + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
            + "".join(f"  - metric: {m}\n" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
            + "metadata:\n  version: 1.0\n")
        print(f"heldout {d}: {min(len(segs), SEGS_PER_DOMAIN)} segments")
    (out / "lynx_ref_ppl.yaml").write_text(
        "group: lynx_ref_ppl\ntask:\n" + "".join(f"  - lynx_ref_ppl_{d}\n" for d in domains)
        + "metadata:\n  version: 1.0\n")


# ------------------------------------------------------------------ WordNet gloss choice

def build_wn_gloss(corpus: Path, out: Path, rng: random.Random, n: int = 1500):
    by_pos = collections.defaultdict(list)
    for doc in docs(corpus, "wordnet", "test"):
        m = re.match(r"^(.*?) \((noun|verb|adjective|adverb)\): (.*)$", doc["text"], re.S)
        if not m:
            continue
        gloss = m.group(3).split(";")[0].strip()  # definition only, no example sentences
        if len(gloss) < 10 or len(doc["title"]) < 3:
            continue
        by_pos[m.group(2)].append((doc["title"], m.group(2), gloss))
    pool = [x for v in by_pos.values() for x in v]
    rng.shuffle(pool)
    rows = []
    for word, pos, gloss in pool[:n]:
        others = [g for w, p, g in rng.sample(by_pos[pos], 8) if g != gloss and w != word][:3]
        if len(others) < 3:
            continue
        choices = others + [gloss]
        rng.shuffle(choices)
        rows.append({"query": f"{word} ({pos}):", "choices": [" " + c for c in choices],
                     "label": choices.index(gloss), "word": word})
    write_jsonl(out / "wn_gloss.jsonl", rows)
    (out / "lynx_ref_wn_gloss.yaml").write_text(
        yaml_header("lynx_ref_wn_gloss", "wn_gloss.jsonl", "multiple_choice")
        + 'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    print(f"wn_gloss: {len(rows)} items")


def build_wn_pos(corpus: Path, out: Path, rng: random.Random, per_pos: int = 600):
    """'<word> (' -> its part of speech among noun/verb/adjective/adverb, classes balanced (chance 0.25)."""
    by_pos = collections.defaultdict(list)
    for doc in docs(corpus, "wordnet", "test"):
        m = re.match(r"^(.*?) \((noun|verb|adjective|adverb)\): ", doc["text"])
        w = doc["title"]
        if m and len(w) >= 3 and " " not in w:
            by_pos[m.group(2)].append(w)
    # drop words that WordNet lists (in any split) under more than one part of speech
    all_pos = collections.defaultdict(set)
    for split in ("train", "validation", "test"):
        for doc in docs(corpus, "wordnet", split):
            m = re.match(r"^(.*?) \((noun|verb|adjective|adverb)\): ", doc["text"])
            if m:
                for w in m.group(1).split(", "):
                    all_pos[w.lower()].add(m.group(2))
    pos_names = ["noun", "verb", "adjective", "adverb"]
    rows, seen = [], set()
    for pos in pos_names:
        ws = sorted(set(by_pos[pos]))
        rng.shuffle(ws)
        n = 0
        for w in ws:
            if w in seen or len(all_pos[w.lower()]) > 1:  # several parts of speech would be ambiguous
                continue
            seen.add(w)
            rows.append({"query": f"{w} (", "choices": [p + ")" for p in pos_names], "label": pos_names.index(pos),
                         "word": w, "pos": pos})
            n += 1
            if n >= per_pos:
                break
    n_min = min(collections.Counter(r["pos"] for r in rows).values())
    rows = [r for r in rows if r["pos"] == "adverb" or
            sum(1 for q in rows[:rows.index(r) + 1] if q["pos"] == r["pos"]) <= max(n_min, 330)]
    rng.shuffle(rows)
    write_jsonl(out / "wn_pos.jsonl", rows)
    (out / "lynx_ref_wn_pos.yaml").write_text(
        yaml_header("lynx_ref_wn_pos", "wn_pos.jsonl", "multiple_choice")
        + 'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "metadata:\n  version: 1.0\n")
    print(f"wn_pos: {len(rows)} items " + str(collections.Counter(r["pos"] for r in rows)))


# ------------------------------------------------------------------ last word of held-out sentences

def word_freqs(corpus: Path):
    cnt = collections.Counter()
    for d in TEXT_DOMAINS:
        for i, doc in enumerate(docs(corpus, d, "train")):
            cnt.update(WORD.findall(doc["text"].lower()))
    return cnt


def sentence_items(corpus: Path, rng: random.Random, per_domain: int, answer_in_context: bool = False,
                   extra: int = 0, extra_rng: random.Random | None = None):
    """(domain, context, last_word) from test docs: the sentence's last word, preceding text as context.
    ``extra`` more per domain are drawn with ``extra_rng`` from the candidates the first draw left and
    come after all first-draw items (see ``EXTRA``)."""
    items, extras = [], []
    for d in TEXT_DOMAINS:
        cands = []
        for doc in docs(corpus, d, "test"):
            text = doc["text"]
            for m in re.finditer(r"(?<=[a-z,;]) ([A-Za-z]{3,})(?=[.!?](\s|$))", text):
                start = m.start()
                # the sentence must have >= 6 words before the target on the same line
                line_start = text.rfind("\n", 0, start) + 1
                sent_start = max(text.rfind(". ", line_start, start), line_start)
                if len(text[sent_start:start].split()) < 6:
                    continue
                ctx = text[max(0, start - 320):start]
                if start > 320:
                    ctx = ctx[ctx.find(" ") + 1:]
                if answer_in_context and not re.search(r"\b" + m.group(1) + r"\b", ctx, re.I):
                    continue
                cands.append((d, ctx.lstrip(), m.group(1), doc["id"]))
        picked = _spread_over_documents(cands, per_domain, rng)
        items.extend(picked)
        if extra:
            taken = set(picked)
            extras.extend(_spread_over_documents([c for c in cands if c not in taken], extra, extra_rng))
        print(f"  {d}: {len(picked)} sentence items from {len(cands)} candidates")
    return items + extras


def build_last_word(corpus: Path, out: Path, rng: random.Random, freqs, per_domain: int = 140,
                    extra: int = 0, extra_rng: random.Random | None = None):
    bands = collections.defaultdict(list)
    band_of = {}
    for w, c in freqs.items():
        if c >= 3 and len(w) >= 3:
            b = int(math.log2(c) * 2)
            bands[b].append(w)
            band_of[w] = b
    for b in bands:
        bands[b].sort()
    rows = []
    for d, ctx, word, doc_id in sentence_items(corpus, rng, per_domain, extra=extra, extra_rng=extra_rng):
        lw = word.lower()
        b = band_of.get(lw, min(bands))
        pool, lo, hi = list(bands.get(b, [])), b, b
        while len(pool) < 30:  # widen the frequency band until there are enough candidates
            lo, hi = lo - 1, hi + 1
            pool += bands.get(lo, []) + bands.get(hi, [])
        dist = []
        while len(dist) < 3:
            w = rng.choice(pool)
            if w != lw and w not in dist:
                dist.append(w)
        if word[0].isupper():
            dist = [w.capitalize() for w in dist]
        choices = dist + [word]
        rng.shuffle(choices)
        rows.append({"domain": d, "context": ctx, "choices": [" " + c for c in choices],
                     "label": choices.index(word), "doc": doc_id})
    write_jsonl(out / "last_word.jsonl", rows)
    (out / "lynx_ref_last_word.yaml").write_text(
        yaml_header("lynx_ref_last_word", "last_word.jsonl", "multiple_choice")
        + 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "metadata:\n  version: 1.0\n")
    print(f"last_word: {len(rows)} items")


def _majority(follow: collections.Counter | None, word: str) -> bool:
    """``word`` is the clear majority of ``follow`` (>= 5 occurrences, >= 50 % of them that word)."""
    if not follow:
        return False
    top, n = follow.most_common(1)[0]
    return top == word and sum(follow.values()) >= 5 and n / sum(follow.values()) >= 0.5


def predictable_word_items(corpus: Path, rng: random.Random, per_domain: int, exclude=frozenset(), words: int = 1):
    """Positions in test documents whose next ``words`` words (separated by single spaces) are each the clear
    majority continuation of the two words before it in the TRAIN split (>= 5 occurrences of the bigram, >= 50 %
    of them followed by that word); ``exclude`` applies to the first word."""
    tok_re = re.compile(r"[A-Za-z']+|[^A-Za-z'\s]")
    more = re.compile(r"(?: [A-Za-z]+){%d}(?![A-Za-z'-])" % (words - 1)) if words > 1 else re.compile("")
    cands = {}
    need = set()
    for d in TEXT_DOMAINS:
        cs = []
        for doc in docs(corpus, d, "test"):
            text = doc["text"]
            for m in re.finditer(r"(?<=[A-Za-z,] )([A-Za-z]{3,})\b", text):
                start = m.start()
                if start < 120:
                    continue
                prev = text[max(0, start - 60):start].split()
                if len(prev) < 2 or not all(WORD.fullmatch(w) for w in prev[-2:]):
                    continue
                tail = more.match(text, m.end())
                if tail is None:
                    continue
                answer = [m.group(1)] + tail.group(0).split()
                chain = [w.lower() for w in prev[-2:] + answer]
                keys = [tuple(chain[i:i + 2]) for i in range(words)]
                cs.append((keys, start, " ".join(answer), doc["id"], text))
                need.update(keys)
        cands[d] = cs
    follow = collections.defaultdict(collections.Counter)
    for d in TEXT_DOMAINS:
        for doc in docs(corpus, d, "train"):
            ws = [w.lower() for w in tok_re.findall(doc["text"])]
            for i in range(2, len(ws)):
                if (ws[i - 2], ws[i - 1]) in need:
                    follow[(ws[i - 2], ws[i - 1])][ws[i]] += 1
    items = []
    for d in TEXT_DOMAINS:
        ok = []
        for keys, start, answer, doc_id, text in cands[d]:
            if answer.split()[0].lower() in exclude or not all(
                    _majority(follow.get(k), w) for k, w in zip(keys, answer.lower().split())):
                continue
            ctx = text[max(0, start - 320):start]
            if start > 320:
                ctx = ctx[ctx.find(" ") + 1:]
            ok.append((d, ctx.lstrip().rstrip(" "), answer, doc_id))
        picked = _spread_over_documents(ok, per_domain, rng)
        print(f"  {d}: {len(picked)} predictable-word items from {len(ok)} candidates")
        items += picked
    return items


def build_next_word(corpus: Path, out: Path, rng: random.Random, freqs, per_domain: int = 180):
    common = {w for w, _ in freqs.most_common(150)}  # no function words / very frequent words as answers
    rows = [{"domain": d, "context": ctx, "answer": word, "doc": doc_id}
            for d, ctx, word, doc_id in predictable_word_items(corpus, rng, per_domain, exclude=common)]
    write_jsonl(out / "next_word.jsonl", rows)
    (out / "lynx_ref_next_word.yaml").write_text(
        yaml_header("lynx_ref_next_word", "next_word.jsonl", "generate_until")
        + 'doc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        + "generation_kwargs:\n  until: [\"\\n\", \".\", \",\", \";\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        + "filter_list:\n  - name: first_word\n    filter:\n      - function: regex\n"
        + "        regex_pattern: \"([A-Za-z']+)\"\n        group_select: 0\n        fallback: \"\"\n"
        + "      - function: take_first\n"
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        + "    ignore_case: true\n    ignore_punctuation: true\nmetadata:\n  version: 1.0\n")
    print(f"next_word: {len(rows)} items")


def build_next_words(corpus: Path, out: Path, rng: random.Random, per_domain: int = 600):
    """The next TWO words, each a predictable continuation (as in next_word, frequent words allowed), as two
    tasks on one file. ``lynx_ref_next_words`` (loglikelihood, like lambada): acc = the whole answer is the
    greedy continuation, i.e. greedy generation would produce it, and the answer's perplexity; scored in decode
    mode (``lynx lm-eval ... decode_scoring=true``) every answer token is predicted by a decode step, where a
    routing policy acts. ``lynx_ref_next_words_gen`` (generate_until, whole-answer exact match) is the same
    question for a server; there the first token comes from the prompt pass, which is routed natively."""
    rows = [{"domain": d, "context": ctx, "answer": words, "doc": doc_id}
            for d, ctx, words, doc_id in predictable_word_items(corpus, rng, per_domain, words=2)]
    write_jsonl(out / "next_words.jsonl", rows)
    (out / "lynx_ref_next_words.yaml").write_text(
        yaml_header("lynx_ref_next_words", "next_words.jsonl", "loglikelihood")
        + 'doc_to_text: "{{context}}"\ndoc_to_target: " {{answer}}"\nmetric_list:\n'
        + "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\nmetadata:\n  version: 1.0\n")
    (out / "lynx_ref_next_words_gen.yaml").write_text(
        yaml_header("lynx_ref_next_words_gen", "next_words.jsonl", "generate_until")
        + 'doc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        + "generation_kwargs:\n  until: [\"\\n\", \".\", \",\", \";\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        + "filter_list:\n  - name: first_words\n    filter:\n      - function: regex\n"
        + "        regex_pattern: \"([A-Za-z']+ [A-Za-z']+)\"\n        group_select: 0\n        fallback: \"\"\n"
        + "      - function: take_first\n"
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        + "    ignore_case: true\n    ignore_punctuation: true\nmetadata:\n  version: 1.0\n")
    print(f"next_words: {len(rows)} items")


def test_sentences(corpus: Path, rng: random.Random) -> dict:
    """Per domain ``(sentences, texts)``: shuffled ``(doc_id, start, sentence)`` of test-split
    sentences with >= 5 words and <= 150 characters on one line, and each document's text."""
    all_sents = {}
    for d in TEXT_DOMAINS:
        sents = []
        texts = {}
        for doc in docs(corpus, d, "test"):
            text = doc["text"]
            texts[doc["id"]] = text
            for m in re.finditer(r"(?<=[.!?] )([A-Z][^\n]{20,150}?[.!?])(?= |\n|$)", text):
                if len(m.group(1).split()) >= 5 and m.start() >= 80:
                    sents.append((doc["id"], m.start(), m.group(1)))
        rng.shuffle(sents)
        all_sents[d] = (sents, texts)
    return all_sents


def _next_sentence_rows(d, sents, texts, others, by_doc, cap, n, rng, skip=frozenset()):
    """Up to ``n`` items of domain ``d`` from ``sents`` (less the indices in ``skip``), at most ``cap``
    per document (``by_doc`` counts across calls). Returns ``(rows, indices used)``."""
    rows, used = [], set()
    for i, (doc_id, start, sent) in enumerate(sents):
        if len(rows) >= n:
            break
        if i in skip or by_doc[doc_id] >= cap:
            continue
        distractors = [x[2] for x in rng.sample(others, 12) if x[0] != doc_id][:3]
        if len(distractors) < 3:
            continue
        text = texts[doc_id]
        ctx = text[max(0, start - 240):start]
        if start > 240:
            ctx = ctx[ctx.find(" ") + 1:]
        choices = distractors + [sent]
        rng.shuffle(choices)
        rows.append({"domain": d, "context": ctx.rstrip(), "choices": [" " + c for c in choices],
                     "label": choices.index(sent), "doc": doc_id})
        by_doc[doc_id] += 1
        used.add(i)
    return rows, used


def build_next_sentence(corpus: Path, out: Path, rng: random.Random, per_domain: int = 175,
                        cross_domain: bool = False, name: str = "next_sentence",
                        extra: int = 0, extra_rng: random.Random | None = None):
    """Context ending at a sentence end -> the true next sentence vs 3 sentences from other test docs
    (other domains' with ``cross_domain``). ``extra`` more per domain, drawn with ``extra_rng`` from
    the sentences the first draw left, come after all first-draw items (see ``EXTRA``)."""
    rows, extras = [], []
    all_sents = test_sentences(corpus, rng)
    for d in TEXT_DOMAINS:
        sents, texts = all_sents[d]
        others = [x for e in TEXT_DOMAINS if e != d for x in all_sents[e][0]] if cross_domain else sents
        by_doc = collections.Counter()
        picked, used = _next_sentence_rows(d, sents, texts, others, by_doc, _doc_cap(per_domain, len(texts)),
                                           per_domain, rng)
        rows += picked
        if extra:
            extras += _next_sentence_rows(d, sents, texts, others, by_doc, _doc_cap(per_domain + extra, len(texts)),
                                          extra, extra_rng, skip=used)[0]
        print(f"  {d}: {len(picked)} {name} items from {len(sents)} sentences")
    rows += extras
    write_jsonl(out / f"{name}.jsonl", rows)
    (out / f"lynx_ref_{name}.yaml").write_text(
        yaml_header(f"lynx_ref_{name}", f"{name}.jsonl", "multiple_choice")
        + 'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        + "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        + "  - metric: acc_mutual_info\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    print(f"{name}: {len(rows)} items")


# Items per domain drawn after the first draw, with their own seeds, and appended to the task (3 Dec 2026):
# with the first draw alone the 95 % interval of the preset's paired accuracy change at batch 32 was
# +-0.54 (last_word) and +-0.64 point (next_sentence); issue 14 asks for +-0.5. The first-draw items keep
# their place at the head of each file, so results measured on them (``lynx eval --limit``) reproduce.
EXTRA = {"last_word": 60, "next_sentence": 300}

# Tasks shipped in models/lynx-ref-moe/eval. The others are built only with --all-tasks: the trained model
# stayed below 1.5x chance on them (see the model card), so they cannot show accuracy loss.
DEFAULT_TASKS = ["last_word", "next_word", "next_sentence", "continuation", "next_words"]
ALL_TASKS = ["wn_gloss", "wn_pos", "last_word", "next_word", "next_sentence", "continuation", "next_words"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(REPO / "runs/corpus"))
    ap.add_argument("--out", default=str(REPO / EVAL_REL))
    ap.add_argument("--tokenizer", default=str(REPO / "models/lynx-ref-moe"))
    ap.add_argument("--skip-heldout", action="store_true", help="do not rebuild the perplexity segments")
    ap.add_argument("--all-tasks", action="store_true", help="also build the tasks that are not shipped")
    ap.add_argument("--tasks", default=None, help="comma-separated tasks to build (default: the shipped ones)")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOADER_NAME).write_text(LOADER)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tasks = args.tasks.split(",") if args.tasks else ALL_TASKS if args.all_tasks else DEFAULT_TASKS
    if not args.skip_heldout:
        build_heldout(corpus, out, tok, random.Random(SEED))
    if "wn_gloss" in tasks:
        build_wn_gloss(corpus, out, random.Random(SEED + 1))
    freqs = word_freqs(corpus)
    if "last_word" in tasks:
        build_last_word(corpus, out, random.Random(SEED + 2), freqs, extra=EXTRA["last_word"],
                        extra_rng=random.Random(SEED + 12))
    if "next_word" in tasks:
        build_next_word(corpus, out, random.Random(SEED + 3), freqs)
    if "next_sentence" in tasks:
        build_next_sentence(corpus, out, random.Random(SEED + 4), extra=EXTRA["next_sentence"],
                            extra_rng=random.Random(SEED + 14))
    if "wn_pos" in tasks:
        build_wn_pos(corpus, out, random.Random(SEED + 5))
    if "continuation" in tasks:
        build_next_sentence(corpus, out, random.Random(SEED + 6), cross_domain=True, name="continuation")
    if "next_words" in tasks:
        build_next_words(corpus, out, random.Random(SEED + 7))


if __name__ == "__main__":
    main()
