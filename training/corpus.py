"""Build the multi-domain English text corpus from Debian packages.

Usage: python -m training.corpus [--out runs/corpus] [--workdir /tmp/lynx_debs]

Downloads Debian packages with ``apt-get download`` (no installation), unpacks them with
``dpkg-deb -x``, extracts clean running text per domain, deduplicates documents, and splits
train/validation/test BY DOCUMENT with a deterministic hash of (seed, domain, doc id).

Writes ``<out>/<domain>/{train,validation,test}.jsonl`` (records: id, domain, title, text) and
``training/corpus_manifest.json`` (sources, licences, byte and document counts).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED = 1234
SPLIT_FRACTIONS = {"test": 0.05, "validation": 0.03}  # rest is train

PACKAGES = [
    "python3.11-doc", "dict-gcide", "wordnet-base", "sword-text-web", "manpages", "manpages-dev",
    "perl-doc", "jargon-text", "fortunes", "fortunes-min", "dict-foldoc",
    # its section-6 man pages (35 documents) are in the committed manifest's "manpages" domain; without it a
    # fresh build gives 1856 instead of 1891 man pages and does not reproduce training/corpus_manifest.json
    "bsdgames",
]

SOURCES = {
    "bible": dict(package="sword-text-web", licence="Public domain (World English Bible, 2015 edition)",
                  path="usr/share/sword/modules/texts/ztext/engWEB2015eb/"),
    "dictionary": dict(package="dict-gcide", licence="GPL-2+ (GCIDE; based on Webster's 1913, public domain)",
                       path="usr/share/dictd/gcide.dict.dz"),
    "wordnet": dict(package="wordnet-base", licence="WordNet 3.0 licence (permissive, BSD-like)",
                    path="usr/share/wordnet/data.{noun,verb,adj,adv}"),
    "python_docs": dict(package="python3.11-doc", licence="PSF License Agreement (Python 3.11 documentation)",
                        path="usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
    "manpages": dict(package="manpages, manpages-dev", licence="Linux man-pages: mixed GPL-2+/BSD/MIT-style (per page)",
                     path="usr/share/man/man*/*.gz"),
    "perl_docs": dict(package="perl-doc", licence="GPL-1+ or Artistic License (Perl 5.36 documentation)",
                      path="usr/share/perl/5.36.0/pod/*.pod"),
    "jargon": dict(package="jargon-text", licence="Public domain (Jargon File 4.4.7)",
                   path="usr/share/doc/jargon-text/jargon.txt.gz"),
    "fortunes": dict(package="fortunes, fortunes-min", licence="BSD-3-Clause (fortune-mod data; offensive set excluded)",
                     path="usr/share/games/fortunes/*"),
    "foldoc": dict(package="dict-foldoc", licence="GFDL-1.1+ (Free On-line Dictionary of Computing)",
                   path="usr/share/dictd/foldoc.dict.dz"),
}

_WS = re.compile(r"[ \t]+")


def _clean_lines(text: str) -> str:
    lines = [_WS.sub(" ", ln).strip() for ln in text.replace("\r", "").split("\n")]
    out, blank = [], False
    for ln in lines:
        if not ln:
            if not blank and out:
                out.append("")
            blank = True
        else:
            out.append(ln)
            blank = False
    return "\n".join(out).strip()


# ---------------------------------------------------------------- extractors (yield id, title, text)

def extract_bible(root: Path):
    d = root / SOURCES["bible"]["path"]
    tag = re.compile(r"<[^>]+>")
    note = re.compile(r"<note\b.*?</note>", re.S)
    title = re.compile(r"<title\b.*?</title>", re.S)
    for testament in ("ot", "nt"):
        bzs = (d / f"{testament}.bzs").read_bytes()
        bzz = (d / f"{testament}.bzz").read_bytes()
        for b in range(len(bzs) // 12):
            off, size, _ = struct.unpack("<III", bzs[b * 12:(b + 1) * 12])
            raw = zlib.decompress(bzz[off:off + size]).decode("utf-8", "replace")
            parts = re.split(r'<chapter [^>]*osisID="([^"]+)"[^>]*/>', raw)
            # parts: [pre, id1, text1, id2, text2, ...]
            for i in range(1, len(parts) - 1, 2):
                cid, body = parts[i], parts[i + 1]
                body = note.sub("", body)
                body = title.sub("\n", body)
                body = re.sub(r'<div [^>]*type="x-p"[^>]*/>', "\n", body)
                body = tag.sub("", body)
                body = re.sub(r" +([,.;:!?])", r"\1", body)
                body = _clean_lines(body)
                if len(body) > 200:
                    book, ch = cid.split(".")[:2]
                    yield cid, f"{book} {ch}", body


def _dictd_entries(path: Path):
    index = path.with_suffix("").with_suffix(".index")
    data = gzip.open(path).read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s):
        v = 0
        for c in s:
            v = v * 64 + b64.index(c)
        return v

    seen = set()
    for line in index.read_text("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00"):
            continue
        off, ln = dec(parts[1]), dec(parts[2])
        if (off, ln) in seen:
            continue
        seen.add((off, ln))
        yield parts[0], data[off:off + ln].decode("utf-8", "replace")


def extract_gcide(root: Path):
    for word, raw in _dictd_entries(root / SOURCES["dictionary"]["path"]):
        t = re.sub(r"\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.|RN=\d+)[^\]]*\]", "", raw)
        t = re.sub(r"\[[A-Z]{2,4}\]", "", t)
        t = t.replace("{", "").replace("}", "").replace("\\", "/")
        t = re.sub(r"\s+--([A-Z][\w. ]*)", r" (\1)", t)
        t = _clean_lines(t)
        # re-flow: join wrapped lines inside paragraphs
        paras = [" ".join(p.split("\n")) for p in t.split("\n\n")]
        t = "\n".join(p for p in paras if p)
        if len(t) >= 40:
            yield f"gcide:{word}", word, t


def extract_foldoc(root: Path):
    for word, raw in _dictd_entries(root / SOURCES["foldoc"]["path"]):
        t = raw.replace("{", "").replace("}", "")
        t = re.sub(r"\(\d{4}-\d\d-\d\d\)", "", t)
        t = _clean_lines(t)
        paras = [" ".join(p.split("\n")) for p in t.split("\n\n")]
        t = "\n".join(p for p in paras if p)
        if len(t) >= 60:
            yield f"foldoc:{word}", word, t


WN_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def extract_wordnet(root: Path):
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / f"usr/share/wordnet/data.{pos}"
        for line in path.read_text("utf-8", "replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            offset, n = f[0], int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]
            gloss = gloss.strip()
            text = f"{', '.join(words)} ({WN_POS[pos]}): {gloss}"
            yield f"wn:{pos}:{offset}", words[0], text


def extract_python_docs(root: Path):
    base = root / "usr/share/doc/python3.11/html/_sources"
    for p in sorted(base.rglob("*.rst.txt")):
        t = p.read_text("utf-8", "replace")
        t = re.sub(r"^\.\. (index|highlight|module|moduleauthor|sectionauthor|versionadded|versionchanged|"
                   r"testsetup|testcode|currentmodule|toctree|_[^:]*):.*$", "", t, flags=re.M)
        t = re.sub(r"^\s*:(maxdepth|noindex|platform|synopsis|audit-event)[^\n]*$", "", t, flags=re.M)
        t = re.sub(r"^([=\-~^*#+\"'`])\1{3,}$", "", t, flags=re.M)  # section underlines
        t = re.sub(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", t)  # :func:`x` -> x
        t = t.replace("``", "")
        t = _clean_lines(t)
        if len(t) > 300:
            rel = str(p.relative_to(base))
            yield f"py:{rel}", rel.removesuffix(".rst.txt"), t


def _troff_to_text(src: str) -> str:
    out = []
    for ln in src.splitlines():
        if ln.startswith(".\\\"") or ln.startswith("'\\\"") or ln.startswith("\\\""):
            continue
        if ln.startswith(".") or ln.startswith("'"):
            m = re.match(r"[.'](\S+)\s*(.*)$", ln)
            if not m:
                continue
            mac, arg = m.group(1), m.group(2)
            if mac in ("SH", "SS"):
                out.append("")
                out.append(arg.strip('"'))
                out.append("")
            elif mac in ("B", "I", "BR", "IR", "RB", "BI", "IB", "RI", "SM", "SB"):
                toks = re.findall(r'"([^"]*)"|(\S+)', arg)
                out.append("".join(a or b for a, b in toks) if mac not in ("B", "I", "SM", "SB")
                           else " ".join(a or b for a, b in toks))
            elif mac in ("PP", "P", "LP", "TP", "IP", "sp", "br"):
                out.append("")
                if mac == "IP" and arg:
                    out.append(arg.split('"')[1] if arg.startswith('"') else arg.split()[0])
            # other requests (TH, nf, fi, RS, RE, in, ...) dropped
        else:
            out.append(ln)
    t = "\n".join(out)
    t = re.sub(r"\\f[BIRPC]|\\f\(..|\\f\[[^\]]*\]", "", t)
    t = re.sub(r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.", "", t)
    t = t.replace("\\-", "-").replace("\\(em", "--").replace("\\(en", "-").replace("\\(aq", "'")
    t = re.sub(r"\\\((lq|rq|dq)", '"', t)
    t = re.sub(r"\\\(..", "", t)
    t = re.sub(r"\\[&|^%:~ ]", lambda m: " " if m.group(0) in ("\\ ", "\\~") else "", t)
    t = t.replace("\\e", "\\").replace("\\\\", "\\")
    t = re.sub(r"\\\[[a-z]{2}\]", "*", t)
    t = _clean_lines(t)
    # re-flow paragraphs (troff splits sentences at every font change)
    return "\n".join(" ".join(p.split("\n")) if len(p.split("\n")) > 1 and i > 0 else p
                     for i, p in enumerate(t.split("\n\n"))).replace("\n", "\n\n")


def extract_manpages(root: Path):
    for p in sorted(glob.glob(str(root / "usr/share/man/man*/*.gz"))):
        try:
            src = gzip.open(p).read().decode("utf-8", "replace")
        except OSError:
            continue
        if src.lstrip().startswith(".so "):
            continue  # alias page
        t = _troff_to_text(src)
        if len(t) > 300:
            name = os.path.basename(p).removesuffix(".gz")
            yield f"man:{name}", name, t


def extract_perl_docs(root: Path):
    for p in sorted(glob.glob(str(root / "usr/share/perl/5.36.0/pod/*.pod"))):
        src = Path(p).read_text("utf-8", "replace")
        out, skip = [], False
        for ln in src.splitlines():
            if ln.startswith("="):
                cmd = ln.split()[0]
                arg = ln[len(cmd):].strip()
                if cmd in ("=begin", "=for"):
                    skip = cmd == "=begin"
                    continue
                if cmd == "=end":
                    skip = False
                    continue
                if cmd.startswith("=head") or cmd == "=item":
                    out.append("")
                    out.append(arg)
                    out.append("")
                continue
            if not skip:
                out.append(ln)
        t = "\n".join(out)
        for _ in range(3):
            t = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", t)
            t = re.sub(r"L<([^<>|]*\|)?([^<>]*)>", r"\2", t)
            t = re.sub(r"[BICFSEXZ]<([^<>]*)>", r"\1", t)
        t = _clean_lines(t)
        if len(t) > 300:
            name = os.path.basename(p).removesuffix(".pod")
            yield f"pod:{name}", name, t


def extract_jargon(root: Path):
    src = gzip.open(root / SOURCES["jargon"]["path"]).read().decode("utf-8", "replace")
    # entries start with a line "   :headword: ..." after the glossary begins
    chunks = re.split(r"\n(?=   :[^:\n]+:)", src)
    for ch in chunks[1:]:
        m = re.match(r"\s*:([^:\n]+):", ch)
        word = m.group(1).strip()
        t = ch.replace("{", "").replace("}", "")
        t = _clean_lines(t)
        paras = [" ".join(p.split("\n")) for p in t.split("\n\n")]
        t = "\n".join(p for p in paras if p)
        if len(t) > 60:
            yield f"jargon:{word}", word, t


def extract_fortunes(root: Path):
    base = root / "usr/share/games/fortunes"
    for p in sorted(base.iterdir()):
        if p.suffix or not p.is_file() or p.name in ("art", "ascii-art"):
            continue
        src = p.read_text("utf-8", "replace")
        for i, f in enumerate(re.split(r"\n%\n", src)):
            t = _clean_lines(f)
            if len(t) >= 20 and not re.search(r"[|_\\/]{4,}", t):
                yield f"fortune:{p.name}:{i}", p.name, t


EXTRACTORS = {
    "bible": extract_bible, "dictionary": extract_gcide, "wordnet": extract_wordnet,
    "python_docs": extract_python_docs, "manpages": extract_manpages, "perl_docs": extract_perl_docs,
    "jargon": extract_jargon, "fortunes": extract_fortunes, "foldoc": extract_foldoc,
}


def split_of(domain: str, doc_id: str, seed: int = SEED) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}|{domain}|{doc_id}".encode()).digest()[:8], "big") / 2**64
    if h < SPLIT_FRACTIONS["test"]:
        return "test"
    if h < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["validation"]:
        return "validation"
    return "train"


def fetch(workdir: Path) -> Path:
    debs = workdir / "debs"
    root = workdir / "root"
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in debs.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    if not (root / ".done").exists():
        root.mkdir(parents=True, exist_ok=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / ".done").write_text("ok")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs/corpus"))
    ap.add_argument("--workdir", default="/tmp/lynx_corpus_work")
    ap.add_argument("--manifest", default=str(REPO / "training/corpus_manifest.json"))
    args = ap.parse_args()
    root = fetch(Path(args.workdir))
    out = Path(args.out)
    manifest = {"seed": SEED, "split_fractions": SPLIT_FRACTIONS, "debian_release": "bookworm (12)",
                "packages": {}, "domains": {}}
    for deb in sorted((Path(args.workdir) / "debs").glob("*.deb")):
        manifest["packages"][deb.name.split("_")[0]] = deb.name
    for domain, fn in EXTRACTORS.items():
        seen = set()
        files = {}
        (out / domain).mkdir(parents=True, exist_ok=True)
        for s in ("train", "validation", "test"):
            files[s] = open(out / domain / f"{s}.jsonl", "w", encoding="utf-8")
        stats = {s: {"docs": 0, "bytes": 0} for s in files}
        dups = 0
        for doc_id, title, text in fn(root):
            key = hashlib.sha1(re.sub(r"\W+", " ", text.lower()).encode()).hexdigest()
            if key in seen:
                dups += 1
                continue
            seen.add(key)
            s = split_of(domain, doc_id)
            files[s].write(json.dumps({"id": doc_id, "domain": domain, "title": title, "text": text},
                                      ensure_ascii=False) + "\n")
            stats[s]["docs"] += 1
            stats[s]["bytes"] += len(text.encode())
        for f in files.values():
            f.close()
        info = dict(SOURCES[domain])
        info.update(splits=stats, duplicates_removed=dups,
                    total_bytes=sum(v["bytes"] for v in stats.values()),
                    total_docs=sum(v["docs"] for v in stats.values()))
        manifest["domains"][domain] = info
        print(f"{domain:12s} docs={info['total_docs']:7d} bytes={info['total_bytes'] / 1e6:7.2f}MB dups={dups}",
              flush=True)
    Path(args.manifest).write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
