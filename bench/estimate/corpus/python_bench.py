#!/usr/bin/env python3
"""Measures tiergate's prompt estimate against real tokenizers, per language.

For every sample of the corpus (see README.md beside this file), the ratio
estimate / real tokens, where
- the estimate is tiergate's own code: `examples/estimate.rs` prints
  `tiergate::estimate::prompt_tokens_of_text` of each text;
- the real count is the text encoded without special tokens by
  - Mistral's Tekken (`tekken_240911.json`, shipped inside the `mistral-common` package),
  - OpenAI's `o200k_base` and `cl100k_base`, run by `tiktoken` on the BPE files that the
    `bpe-openai` package bundles (tiktoken itself only downloads them; their SHA-256 is checked
    against the one tiktoken expects).

Writes results.json and RESULTS.md (median, p10, p90 of the ratio per language and tokenizer).
Usage: run.py [--estimator PATH] [--baseline OLD.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CORPUS = HERE / "corpus"

LANGUAGES = ["en", "rust", "python", "json", "fr", "de", "zh", "ja"]
LABELS = {
    "en": "English prose",
    "rust": "Rust source",
    "python": "Python source",
    "json": "JSON",
    "fr": "French",
    "de": "German",
    "zh": "Chinese",
    "ja": "Japanese",
}
TOKENIZERS = ["tekken", "o200k_base", "cl100k_base"]
TARGET_MEDIAN = (0.9, 1.1)
TARGET_P90 = (0.75, 1.33)


# ---------------------------------------------------------------- corpus


def windows(units: list[str], sep: str, targets=(700, 1500, 3000, 4000)) -> list[str]:
    """Runs of consecutive units, each grown until it reaches a target length."""
    out = []
    for t_i, target in enumerate(targets):
        start = t_i % 3
        while start < len(units):
            acc, end = [], start
            while end < len(units) and len(sep.join(acc)) < target:
                acc.append(units[end])
                end += 1
            if len(acc) > 1 and len(sep.join(acc)) >= target * 0.6:
                out.append(sep.join(acc))
            start = end + 2
    return out


def first_sentence(p: str) -> str:
    m = re.match(r"(.+?[.!?。！？])(\s|$)", p, re.S)
    return m.group(1) if m else p[:120]


def prose_samples(lang: str) -> list[str]:
    paras = [p.strip() for p in (CORPUS / f"{lang}.txt").read_text().split("\n\n") if p.strip()]
    samples = [first_sentence(p) for p in paras]
    samples += paras
    samples += windows(paras, "\n\n")
    return samples


def code_blocks(text: str) -> list[str]:
    """Blocks separated by blank lines, small ones merged with the next."""
    blocks, acc = [], ""
    for b in re.split(r"\n\s*\n", text):
        acc = f"{acc}\n\n{b}" if acc else b
        if len(acc) >= 60:
            blocks.append(acc)
            acc = ""
    if acc:
        blocks.append(acc)
    return blocks


def rust_samples() -> list[str]:
    # Our own source: the repository's Rust modules, a fixed list so the corpus is stable.
    files = ["corpus/rust.rs"]
    text = "\n\n".join((HERE / f).read_text() for f in files)
    blocks = code_blocks(text)
    return blocks[:40] + windows(blocks, "\n\n")


def python_samples() -> list[str]:
    text = (CORPUS / "python.txt").read_text() + "\n\n" + Path(__file__).read_text()
    blocks = code_blocks(text)
    return blocks[:40] + windows(blocks, "\n\n")


def json_samples() -> list[str]:
    """Request bodies, tool schemas, answers and records, compact and indented, built from
    our own words with a fixed seed."""
    rng = random.Random(7)
    words = re.findall(r"[A-Za-z']+", (CORPUS / "en.txt").read_text())
    sentences = [first_sentence(p) for p in (CORPUS / "en.txt").read_text().split("\n\n")]

    def phrase(n):
        return " ".join(rng.choice(words) for _ in range(n))

    def ident():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24))

    def chat(n):
        msgs = [{"role": "system", "content": rng.choice(sentences)}]
        for i in range(n):
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": rng.choice(sentences)})
        return {"model": rng.choice(["mistral-large-latest", "gpt-4o-mini", "open-mistral-nemo"]),
                "messages": msgs, "temperature": round(rng.random(), 2), "max_tokens": rng.choice([256, 1024, 4096])}

    def tool():
        props = {}
        for _ in range(rng.randint(1, 6)):
            name = "_".join(rng.choice(words).lower() for _ in range(2))
            props[name] = rng.choice([
                {"type": "string", "description": phrase(rng.randint(3, 10))},
                {"type": "integer", "minimum": 0, "maximum": rng.randint(10, 10000)},
                {"type": "string", "enum": [rng.choice(words).lower() for _ in range(3)]},
                {"type": "boolean"},
            ])
        return {"type": "function", "function": {"name": "_".join(rng.choice(words).lower() for _ in range(2)),
                "description": phrase(rng.randint(5, 15)),
                "parameters": {"type": "object", "properties": props, "required": list(props)[:1]}}}

    def record():
        return {"id": ident(), "workspace": rng.randint(1, 99999), "created_at": f"2026-{rng.randint(1,12):02}-{rng.randint(1,28):02}T{rng.randint(0,23):02}:{rng.randint(0,59):02}:{rng.randint(0,59):02}Z",
                "model": rng.choice(["mistral-small", "codestral-latest", "gpt-4o"]),
                "usage": {"prompt_tokens": rng.randint(1, 9000), "completion_tokens": rng.randint(1, 2000)},
                "price": round(rng.random() * 3, 6), "ok": rng.random() < 0.9, "note": None if rng.random() < 0.5 else phrase(4)}

    def answer():
        return {"id": "chatcmpl-" + ident(), "object": "chat.completion", "created": rng.randint(1.7e9, 1.8e9),
                "model": "mistral-large-latest",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(rng.sample(sentences, 2))}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": rng.randint(10, 900), "completion_tokens": rng.randint(10, 900), "total_tokens": rng.randint(20, 1800)}}

    docs = []
    for i in range(48):
        kind = i % 4
        n = 1 + (i * 7) % 23
        if kind == 0:
            doc = chat(min(n, 12))
        elif kind == 1:
            doc = {"tools": [tool() for _ in range(1 + n // 6)]}
        elif kind == 2:
            doc = {"data": [record() for _ in range(1 + n // 2)], "has_more": rng.random() < 0.5}
        else:
            doc = answer()
        text = json.dumps(doc, indent=2 if i % 3 == 0 else None, ensure_ascii=False)
        docs.append(text[:4000] if len(text) <= 4000 else text[:4000])
    return docs


def corpus() -> dict[str, list[str]]:
    c = {lang: prose_samples(lang) for lang in ["en", "fr", "de", "zh", "ja"]}
    c["rust"] = rust_samples()
    c["python"] = python_samples()
    c["json"] = json_samples()
    return {lang: [s for s in c[lang] if s.strip()] for lang in LANGUAGES}


# ---------------------------------------------------------------- tokenizers


def load_tokenizers():
    import mistral_common
    import tiktoken
    import bpe_openai
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from tiktoken_ext import openai_public

    tekken_path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    tekken = Tekkenizer.from_file(str(tekken_path))
    data = Path(bpe_openai.__file__).parent / "data"

    def load_local(url, expected_hash=None):
        raw = gzip.decompress((data / (url.rsplit("/", 1)[-1] + ".gz")).read_bytes())
        if expected_hash and hashlib.sha256(raw).hexdigest() != expected_hash:
            raise SystemExit(f"{url}: the bundled file is not the one tiktoken expects")
        import base64
        return {base64.b64decode(tok): int(rank) for tok, rank in (l.split() for l in raw.splitlines() if l)}

    openai_public.load_tiktoken_bpe = load_local
    encodings = {}
    for name in ["o200k_base", "cl100k_base"]:
        spec = getattr(openai_public, name)()
        encodings[name] = tiktoken.Encoding(**spec)
    return {
        "tekken": lambda t: len(tekken.encode(t, bos=False, eos=False)),
        "o200k_base": lambda t: len(encodings["o200k_base"].encode(t, disallowed_special=())),
        "cl100k_base": lambda t: len(encodings["cl100k_base"].encode(t, disallowed_special=())),
    }, {
        "tekken": f"mistral-common {mistral_common.__version__}, {tekken_path.name}",
        "o200k_base": f"tiktoken {tiktoken.__version__} on bpe-openai {bpe_openai.__version__}'s o200k_base.tiktoken",
        "cl100k_base": f"tiktoken {tiktoken.__version__} on bpe-openai {bpe_openai.__version__}'s cl100k_base.tiktoken",
    }


# ---------------------------------------------------------------- estimator


def build_estimator() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    subprocess.run(["cargo", "build", "--quiet", "--example", "estimate"], cwd=REPO, check=True)
    return target / "debug" / "examples" / "estimate"


def estimates(binary: Path, texts: list[str]) -> list[int]:
    stdin = "".join(json.dumps(t) + "\n" for t in texts)
    out = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


# ---------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(ratios: list[float]) -> dict:
    return {
        "median": round(percentile(ratios, 0.5), 3),
        "p10": round(percentile(ratios, 0.1), 3),
        "p90": round(percentile(ratios, 0.9), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def meets(s: dict) -> bool:
    return (TARGET_MEDIAN[0] <= s["median"] <= TARGET_MEDIAN[1]
            and TARGET_P90[0] <= s["p10"] and s["p90"] <= TARGET_P90[1])


def markdown(result: dict, baseline: dict | None) -> str:
    lines = [
        "# Prompt estimate against real tokenizers",
        "",
        "Generated by `bench/estimate/run.py`. Ratio = tiergate's estimate of a text",
        "(`estimate::prompt_tokens_of_text`, run by `examples/estimate.rs`) ÷ the tokens of the",
        "same text without special tokens. Target: median in 0.9–1.1, p10 ≥ 0.75 and p90 ≤ 1.33.",
        "",
        "Tokenizers: " + "; ".join(f"`{k}`: {v}" for k, v in result["tokenizers"].items()) + ".",
        "",
    ]
    for tok in TOKENIZERS:
        head = f"## {tok}" + (" (primary target)" if tok == "tekken" else "")
        lines += [head, ""]
        if baseline:
            lines += ["| language | samples | chars | before: median (p10–p90) | after: median | p10 | p90 | target |",
                      "|---|---:|---:|---|---:|---:|---:|---|"]
        else:
            lines += ["| language | samples | chars | median | p10 | p90 | target |", "|---|---:|---:|---:|---:|---:|---|"]
        for lang in LANGUAGES:
            r = result["languages"][lang]
            s = r["ratio"][tok]
            row = f"| {LABELS[lang]} | {r['samples']} | {r['chars_min']}–{r['chars_max']} |"
            if baseline:
                b = baseline["languages"][lang]["ratio"][tok]
                row += f" {b['median']:.2f} ({b['p10']:.2f}–{b['p90']:.2f}) |"
            row += f" {s['median']:.2f} | {s['p10']:.2f} | {s['p90']:.2f} | {'met' if meets(s) else 'not met'} |"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--estimator", type=Path, help="a built examples/estimate binary")
    ap.add_argument("--baseline", type=Path, help="an earlier results.json, shown as 'before'")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--dump", type=Path, help="also write every sample with its counts (JSON lines)")
    args = ap.parse_args()

    samples = corpus()
    count, versions = load_tokenizers()
    binary = args.estimator or build_estimator()
    result = {"tokenizers": versions, "languages": {}}
    dump = []
    for lang in LANGUAGES:
        texts = samples[lang]
        est = estimates(binary, texts)
        real = {tok: [count[tok](t) for t in texts] for tok in TOKENIZERS}
        result["languages"][lang] = {
            "samples": len(texts),
            "chars_min": min(len(t) for t in texts),
            "chars_max": max(len(t) for t in texts),
            "ratio": {tok: summary([e / max(r, 1) for e, r in zip(est, real[tok])]) for tok in TOKENIZERS},
        }
        for i, t in enumerate(texts):
            dump.append({"lang": lang, "text": t, "estimate": est[i], **{tok: real[tok][i] for tok in TOKENIZERS}})
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (args.out / "RESULTS.md").write_text(markdown(result, baseline))
    if args.dump:
        args.dump.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dump))
    print(markdown(result, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
