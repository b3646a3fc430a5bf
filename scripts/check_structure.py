#!/usr/bin/env python3
"""The structure rules of ARCHITECTURE.md ("Structure"), checked on src/ of both crates:

- no circle of `use`s: no module imports (`use crate::…`, `use super::…`) a sibling — or a
  module under one — that imports it back, directly or through others (a parent and its own
  children may refer to each other: that is how Rust modules are declared);
- no `dead_code` allowance.

Function length (at most 80 lines) is clippy's `too_many_lines`, set in clippy.toml and
enabled in each crate root, so `cargo clippy -D warnings` enforces it.
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
USE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?use\s+((?:crate|super|self)(?:::[^;]*)?);", re.S | re.M)


def modules(src):
    """Module path (tuple) -> file, for every .rs file under src."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3].split(os.sep)
            if rel[-1] in ("mod", "lib", "main"):
                rel = rel[:-1]
            out[tuple(rel)] = os.path.join(dirpath, f)
    return out


def expand(tree):
    """`a::{b, c::{d}}` -> ["a::b", "a::c::d"] (enough of use-tree syntax for paths)."""
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)::\{(.*)\}$", tree)
    if not m:
        return [tree]
    head, body = m.groups()
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        parts.append(cur)
    return [p for part in parts for p in expand(head + "::" + part)]


def target(mod, path, mods):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = (), segs[1:]
    else:
        base = mod
        while segs and segs[0] in ("super", "self"):
            if segs.pop(0) == "super":
                base = base[:-1]
    full = base + tuple(segs)
    for n in range(len(full), -1, -1):
        if full[:n] in mods:
            return full[:n]
    return None


def check(src):
    mods = modules(src)
    edges = {m: set() for m in mods}
    for mod, f in mods.items():
        text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", open(f).read(), flags=re.S)
        inline = re.findall(r"(?<![\w:])((?:crate|super)(?:::[A-Za-z_]\w*)+)", re.sub(r"//.*", "", text))
        for tree in USE.findall(text) + inline:
            for path in expand(tree):
                t = target(mod, path, mods)
                if t is None or t == mod:
                    continue
                # A parent and its descendants may refer to each other.
                if t[: len(mod)] == mod or mod[: len(t)] == t:
                    continue
                edges[mod].add(t)
    # Strongly connected components (Tarjan): any with more than one module is a circle.
    index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in mods:
        if v not in index:
            visit(v)
    problems = []
    for comp in sccs:
        if len(comp) > 1:
            names = sorted("::".join(c) or "crate" for c in comp)
            detail = "; ".join(
                f"{'::'.join(a)} -> {'::'.join(b)}"
                for a in sorted(comp) for b in sorted(edges[a]) if b in comp)
            problems.append(f"{src}: a circle of uses among {', '.join(names)} ({detail})")
    for mod, f in mods.items():
        for i, line in enumerate(open(f), 1):
            if "dead_code" in line and line.lstrip().startswith("#"):
                problems.append(f"{f}:{i}: dead_code allowance")
    return problems


problems = check(os.path.join(ROOT, "src")) + check(os.path.join(ROOT, "producer", "src"))
for p in problems:
    print("FAIL " + p)
if problems:
    sys.exit(1)
print("ok   no circle of uses, no dead_code allowance (src/, producer/src/)")
