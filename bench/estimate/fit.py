#!/usr/bin/env python3
"""Fits the weights of tiergate's prompt estimate (src/estimate.rs) to the corpus.

Counts, per text, the character classes and runs the estimator counts, and finds the weights
(tokens per character of each class, per run of punctuation or whitespace) that minimise the squared relative error
estimate/real - 1, each language weighing the same, for one tokenizer. The estimator's
constants are these weights rounded to sixteenths of a token, then adjusted by hand between
tokenizers (see the module docs of src/estimate.rs); run.py then measures the Rust code
itself. This script only informs the choice of constants: it is not on any path.

Usage: fit.py [tekken|o200k_base|cl100k_base ...]
"""

from __future__ import annotations

import sys

import numpy as np

import run

# The features of src/estimate.rs (`text_sixteenths`), in its order: characters of a class, or
# runs of a group.
CLASSES = ["letter", "digit", "punct_run", "space_run", "newline", "latin", "cjk", "kana", "cjk_punct", "other"]
GROUP = {"letter": "word", "latin": "word", "digit": "digit", "space": "space", "newline": "space", "punct": "punct"}


def char_class(c: str) -> str:
    o = ord(c)
    if o < 0x80:
        if c.isalpha():
            return "letter"
        if c.isdigit():
            return "digit"
        if c == "\n":
            return "newline"
        if c in " \t\r":
            return "space"
        return "punct"
    if o <= 0x24F:
        return "latin"
    if 0x2000 <= o <= 0x206F:
        return "punct"
    if 0x3040 <= o <= 0x30FF:
        return "kana"
    if 0x3000 <= o <= 0x303F or 0xFF00 <= o <= 0xFFEF:
        return "cjk_punct"
    if 0x3400 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3FFFF:
        return "cjk"
    return "other"


def features(text: str) -> np.ndarray:
    f = dict.fromkeys(CLASSES, 0)
    prev = "wide"
    for c in text:
        k = char_class(c)
        group = GROUP.get(k, "wide")
        if group != prev and group in ("punct", "space"):
            f[group + "_run"] += 1
        prev = group
        if k in f:
            f[k] += 1
    return np.array([f[k] for k in CLASSES], dtype=float)


def main() -> int:
    toks = sys.argv[1:] or ["tekken", "o200k_base"]
    samples = run.corpus()
    count, _ = run.load_tokenizers()
    rows = {lang: np.array([features(t) for t in texts]) for lang, texts in samples.items()}
    for tok in toks:
        real = {lang: np.array([count[tok](t) for t in texts], dtype=float) for lang, texts in samples.items()}
        # "other" (scripts the corpus lacks, and stray symbols) is not fitted: one token each.
        fit, other = slice(0, len(CLASSES) - 1), len(CLASSES) - 1
        a = np.vstack([rows[l][:, fit] / real[l][:, None] / np.sqrt(len(real[l])) for l in run.LANGUAGES])
        b = np.concatenate([(1 - rows[l][:, other] / real[l]) / np.sqrt(len(real[l])) for l in run.LANGUAGES])
        w, *_ = np.linalg.lstsq(a, b, rcond=None)
        w = np.append(w, 1.0)
        print(f"# {tok}")
        print("  " + "  ".join(f"{k}={v:.3f} ({round(v * 16)}/16)" for k, v in zip(CLASSES, w)))
        for lang in run.LANGUAGES:
            r = rows[lang] @ w / real[lang]
            print(f"  {lang:7} median {np.median(r):.3f}  p10 {np.percentile(r, 10):.3f}  p90 {np.percentile(r, 90):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
