#!/usr/bin/env python3
"""BENCHMARKS.md, results.md and the plots, from a results.json written by bench/harness.py.

    python3 bench/report.py [RESULTS_JSON] [--out DIR] [--benchmarks-md PATH]

Nothing here measures: every figure comes from the results file, so the report can be made
again (or changed) without running the benchmark again. Plots need matplotlib (the bench venv
has it); without it the report is written without them, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORDER = ["direct", "nginx", "litellm", "tiergate", "tiergate-redis"]
LABEL = {"direct": "direct", "nginx": "nginx limit_req", "litellm": "LiteLLM",
         "tiergate": "tiergate (memory)", "tiergate-redis": "tiergate (Redis)"}
SCEN = {"plain": "plain (JSON answers)", "stream": "streaming (SSE)",
        "reject50": "50% rejected (half the load on a key over its limits)",
        "denied": "all denied (the whole load on a key over its limits)"}
RIG_BOUND = 0.8  # within 20% of the ceiling (direct) means bound by the rig


def f(v, nd=2, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}{unit}"
    return f"{v:.{nd}f}{unit}"


def k(v):
    return "–" if v is None else f"{v:,.0f}"


def ratio(a, b):
    return None if a is None or not b else a / b


class R:
    """The results file, with the lookups the report needs."""

    def __init__(self, data: dict):
        self.d = data
        self.runs = data.get("runs", [])
        peers_present = {r["peer"] for r in self.runs if not r["peer"].startswith("upstream:")}
        self.peers = [p for p in ORDER if p in peers_present] + sorted(
            peers_present - set(ORDER))
        self.scenarios = [s for s in ("plain", "stream", "reject50", "denied")
                          if any(r["scenario"] == s and r["phase"] == "open" for r in self.runs)]

    def max_runs(self, peer, sc):
        return [r for r in self.runs if r["phase"] == "max" and r["peer"] == peer
                and r["scenario"] == sc]

    def max_median(self, peer, sc, key="achieved_rps"):
        v = [r[key] for r in self.max_runs(peer, sc) if r.get(key) is not None]
        return statistics.median(v) if v else None

    def open_runs(self, peer, sc):
        return sorted([r for r in self.runs if r["phase"] == "open" and r["peer"] == peer
                       and r["scenario"] == sc], key=lambda r: r["offered_rps"])

    def open_at(self, peer, sc, rate):
        for r in self.open_runs(peer, sc):
            if r["offered_rps"] == rate:
                return r
        return None

    def passes(self, r):
        o = self.d.get("options", {})
        return (r["error_rate"] < o.get("max_error_rate", 0.01) and r["p99_ms"] is not None
                and r["p99_ms"] < o.get("max_p99_ms", 50.0))

    def saturation(self, peer, sc):
        best = None
        for r in self.open_runs(peer, sc):
            if self.passes(r):
                best = r["offered_rps"]
            else:
                break
        return best


# --------------------------------------------------------------------------------------------


def plots(res: R, out: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    colors = {"direct": "#444444", "nginx": "#2a9d3f", "litellm": "#c0392b",
              "tiergate": "#1f5fbf", "tiergate-redis": "#8e44ad"}
    for sc in res.scenarios:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
        for peer in res.peers:
            rs = res.open_runs(peer, sc)
            if not rs:
                continue
            for ax, key in ((axes[0], "p50_ms"), (axes[1], "p99_ms")):
                pts = [(r["offered_rps"], r[key], r) for r in rs if r[key] and r[key] > 0]
                if not pts:
                    continue
                ax.plot([a for a, _, _ in pts], [b for _, b, _ in pts], marker="o",
                        color=colors.get(peer), label=LABEL.get(peer, peer))
                bad = [(a, b) for a, b, r in pts if not res.passes(r)]
                if bad:
                    ax.scatter(*zip(*bad), marker="x", s=80, color=colors.get(peer))
        for ax, t in ((axes[0], "p50"), (axes[1], "p99")):
            if ax.has_data():
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xlabel("offered load (req/s, open loop)")
            ax.set_ylabel(f"{t} latency (ms, from scheduled send)")
            ax.axhline(50, color="#999999", lw=0.8, ls=":")
            ax.grid(True, which="both", alpha=0.25)
            ax.set_title(f"{t} latency vs offered load")
        axes[0].legend(fontsize=8)
        quick = " — SMOKE RUN" if res.d.get("quick") else ""
        fig.suptitle(f"{SCEN[sc]}{quick} (x = failed: errors ≥ 1% or p99 ≥ 50 ms)", fontsize=10)
        fig.tight_layout()
        name = f"latency-{sc}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, f"Latency against offered load, {SCEN[sc]}"))

    # Max throughput, medians with the rounds as dots.
    scs = [s for s in ("plain", "stream") if any(res.max_runs(p, s) for p in res.peers)]
    if scs:
        fig, ax = plt.subplots(figsize=(10, 4.2))
        w = 0.8 / len(scs)
        for i, sc in enumerate(scs):
            xs, ys = [], []
            for j, peer in enumerate(res.peers):
                m = res.max_median(peer, sc)
                if not m:
                    continue
                xs.append(j + i * w)
                ys.append(m)
                pts = [r["achieved_rps"] for r in res.max_runs(peer, sc)]
                ax.scatter([j + i * w] * len(pts), pts, color="black", s=8, zorder=3)
            ax.bar(xs, ys, width=w, label=sc)
        ax.set_xticks([j + w * (len(scs) - 1) / 2 for j in range(len(res.peers))])
        ax.set_xticklabels([LABEL.get(p, p) for p in res.peers], fontsize=8)
        ax.set_ylabel("req/s (closed loop, median of rounds)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(True, axis="y", which="both", alpha=0.25)
        ax.set_title("Max throughput, peer on one core" +
                     (" — SMOKE RUN" if res.d.get("quick") else ""))
        fig.tight_layout()
        fig.savefig(out / "max-throughput.png", dpi=110)
        plt.close(fig)
        made.append(("max-throughput.png", "Max throughput per peer (closed loop)"))
    return made


# --------------------------------------------------------------------------------------------


def max_table(res: R, sc: str) -> list[str]:
    ceiling = res.max_median("direct", sc)
    nginx = res.max_median("nginx", sc)
    rounds = max((len(res.max_runs(p, sc)) for p in res.peers), default=0)
    lines = [f"| peer | rounds (req/s) | median req/s | × direct | × nginx | gateway core % | "
             f"gateway CPU µs/req | CPU s / 10k req | peak RSS MB | load-gen core % | "
             f"core 0 % | p99 ms | |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res.peers:
        runs = res.max_runs(p, sc)
        if not runs:
            continue
        m = res.max_median(p, sc)
        flag = ""
        if p != "direct" and ceiling and m >= RIG_BOUND * ceiling:
            flag = "**rig-bound** (≥ 80% of direct)"
        elif p == "direct":
            flag = "the rig's ceiling"
        lines.append("| " + " | ".join([
            LABEL.get(p, p), ", ".join(k(r["achieved_rps"]) for r in runs), k(m),
            f(ratio(m, ceiling)), f(ratio(m, nginx)),
            f(res.max_median(p, sc, "gateway_core_pct"), 0),
            f(res.max_median(p, sc, "gateway_cpu_us_per_req"), 1),
            f(res.max_median(p, sc, "gateway_cpu_s_per_10k"), 3),
            f(max((r.get("gateway_hwm_mb") or 0 for r in runs), default=None) or None, 1),
            f(res.max_median(p, sc, "loadgen_core_pct"), 0),
            f(res.max_median(p, sc, "core0_pct"), 0),
            f(res.max_median(p, sc, "p99_ms"), 2), flag]) + " |")
    if rounds == 0:
        return []
    return lines


def open_table(res: R, sc: str) -> list[str]:
    lines = ["| peer | offered req/s | achieved | p50 ms | p90 ms | p99 ms | max ms | errors | "
             + ("denied | " if sc == "reject50" else "")
             + "gateway core % | gateway µs/req | load-gen core % | core 0 % | |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if sc == "reject50" else "")
             + "---|---|---|---|---|"]
    for p in res.peers:
        for r in res.open_runs(p, sc):
            row = [LABEL.get(p, p), k(r["offered_rps"]), k(r["achieved_rps"]), f(r["p50_ms"], 3),
                   f(r["p90_ms"], 3), f(r["p99_ms"], 3), f(r["max_ms"], 1),
                   f"{100 * r['error_rate']:.2f}%"]
            if sc == "reject50":
                row.append(f"{100 * r['denied'] / r['completed']:.1f}%" if r["completed"] else "–")
            row += [f(r.get("gateway_core_pct"), 0), f(r.get("gateway_cpu_us_per_req"), 1),
                    f(r["loadgen_core_pct"], 0), f(r["core0_pct"], 0),
                    "" if res.passes(r) else "**fails**"]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def added_latency(res: R, sc: str) -> list[str]:
    rates = sorted({r["offered_rps"] for p in res.peers for r in res.open_runs(p, sc)})
    lines = ["| peer | " + " | ".join(f"{k(x)}/s p50 / p99" for x in rates) + " |",
             "|---|" + "---|" * len(rates)]
    for p in res.peers:
        if p == "direct":
            continue
        cells = []
        for x in rates:
            a, d = res.open_at(p, sc, x), res.open_at("direct", sc, x)
            if not has_latency(a, d):
                cells.append("–")
            else:
                cells.append(f"{a['p50_ms'] - d['p50_ms']:+.3f} / {a['p99_ms'] - d['p99_ms']:+.3f}"
                             + ("" if res.passes(a) else " ✗"))
        lines.append(f"| {LABEL.get(p, p)} | " + " | ".join(cells) + " |")
    return lines


def has_latency(*runs) -> bool:
    return all(r is not None and r.get("p50_ms") is not None and r.get("p99_ms") is not None
               for r in runs)


def denial_costs(res: R, peer: str) -> list[dict]:
    """CPU per request of the denied run and of the plain run at each rate where both passed.
    Older results without denied runs: the reject50 run, less its admitted half at the plain
    run's CPU per request (which overstates a denial, since the admitted half runs at half the
    plain run's rate, where each request costs more)."""
    out = []
    for r in res.open_runs(peer, "denied"):
        plain = res.open_at(peer, "plain", r["offered_rps"])
        if plain and res.passes(plain) and res.passes(r) and r.get("gateway_cpu_s") is not None \
                and plain["completed"] and r["denied"]:
            a = plain["gateway_cpu_s"] / plain["completed"]
            d = r["gateway_cpu_s"] / r["completed"]
            out.append({"rate": plain["offered_rps"], "admitted_us": 1e6 * a,
                        "denied_us": 1e6 * d, "ratio": d / a if a else None, "from": "denied"})
    if out:
        return out
    for r in res.open_runs(peer, "reject50"):
        plain = res.open_at(peer, "plain", r["offered_rps"])
        if plain and res.passes(plain) and res.passes(r) and r.get("gateway_cpu_s") is not None \
                and plain["completed"] and r["denied"]:
            a = plain["gateway_cpu_s"] / plain["completed"]
            d = (r["gateway_cpu_s"] - a * r["ok"]) / r["denied"]
            out.append({"rate": plain["offered_rps"], "admitted_us": 1e6 * a,
                        "denied_us": 1e6 * d, "ratio": d / a if a else None, "from": "reject50"})
    return out


def denial_cost(res: R, peer: str):
    """The denial cost at 2k req/s (the latency target's rate), else the highest common rate."""
    common = denial_costs(res, peer)
    if not common:
        return None
    return next((c for c in common if c["rate"] == 2000), common[-1])


def targets(res: R) -> list[str]:
    o = []
    ng = res.max_median("nginx", "plain")
    tg = res.max_median("tiergate", "plain")
    ll = res.max_median("litellm", "plain")
    direct = res.max_median("direct", "plain")
    us = res.max_median("tiergate", "plain", "gateway_cpu_us_per_req")
    ng_us = res.max_median("nginx", "plain", "gateway_cpu_us_per_req")

    def verdict(ok):
        return "–" if ok is None else ("**met**" if ok else "**not met**")

    o.append("| target | figure (this run, this machine) | verdict |")
    o.append("|---|---|---|")
    r1 = ratio(tg, ng)
    rig = bool(direct and ng and ng >= RIG_BOUND * direct)
    o.append(f"| Throughput: tiergate (memory) ≥ 0.8× nginx `limit_req` on one core | "
             f"{k(tg)} vs {k(ng)} req/s = **{f(r1)}×**; CPU {f(us, 1)} µs/req vs nginx "
             f"{f(ng_us, 1)} µs/req" + (" (nginx is rig-bound: the ratio understates "
                                         "nginx, compare CPU µs/req)" if rig else "")
             + f" | {verdict(None if r1 is None else r1 >= 0.8)} |")
    r2 = ratio(tg, ll)
    o.append(f"| Throughput: ≥ 50× LiteLLM | {k(tg)} vs {k(ll)} req/s = **{f(r2, 1)}×** | "
             f"{verdict(None if r2 is None else r2 >= 50)} |")
    for peer, p50_t, p99_t in (("tiergate", 0.1, 0.3), ("tiergate-redis", 0.3, None)):
        a, d = res.open_at(peer, "plain", 2000), res.open_at("direct", "plain", 2000)
        if has_latency(a, d):
            dp50, dp99 = a["p50_ms"] - d["p50_ms"], a["p99_ms"] - d["p99_ms"]
            ok = dp50 <= p50_t and (p99_t is None or dp99 <= p99_t)
            txt = f"+{dp50:.3f} ms p50, +{dp99:.3f} ms p99 over direct"
        else:
            ok, txt = None, "no 2k req/s runs of both"
        want = f"p50 ≤ {p50_t} ms" + (f", p99 ≤ {p99_t} ms" if p99_t else "")
        o.append(f"| Latency at 2k req/s, {LABEL[peer]}: added {want} | {txt} | {verdict(ok)} |")
    dc = denial_cost(res, "tiergate")
    if dc:
        every = denial_costs(res, "tiergate")
        span = ", ".join(f"{c['ratio']:.2f}× at {k(c['rate'])}/s" for c in every)
        o.append(f"| Denials cost ≤ ½ the CPU of an admission (tiergate, memory) | at "
                 f"{k(dc['rate'])} req/s: {dc['denied_us']:.1f} µs per denied vs "
                 f"{dc['admitted_us']:.1f} µs per admitted = **{dc['ratio']:.2f}×** "
                 f"(every rate: {span}) | {verdict(dc['ratio'] <= 0.5)} at "
                 f"{k(dc['rate'])} req/s |")
    else:
        o.append("| Denials cost ≤ ½ the CPU of an admission | no passing plain and denied "
                 "runs at a common rate | – |")
    idle = res.d.get("peers", {}).get("tiergate", {}).get("idle_rss_mb")
    o.append(f"| Memory: gateway RSS at idle ≤ 30 MB | {f(idle, 1)} MB (after start and "
             f"setting up {res.d.get('options', {}).get('workspaces')} workspaces) | "
             f"{verdict(None if idle is None else idle <= 30)} |")
    o.append("| Limiter: one three-limit decision ≤ 100 ns median, ≤ 250 ns with 1M workspaces | "
             "not measured by this harness: see the section \"Micro-benchmarks\" | see "
             "\"Micro-benchmarks\" |")
    o.append("| Memory: limiter state ≤ 256 B per active workspace | not measured by this "
             "harness: see the section \"Micro-benchmarks\" | see \"Micro-benchmarks\" |")
    o.append("| Estimate: median within 0.9–1.1, p90 within 0.75–1.33 per language | not "
             "measured by this harness: see the section \"Estimate quality\" | see "
             "\"Estimate quality\" |")
    o.append("| CI: instructions per request within 10% of the committed baseline | see the "
             "section \"Instruction counts (CI)\" | see \"Instruction counts (CI)\" |")
    return o


def machine_lines(m: dict) -> list[str]:
    keep = ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket",
            "Hypervisor vendor", "L1d cache", "L2 cache", "L3 cache", "CPU max MHz",
            "BogoMIPS")
    sel = [l for l in m.get("lscpu", "").splitlines() if l.split(":")[0].strip() in keep]
    out = ["```text"] + sel + [
        f"kernel: {m.get('kernel')}", f"memory: {m.get('mem_total')}",
        f"load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')}",
        f"nginx: {m.get('nginx')}", f"oha: {m.get('oha')}", f"redis: {m.get('redis')}",
        f"LiteLLM: {m.get('litellm')}", f"rustc: {m.get('rustc')}",
        f"tiergate: {m.get('git_log')} ({m.get('git')})", "```"]
    return out


def generate(results_path: Path, out: Path, bench_md: Path | None) -> None:
    data = json.loads(Path(results_path).read_text())
    res = R(data)
    out.mkdir(parents=True, exist_ok=True)
    made = plots(res, out)
    quick = data.get("quick")
    opts = data.get("options", {})

    tables = []
    for sc in ("plain", "stream"):
        t = max_table(res, sc)
        if t:
            tables += [f"### Max throughput, {SCEN[sc]}", ""] + t + [""]
    for sc in res.scenarios:
        tables += [f"### Open loop, {SCEN[sc]}", ""] + open_table(res, sc) + [""]
        if sc not in ("reject50", "denied") and "direct" in res.peers:
            tables += [f"Added latency over direct (ms, same rate, same run), {SCEN[sc]}; "
                       "✗ = that run failed:", ""] + added_latency(res, sc) + [""]
    sat = ["| peer | " + " | ".join(SCEN[s].split(" (")[0] for s in res.scenarios) + " |",
           "|---|" + "---|" * len(res.scenarios)]
    for p in res.peers:
        sat.append(f"| {LABEL.get(p, p)} | " + " | ".join(
            k(res.saturation(p, s)) if res.saturation(p, s) else "below the lowest rate"
            for s in res.scenarios) + " |")
    tables += ["### Saturation (highest offered rate with < 1% errors and p99 < 50 ms)", ""] + sat + [""]
    den = ["| peer | rate | CPU µs per admitted (plain run) | CPU µs per denied (denied run) | "
           "denied / admitted |", "|---|---|---|---|---|"]
    for p in res.peers:
        if p == "direct":
            continue
        for dc in denial_costs(res, p):
            den.append(f"| {LABEL.get(p, p)} | {k(dc['rate'])} | {dc['admitted_us']:.1f} | "
                       f"{dc['denied_us']:.1f} | {dc['ratio']:.2f} |")
    tables += ["### Cost of a denial", "",
               "From two open-loop runs at the same offered rate: the gateway's CPU per request "
               "of the plain run (every request admitted) and of the denied run (every request "
               "denied). At low rates each request wakes an idle process, a cost that an "
               "admitted request pays twice (the client's request, then the upstream's answer) "
               "and a denied one once, whatever the work: the ratio falls as the rate rises.",
               ""] + den + [""]
    mem = ["| peer | start (s) | idle RSS MB | peak RSS MB (whole run) | threads |",
           "|---|---|---|---|---|"]
    for p, info in data.get("peers", {}).items():
        hw = max((r.get("gateway_hwm_mb") or 0 for r in data["runs"] if r["peer"] == p),
                 default=0) or None
        mem.append(f"| {LABEL.get(p, p)} | {info.get('start_s')} | {f(info.get('idle_rss_mb'), 1)} "
                   f"| {f(hw, 1)} | {info.get('threads', '–')} |")
    tables += ["### Memory", ""] + mem + [""]
    redis_rows = [r for r in data["runs"] if r["peer"] == "tiergate-redis" and r["phase"] == "max"]
    if redis_rows:
        tables += ["Redis (on the gateway's core 1) took, in the max-throughput runs of tiergate "
                   "(Redis): " + ", ".join(
                       f"{r['scenario']} {f(r.get('redis_cpu_us_per_req'), 1)} µs/req"
                       for r in redis_rows) + " (not included in the gateway's figures).", ""]

    (out / "results.md").write_text(
        ("**SMOKE RUN (`--quick`): too short to quote.**\n\n" if quick else "")
        + "\n".join(tables) + "\n")

    if bench_md is None:
        return
    up = data.get("upstream_check")
    rel = os.path.relpath(out, bench_md.parent)
    md = []
    md.append("# Benchmarks")
    md.append("")
    if quick:
        md.append("> **SMOKE RUN.** This file was written by `bench/run --quick`: one round, "
                  "runs of a few seconds, two rates. Its figures show that the harness works, "
                  "not how fast anything is; do not quote them. The full run is `bench/run`.")
        md.append("")
    if data.get("interrupted") or data.get("failed"):
        md.append("> **Incomplete run**: " + ("interrupted" if data.get("interrupted") else
                                             "failed, see results.json") + ".")
        md.append("")
    md.append(f"Made by `bench/run` ({'--quick' if quick else 'full run'}) on "
              f"{data.get('started')}, {data.get('elapsed_s')} s; regenerated from "
              f"[`{rel}/results.json`]({rel}/results.json) by `bench/report.py`. "
              "Absolute figures are **this machine's**, on a 2-core virtual machine; the ratios "
              "between peers, measured in the same run, are what carries over.")
    md.append("")
    md.append("## Summary")
    md.append("")
    summ = ["| peer | max req/s plain (× direct, × nginx) | max req/s stream | CPU µs/req "
            "(plain, at max) | saturation, plain (req/s) | added p50 / p99 at 2k/s (ms) |",
            "|---|---|---|---|---|---|"]
    for p in res.peers:
        m = res.max_median(p, "plain")
        a, d = res.open_at(p, "plain", 2000), res.open_at("direct", "plain", 2000)
        add = ("–" if p == "direct" or not has_latency(a, d) else
               f"{a['p50_ms'] - d['p50_ms']:+.3f} / {a['p99_ms'] - d['p99_ms']:+.3f}"
               + ("" if res.passes(a) else " ✗"))
        summ.append(f"| {LABEL.get(p, p)} | {k(m)} ({f(ratio(m, res.max_median('direct', 'plain')))}, "
                    f"{f(ratio(m, res.max_median('nginx', 'plain')))}) | "
                    f"{k(res.max_median(p, 'stream'))} | "
                    f"{f(res.max_median(p, 'plain', 'gateway_cpu_us_per_req'), 1)} | "
                    f"{k(res.saturation(p, 'plain'))} | {add} |")
    md += summ + [""]
    md.append("## Targets (issue 10)")
    md.append("")
    md += targets(res) + [""]
    if data.get("perf"):
        md.append("Profile of tiergate (memory) at max throughput, plain (`--perf`: "
                  "`perf record -g` on the gateway; self time, by shared object then symbol):")
        md.append("")
        md.append("```text")
        md.append(data["perf"].rstrip())
        md.append("```")
        md.append("")
    else:
        md.append("No profile in this run (`bench/run --perf` records one of tiergate at max "
                  "throughput).")
        md.append("")
    md.append("## Method")
    md.append("")
    md.append(f"""- **Rig.** Everything on loopback. Core 0: the load generator (oha, one worker
  thread) and the upstream (nginx, 1 worker). Core 1: the peer under test, alone (nginx with 1
  worker; LiteLLM with 1 worker; tiergate with `--workers 1`, tokio's single-threaded
  scheduler, whose other threads are on core 1 too), and **Redis on core 1 as well, beside the gateway**
  for tiergate (Redis). Placement by `taskset`. All peers run for the whole benchmark; the
  ones not being measured are stopped with SIGSTOP so that they take no CPU.
- **Upstream.** nginx answering every request with a fixed chat completion carrying `usage`
  (or a fixed stream of server-sent events ending with a usage chunk and `data: [DONE]` when
  the request has `x-bench-stream: 1`; LiteLLM, which does not forward that header, has a
  second model pointed at a port that always streams).
- **Peers.** direct (to the upstream); nginx as a reverse proxy with `limit_req` keyed on
  `$http_authorization` (keep-alive to the upstream); the LiteLLM proxy with per-key
  `rpm_limit`/`tpm_limit` through `general_settings.custom_auth` and no database; tiergate
  `serve` on SQLite with limits in memory; tiergate with `--redis` (a `redis-server` of the
  harness's own). tiergate's workspaces, keys and tiers are made through its admin API:
  {opts.get('workspaces')} workspaces with a key each, on a tier with every limit set
  (requests/s, tokens/min, tokens/month, concurrency) high enough that nothing is denied; one
  more on a tier of 0.001 requests/s for the denials. Every request is authenticated,
  estimated, reserved against all limits, forwarded and settled to the upstream's usage
  (ledger writes included).
- **Requests.** `POST /v1/chat/completions`, a chat
  prompt of about 300 characters, `max_tokens: 64`, one key; `stream: true` for streaming.
  {opts.get('conns')} keep-alive connections per run.
- **Max throughput.** Closed loop (oha without a rate), {opts.get('max_duration')} s per run,
  {opts.get('rounds')} round(s), the peers interleaved and their order rotated each round;
  the median is reported. A peer at ≥ 80% of direct's median is marked rig-bound: the
  load generator and upstream, not the peer, set its figure.
- **Open loop.** `oha -q RATE --latency-correction` (latency from each request's scheduled
  send time, so a stall counts for every request it delays), {opts.get('duration')} s per rate,
  rates {opts.get('rates')} req/s ({opts.get('low_rates') or 'no'} more below for peers under
  1k req/s), ascending: every rate up to {k(opts.get('always_upto'))} req/s for every peer, above it
  until the peer's first failing rate. **Saturation** = the highest offered rate with
  < {100 * opts.get('max_error_rate', 0.01):.0f}% errors and p99 < {opts.get('max_p99_ms')} ms.
- **50% rejected.** Two oha processes at half the rate each: one on a key within its limits,
  one on a key over them (nginx: a second `limit_req` zone of 1 r/m for that key; LiteLLM:
  `rpm_limit: 1`; tiergate: the 0.001 requests/s tier). Errors are answers other than 200 on
  the first and 429 on the second.
- **All denied.** One oha process with the whole rate on the key over its limits, at each rate
  where the plain scenario passed; errors are answers other than 429 (less a first one or two
  that pass). The cost of a denial is its CPU per request over the plain run's at the same
  rate.
- **CPU and memory.** utime + stime of the peer's processes (all threads, children included)
  from `/proc/PID/stat`, over each run; peak RSS is `VmHWM`. CPU µs per request = CPU seconds
  / completed requests. The load generator's CPU comes from its rusage; "core 0 %" adds the
  upstream's.""")
    md.append("")
    md.append("## Machine")
    md.append("")
    md += machine_lines(data.get("machine", {})) + [""]
    md.append("## Commands")
    md.append("")
    md.append("```sh")
    md.append("bench/run            # full run: installs what is missing, builds, runs, "
              "writes bench/results/ and BENCHMARKS.md")
    md.append("bench/run --quick    # smoke run, under 2 minutes: bench/smoke/")
    md.append("bench/run --perf     # also a perf profile of tiergate at max throughput")
    md.append("python3 bench/report.py bench/results/results.json   # this file again, from "
              "the results")
    md.append("```")
    md.append("")
    md.append(f"This run: `bench/run {' '.join(data.get('argv', []))}`.")
    md.append("")
    if up:
        md.append("## The upstream")
        md.append("")
        md.append("Each candidate alone on core 1, closed loop from core 0:")
        md.append("")
        md.append("| upstream | req/s | p50 ms | p99 ms |")
        md.append("|---|---|---|---|")
        for n, v in up.items():
            md.append(f"| {n} | {k(v['rps'])} | {f(v['p50_ms'], 3)} | {f(v['p99_ms'], 3)} |")
        faster = max(up, key=lambda n: up[n]["rps"])
        md.append("")
        md.append(f"The faster is **{faster}**; the benchmark uses nginx's fixed answer.")
        md.append("")
    md.append("## Results")
    md.append("")
    md += tables
    if made:
        md.append("## Plots")
        md.append("")
        for name, title in made:
            md.append(f"![{title}]({rel}/{name})")
            md.append("")
    else:
        md.append("(No plots: matplotlib was not available to report.py.)")
        md.append("")
    # Sections written by others (the micro-benchmarks, the estimate, the instruction counts,
    # or any other): kept as they are in the existing file, placeholders when absent.
    generated = {title for title in (l[3:].strip() for l in md if l.startswith("## "))}
    kept = existing_sections(bench_md)
    for title, placeholder in FOREIGN:
        body = kept.pop(title, None)
        md.append(f"## {title}")
        md.append("")
        md.append(body.strip("\n") if body and body.strip() else f"*Placeholder: {placeholder} "
                  "This harness does not write this section: it keeps what is here when it "
                  "regenerates the file. No figures here yet.*")
        md.append("")
    for title, body in kept.items():
        if title not in generated:
            md += [f"## {title}", "", body.strip("\n"), ""]
    bench_md.write_text("\n".join(md))


FOREIGN = [
    ("Micro-benchmarks", "the in-process benchmarks of issue 10 (`cargo bench`: a decision over "
                         "three limits, with 100k and 1M workspaces, two threads, the settle "
                         "step, the estimate, allocations; the limiter's memory per workspace)."),
    ("Estimate quality", "the estimate-quality script of issue 10 (estimate ÷ real tokens per "
                         "language, median and p90)."),
    ("Instruction counts (CI)", "the callgrind regression check of issue 10 (instructions per "
                                "request against the committed baseline)."),
]


def existing_sections(path: Path) -> dict[str, str]:
    """The `## ` sections of an existing BENCHMARKS.md, by title, in order."""
    if not path.exists():
        return {}
    out: dict[str, str] = {}
    title, buf, fence = None, [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        if line.startswith("## ") and not fence:
            if title is not None:
                out[title] = "\n".join(buf)
            title, buf = line[3:].strip(), []
        elif title is not None:
            buf.append(line)
    if title is not None:
        out[title] = "\n".join(buf)
    # A placeholder left by this script is not someone's section.
    return {t: b for t, b in out.items() if "*Placeholder:" not in b}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(REPO / "bench" / "results" / "results.json"))
    ap.add_argument("--out", help="where results.md and the plots go (default: beside the "
                                  "results file)")
    ap.add_argument("--benchmarks-md", help="default: the repository's BENCHMARKS.md, or "
                                            "OUT/BENCHMARKS.md for a smoke run")
    a = ap.parse_args()
    rp = Path(a.results)
    out = Path(a.out) if a.out else rp.parent
    quick = json.loads(rp.read_text()).get("quick")
    md = Path(a.benchmarks_md) if a.benchmarks_md else (
        out / "BENCHMARKS.md" if quick else REPO / "BENCHMARKS.md")
    generate(rp, out, md)
    print(f"wrote {out}/results.md, plots and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
