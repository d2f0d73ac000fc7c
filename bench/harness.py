#!/usr/bin/env python3
"""The benchmark harness: tiergate against the peers users would otherwise pick, on loopback.

Run it through `bench/run` (which installs what is missing); see bench/README.md.

Design, in the order a run goes:

1. **Placement.** Two cores: the load generator (oha) and the fixed upstream (nginx, 1 worker)
   on core 0, the peer under test on core 1 (nginx with 1 worker, LiteLLM with 1 worker,
   tiergate with one tokio worker, and the Redis it uses). Every process is started here with
   `taskset`, and stopped here (process groups, also on failure or Ctrl-C).
2. **Upstream.** nginx returning a fixed chat completion with `usage`, or a fixed stream of
   server-sent events ending in a usage chunk and `data: [DONE]` when the request carries
   `x-bench-stream: 1` (and always on a second port, for LiteLLM, which does not forward client
   headers). The run first compares it with `tiergate mock-upstream`, each alone on core 1.
3. **Peers,** all started once and kept running; while one is measured, the others are
   stopped with SIGSTOP so that they take no CPU from it (`--no-pause` turns this off).
4. **Max throughput:** closed loop, `--rounds` rounds interleaving the peers (the order rotates
   each round); medians reported, since this machine's speed drifts from minute to minute.
5. **Open loop:** fixed offered rates with latency measured from each request's scheduled send
   time (`oha -q RATE --latency-correction`), ascending until a rate fails (errors >= 1% or
   p99 >= 50 ms); the highest passing rate is the peer's saturation.
6. **Scenarios:** `plain` (JSON answers), `stream` (server-sent events), `reject50`: half the
   offered rate on a key over its limits, half on a key within them, as two oha processes, and
   `denied`: the whole offered rate on the key over its limits. The cost of a denial is the
   gateway's CPU per request of a `denied` run over that of the `plain` run at the same offered
   rate (a request's CPU depends on the rate, since at low rates each request wakes an idle
   process: the two must be compared at one rate). `denied` runs only at the rates where
   `plain` passed.
7. **Per run:** the gateway's CPU seconds (utime + stime of its process tree from /proc), its
   peak RSS (VmHWM), the load generator's CPU (rusage), and core 0's use by load generator and
   upstream together. Results go to `results.json`; `report.py` makes the tables, the plots and
   BENCHMARKS.md from that file alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_CORE = "0"
PEER_CORE = "1"

PROMPT = (
    "You are a careful assistant. Summarise the following paragraph in one sentence. "
    "Rate limits protect upstream capacity: each workspace gets requests per second, tokens "
    "per minute and tokens per month, enforced atomically and settled to the tokens the "
    "upstream really used, with headers on every answer so that clients can back off."
)
USAGE = {"prompt_tokens": 82, "completion_tokens": 24, "total_tokens": 106}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A process started by the harness, in a session of its own, stopped by `stop`."""

    all: list["Proc"] = []

    def __init__(self, name: str, argv: list[str], core: str | None, log_path: Path,
                 env: dict | None = None, cwd: Path | None = None):
        self.name = name
        full = (["taskset", "-c", core] if core is not None else []) + argv
        self.log_path = log_path
        self.logf = open(log_path, "ab")
        e = dict(os.environ)
        if env:
            e.update(env)
        self.p = subprocess.Popen(full, stdout=self.logf, stderr=subprocess.STDOUT, env=e,
                                  cwd=cwd, start_new_session=True)
        self.pid = self.p.pid
        Proc.all.append(self)

    def alive(self) -> bool:
        return self.p.poll() is None

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def signal_tree(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 10.0) -> None:
        if self.p.poll() is None:
            self.signal_tree(signal.SIGCONT)
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        # Children left in the group (nginx workers) go with it.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.logf.close()
        if self in Proc.all:
            Proc.all.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for p in list(reversed(cls.all)):
            try:
                p.stop(grace=5.0)
            except Exception as e:  # keep stopping the others
                log(f"stopping {p.name}: {e}")


def tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def status_kb(pids: list[int], field: str) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: Proc | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open within {timeout}s")


def http_call(port: int, method: str, path: str, body=None, headers=None, timeout=30.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"content-type": "application/json"}
    h.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, out


def wait_http(port: int, path: str, proc: Proc, timeout: float, method="GET", body=None,
              headers=None, ok=(200,)) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        try:
            st, out = http_call(port, method, path, body, headers, timeout=5)
            if st in ok:
                return
            last = f"{st} {out[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.3)
    raise RuntimeError(f"{proc.name}: {path} not ready within {timeout}s (last: {last})")


# --------------------------------------------------------------------------------------------
# The upstream


def chat_json() -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1764633600,
        "model": "bench-model",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant",
            "content": "Limits per workspace are enforced atomically and settled to real usage."}}],
        "usage": USAGE,
    }, separators=(",", ":"))


def chat_sse() -> str:
    def chunk(delta, finish=None, usage=None, choices=True):
        c = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764633600,
             "model": "bench-model",
             "choices": ([{"index": 0, "delta": delta, "finish_reason": finish}]
                         if choices else []),
             "usage": usage}
        return "data: " + json.dumps(c, separators=(",", ":")) + "\n\n"
    parts = [chunk({"role": "assistant", "content": ""})]
    for w in ["Limits ", "are ", "enforced ", "atomically ", "and ", "settled."]:
        parts.append(chunk({"content": w}))
    parts.append(chunk({}, finish="stop"))
    parts.append(chunk(None, usage=USAGE, choices=False))
    parts.append("data: [DONE]\n\n")
    return "".join(parts)


def nginx_quote(s: str) -> str:
    # nginx expands $variables in `return` text and unescapes \" and \\ in quoted strings.
    assert "$" not in s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_common(d: Path) -> str:
    tmp = d / "tmp"
    tmp.mkdir(exist_ok=True)
    return f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65535;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  tcp_nodelay on;
"""


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_upstream(work: Path, port: int, sse_port: int, core: str) -> Proc:
    d = work / "upstream"
    d.mkdir(exist_ok=True)
    conf = nginx_common(d) + f"""
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      if ($http_x_bench_stream) {{
        add_header content-type text/event-stream always;
        return 200 {nginx_quote(chat_sse())};
      }}
      default_type application/json;
      return 200 {nginx_quote(chat_json())};
    }}
  }}
  server {{
    listen 127.0.0.1:{sse_port} reuseport backlog=4096;
    location / {{
      default_type text/event-stream;
      return 200 {nginx_quote(chat_sse())};
    }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    p = Proc("upstream-nginx", [nginx_bin(), "-c", str(d / "nginx.conf"), "-p", str(d)], core,
             d / "out.log")
    wait_port(port, p, 10)
    wait_port(sse_port, p, 10)
    return p


# --------------------------------------------------------------------------------------------
# Peers


class Peer:
    name = ""
    label = ""
    gateway = True

    def __init__(self):
        self.procs: list[Proc] = []
        self.port = 0
        self.allow_key = "bench-allow"
        self.deny_key = "bench-deny"

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def model(self, stream: bool) -> str:
        return "bench-model"

    def gateway_pids(self) -> list[int]:
        """The processes whose CPU and memory count as the peer's."""
        return [pid for p in self.procs for pid in p.pids()]

    def extra_pids(self) -> dict[str, list[int]]:
        return {}

    def pause(self) -> None:
        for p in self.procs:
            p.signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.procs:
            p.signal_tree(signal.SIGCONT)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


class Direct(Peer):
    name, label, gateway = "direct", "direct (no gateway)", False

    def __init__(self, up_port: int):
        super().__init__()
        self.port = up_port

    def start(self, ctx) -> None:
        pass


class NginxLimitReq(Peer):
    name, label = "nginx", "nginx limit_req"

    def start(self, ctx) -> None:
        d = ctx.work / "nginx-peer"
        d.mkdir(exist_ok=True)
        self.port = free_port()
        conf = nginx_common(d) + f"""
  limit_req_zone $http_authorization zone=per_key:16m rate=1000000r/s;
  map $http_authorization $over_limit_key {{
    default "";
    "Bearer {self.deny_key}" $http_authorization;
  }}
  limit_req_zone $over_limit_key zone=over_limit:1m rate=1r/m;
  limit_req_status 429;
  upstream fixed {{
    server 127.0.0.1:{ctx.up_port};
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location / {{
      limit_req zone=per_key burst=1000000 nodelay;
      limit_req zone=over_limit nodelay;
      proxy_pass http://fixed;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        p = Proc("nginx-peer", [nginx_bin(), "-c", str(d / "nginx.conf"), "-p", str(d)],
                 PEER_CORE, d / "out.log")
        self.procs.append(p)
        wait_port(self.port, p, 10)


LITELLM_AUTH = '''\
"""Bench keys for LiteLLM without a database: each key's rpm/tpm limits, from a JSON file."""
import json
import os

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

with open(os.environ["BENCH_LITELLM_KEYS"]) as f:
    KEYS = json.load(f)


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    key = api_key[7:] if api_key.startswith("Bearer ") else api_key
    limits = KEYS.get(key)
    if limits is None:
        raise Exception("invalid api key")
    return UserAPIKeyAuth(api_key=key, rpm_limit=limits["rpm_limit"],
                          tpm_limit=limits["tpm_limit"])
'''


class LiteLLM(Peer):
    name, label = "litellm", "LiteLLM proxy"

    def model(self, stream: bool) -> str:
        return "bench-model-stream" if stream else "bench-model"

    def start(self, ctx) -> None:
        d = ctx.work / "litellm"
        d.mkdir(exist_ok=True)
        self.port = free_port()
        (d / "custom_auth.py").write_text(LITELLM_AUTH)
        keys = {
            self.allow_key: {"rpm_limit": 100_000_000, "tpm_limit": 10_000_000_000},
            self.deny_key: {"rpm_limit": 1, "tpm_limit": 10_000_000_000},
        }
        (d / "keys.json").write_text(json.dumps(keys))
        (d / "config.yaml").write_text(f"""model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:{ctx.up_port}/v1
      api_key: bench-upstream-key
      input_cost_per_token: 0.0000001
      output_cost_per_token: 0.0000003
  - model_name: bench-model-stream
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:{ctx.up_sse_port}/v1
      api_key: bench-upstream-key
      input_cost_per_token: 0.0000001
      output_cost_per_token: 0.0000003
general_settings:
  custom_auth: custom_auth.user_api_key_auth
  master_key: sk-{os.urandom(32).hex()}
  disable_spend_logs: true
  disable_error_logs: true
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
""")
        venv = Path(os.environ.get("BENCH_VENV", "/var/tmp/tiergate-bench/venv"))
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "BENCH_LITELLM_KEYS": str(d / "keys.json"),
            "LITELLM_LOG": "ERROR",
            "PYTHONPATH": str(d),
            "NO_PROXY": "*",
        }
        for k in ("DATABASE_URL", "REDIS_HOST", "REDIS_URL", "LITELLM_MASTER_KEY",
                  "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            os.environ.pop(k, None)
        p = Proc("litellm", [str(venv / "bin" / "litellm"), "--config", str(d / "config.yaml"),
                             "--host", "127.0.0.1", "--port", str(self.port),
                             "--num_workers", "1", "--telemetry", "False"],
                 PEER_CORE, d / "out.log", env=env, cwd=d)
        self.procs.append(p)
        wait_http(self.port, "/health/liveliness", p, 180)


class Tiergate(Peer):
    def __init__(self, redis: bool):
        super().__init__()
        self.redis = redis
        self.name = "tiergate-redis" if redis else "tiergate"
        self.label = "tiergate (Redis)" if redis else "tiergate (memory)"
        self.redis_proc: Proc | None = None
        self.gw: Proc | None = None

    def start(self, ctx) -> None:
        d = ctx.work / self.name
        d.mkdir(exist_ok=True)
        self.port = free_port()
        admin = "bench-admin-token-" + "".join(random.choices(string.ascii_letters, k=16))
        args = [str(ctx.tiergate), "serve", "--listen", f"127.0.0.1:{self.port}",
                "--upstream", f"http://127.0.0.1:{ctx.up_port}",
                "--upstream-api-key", "bench-upstream-key", "--admin-token", admin,
                "--database", f"sqlite://{d}/tiergate.db"]
        if self.redis:
            rport = free_port()
            self.redis_proc = Proc("redis", ["redis-server", "--port", str(rport), "--bind",
                                             "127.0.0.1", "--save", "", "--appendonly", "no",
                                             "--dir", str(d)], PEER_CORE, d / "redis.log")
            self.procs.append(self.redis_proc)
            wait_port(rport, self.redis_proc, 10)
            args += ["--redis", f"redis://127.0.0.1:{rport}"]
        args += ["--workers", "1"]
        env = {"TIERGATE_LOG": "warn"}
        self.gw = Proc(self.name, args, PEER_CORE, d / "out.log", env=env)
        self.procs.append(self.gw)
        wait_http(self.port, "/healthz", self.gw, 60)
        self.setup(admin, ctx.workspaces)
        self.idle_rss_kb = status_kb(self.gw.pids(), "VmRSS")
        self.threads = sum(len(os.listdir(f"/proc/{p}/task")) for p in self.gw.pids())

    def setup(self, admin: str, n: int) -> None:
        """Tiers and workspaces through the admin API, as an operator would."""
        h = {"authorization": f"Bearer {admin}"}
        open_tier = {"requests_per_second": 1_000_000, "burst": 1_000_000,
                     "tokens_per_minute": 10_000_000_000, "tokens_per_month": 10**15,
                     "concurrent_requests": 100_000}
        deny_tier = {"requests_per_second": 0.001, "burst": 1,
                     "tokens_per_minute": 10_000_000_000, "tokens_per_month": 10**15,
                     "concurrent_requests": 100_000}
        for name, body in (("bench-open", open_tier), ("bench-deny", deny_tier)):
            st, out = http_call(self.port, "PUT", f"/admin/v1/tiers/{name}", body, h)
            if st not in (200, 201):
                raise RuntimeError(f"PUT tier {name}: {st} {out[:300]!r}")

        def workspace(name: str, tier: str) -> str:
            st, out = http_call(self.port, "POST", "/admin/v1/workspaces",
                                {"name": name, "tier": tier}, h)
            if st != 201:
                raise RuntimeError(f"create workspace: {st} {out[:300]!r}")
            wid = json.loads(out)["id"]
            st, out = http_call(self.port, "POST", f"/admin/v1/workspaces/{wid}/keys",
                                {"name": "bench"}, h)
            if st != 201:
                raise RuntimeError(f"create key: {st} {out[:300]!r}")
            return json.loads(out)["key"]

        self.allow_key = workspace("bench-allow", "bench-open")
        self.deny_key = workspace("bench-deny", "bench-deny")
        for i in range(max(0, n - 2)):
            workspace(f"bench-{i}", "bench-open")

    def gateway_pids(self) -> list[int]:
        return self.gw.pids() if self.gw else []

    def extra_pids(self) -> dict[str, list[int]]:
        return {"redis": self.redis_proc.pids()} if self.redis_proc else {}


# --------------------------------------------------------------------------------------------
# Load


def body(peer: Peer, stream: bool) -> str:
    b = {"model": peer.model(stream), "messages": [{"role": "user", "content": PROMPT}],
         "max_tokens": 64}
    if stream:
        b["stream"] = True
    return json.dumps(b, separators=(",", ":"))


def oha_argv(url: str, key: str, body_s: str, stream: bool, rate: float | None,
             conns: int, duration: float, out: Path) -> list[str]:
    argv = [os.environ.get("BENCH_OHA", "oha"), "--no-tui", "--output-format", "json",
            "-o", str(out), "--worker-threads", "1", "-m", "POST", "-T", "application/json",
            "-H", f"Authorization: Bearer {key}", "-d", body_s, "-c", str(conns),
            "-z", f"{duration}s", "--disable-compression"]
    if stream:
        argv += ["-H", "x-bench-stream: 1"]
    if rate is not None:
        argv += ["-q", str(rate), "--latency-correction"]
    else:
        # Closed loop: requests under way at the deadline finish and count (a slow peer would
        # otherwise show nothing at all); the rate is divided by the time it really took.
        argv += ["-w"]
    argv.append(url)
    return argv


def parse_oha(path: Path, duration: float) -> dict:
    r = json.loads(path.read_text())
    codes = {int(k): v for k, v in r.get("statusCodeDistribution", {}).items()}
    errs = dict(r.get("errorDistribution", {}))
    # Requests still under way at the deadline are cut off by oha: not the peer's errors.
    aborted = sum(v for k, v in errs.items() if "deadline" in k.lower())
    conn_errors = sum(v for k, v in errs.items() if "deadline" not in k.lower())
    pct = r.get("latencyPercentiles", {})

    def ms(key):
        v = pct.get(key)
        return None if v is None else round(v * 1000, 4)

    return {
        "codes": codes, "error_kinds": errs, "aborted_at_deadline": aborted,
        "conn_errors": conn_errors,
        "completed": sum(codes.values()),
        "p50_ms": ms("p50"), "p90_ms": ms("p90"), "p99_ms": ms("p99"), "p999_ms": ms("p99.9"),
        "max_ms": round(r["summary"]["slowest"] * 1000, 4) if r["summary"].get("slowest") else None,
        "mean_ms": round(r["summary"]["average"] * 1000, 4) if r["summary"].get("average") else None,
        "elapsed_s": r["summary"].get("total") or duration,
    }


class Rig:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.up_proc: Proc | None = None
        self.up_port = 0
        self.up_sse_port = 0
        self.peers: list[Peer] = []
        self.runs: list[dict] = []
        self.n = 0

    @property
    def workspaces(self) -> int:
        return self.args.workspaces

    def only(self, peer: Peer | None):
        rig = self

        class Ctx:
            def __enter__(self):
                if not rig.args.no_pause:
                    for p in rig.peers:
                        if p is not peer:
                            p.pause()
                    if peer is not None:
                        peer.resume()

            def __exit__(self, *a):
                if not rig.args.no_pause:
                    for p in rig.peers:
                        p.resume()
        return Ctx()

    def measure(self, peer: Peer, scenario: str, rate: float | None, duration: float,
                phase: str, round_no: int | None = None, perf: Path | None = None) -> dict:
        """One run: oha against the peer (two oha processes for reject50), with CPU figures."""
        stream = scenario == "stream"
        self.n += 1
        outdir = self.work / "oha"
        outdir.mkdir(exist_ok=True)
        conns = self.args.conns
        if scenario == "reject50":
            legs = [("admitted", peer.allow_key), ("denied", peer.deny_key)]
        elif scenario == "denied":
            legs = [("denied", peer.deny_key)]
        else:
            legs = [("admitted", peer.allow_key)]
        leg_rate = None if rate is None else rate / len(legs)
        leg_conns = max(1, conns // len(legs))
        gw_pids = peer.gateway_pids()
        extra = peer.extra_pids()
        up_pids = self.up_proc.pids() if self.up_proc else []
        g0 = cpu_seconds(gw_pids)
        e0 = {k: cpu_seconds(v) for k, v in extra.items()}
        u0 = cpu_seconds(up_pids)
        procs = []
        t0 = time.monotonic()
        for leg, key in legs:
            out = outdir / f"{self.n:04d}-{peer.name}-{scenario}-{leg}.json"
            argv = oha_argv(peer.url(), key, body(peer, stream), stream, leg_rate, leg_conns,
                            duration, out)
            argv = ["taskset", "-c", LOAD_CORE] + argv
            procs.append((leg, out, subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE)))
        perf_proc = None
        if perf is not None and gw_pids:
            perf_proc = subprocess.Popen(
                ["perf", "record", "-g", "-F", "999", "-o", str(perf), "-p",
                 ",".join(map(str, gw_pids)), "--", "sleep", str(max(1.0, duration - 1))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        loadgen_cpu = 0.0
        legs_out = {}
        for leg, out, p in procs:
            try:
                _, status, ru = os.wait4(p.pid, 0)
            except ChildProcessError:
                status, ru = 0, None
            p.returncode = os.waitstatus_to_exitcode(status)
            err = p.stderr.read().decode(errors="replace")
            p.stderr.close()
            if ru is not None:
                loadgen_cpu += ru.ru_utime + ru.ru_stime
            if p.returncode != 0 or not out.exists():
                raise RuntimeError(f"oha failed ({p.returncode}): {err[-2000:]}")
            legs_out[leg] = parse_oha(out, duration)
        wall = time.monotonic() - t0
        if perf_proc is not None:
            perf_proc.wait(60)
        g1 = cpu_seconds(gw_pids)
        e1 = {k: cpu_seconds(v) for k, v in extra.items()}
        u1 = cpu_seconds(up_pids)

        completed = sum(l["completed"] for l in legs_out.values())
        ok = sum(l["codes"].get(200, 0) for l in legs_out.values())
        denied = sum(l["codes"].get(429, 0) for l in legs_out.values())
        other = completed - ok - denied
        conn_err = sum(l["conn_errors"] for l in legs_out.values())
        if scenario == "reject50":
            # Expected: 200 on the admitted leg, 429 on the denied leg (a first one may pass).
            errors = (legs_out["admitted"]["completed"] - legs_out["admitted"]["codes"].get(200, 0)
                      + legs_out["denied"]["completed"] - legs_out["denied"]["codes"].get(429, 0)
                      - min(2, legs_out["denied"]["codes"].get(200, 0)) + conn_err)
        elif scenario == "denied":
            # Expected: 429 (a first one may pass).
            errors = (legs_out["denied"]["completed"] - legs_out["denied"]["codes"].get(429, 0)
                      - min(2, legs_out["denied"]["codes"].get(200, 0)) + conn_err)
        else:
            errors = other + denied + conn_err
        attempted = completed + conn_err
        main = legs_out.get("admitted") or legs_out["denied"]
        gw_cpu = g1 - g0
        rec = {
            "phase": phase, "round": round_no, "peer": peer.name, "scenario": scenario,
            "offered_rps": rate, "duration_s": duration, "connections": conns,
            "completed": completed, "ok": ok, "denied": denied, "errors": errors,
            "error_rate": round(errors / attempted, 5) if attempted else 1.0,
            "achieved_rps": round(completed / max(l["elapsed_s"] for l in legs_out.values()), 1),
            "p50_ms": main["p50_ms"], "p90_ms": main["p90_ms"], "p99_ms": main["p99_ms"],
            "p999_ms": main["p999_ms"], "max_ms": main["max_ms"], "mean_ms": main["mean_ms"],
            "legs": legs_out,
            "loadgen_cpu_s": round(loadgen_cpu, 3),
            "loadgen_core_pct": round(100 * loadgen_cpu / wall, 1),
            "upstream_cpu_s": round(u1 - u0, 3),
            "core0_pct": round(100 * (loadgen_cpu + u1 - u0) / wall, 1),
        }
        if peer.gateway:
            rec["gateway_cpu_s"] = round(gw_cpu, 3)
            rec["gateway_core_pct"] = round(100 * gw_cpu / wall, 1)
            rec["gateway_cpu_us_per_req"] = round(1e6 * gw_cpu / completed, 2) if completed else None
            rec["gateway_cpu_s_per_10k"] = round(1e4 * gw_cpu / completed, 4) if completed else None
            rec["gateway_hwm_mb"] = round(status_kb(gw_pids, "VmHWM") / 1024, 1)
            rec["gateway_rss_mb"] = round(status_kb(gw_pids, "VmRSS") / 1024, 1)
            for k in extra:
                rec[f"{k}_cpu_s"] = round(e1[k] - e0[k], 3)
                rec[f"{k}_cpu_us_per_req"] = (round(1e6 * (e1[k] - e0[k]) / completed, 2)
                                              if completed else None)
        self.runs.append(rec)
        shown = (f"{peer.name:15s} {scenario:8s} {phase:6s} "
                 f"{'closed' if rate is None else f'{rate:>7.0f}/s'} -> {rec['achieved_rps']:>8.0f}/s "
                 f"p50 {fmt(rec['p50_ms'])} p99 {fmt(rec['p99_ms'])} max {fmt(rec['max_ms'])} ms "
                 f"err {rec['error_rate']:.2%} loadgen {rec['loadgen_core_pct']}% core0 {rec['core0_pct']}%")
        if peer.gateway:
            shown += f" gw {rec['gateway_core_pct']}% {rec['gateway_cpu_us_per_req']} us/req"
        log(shown)
        return rec


def prime(peer: Peer, stream: bool, want: int = 5, timeout: float = 90.0) -> None:
    port = int(peer.url().split(":")[2].split("/")[0])
    h = {"authorization": f"Bearer {peer.allow_key}"}
    if stream:
        h["x-bench-stream"] = "1"
    deadline, ok, last = time.monotonic() + timeout, 0, None
    while ok < want and time.monotonic() < deadline:
        try:
            st, out = http_call(port, "POST", "/v1/chat/completions",
                                json.loads(body(peer, stream)), h, timeout=30)
            ok = ok + 1 if st == 200 else 0
            last = f"{st} {out[:200]!r}"
        except OSError as e:
            ok, last = 0, str(e)
            time.sleep(0.2)
    if ok < want:
        raise RuntimeError(f"{peer.name}: no {want} answers in a row within {timeout}s: {last}")


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def passes(rec: dict, max_p99: float, max_err: float) -> bool:
    return rec["error_rate"] < max_err and rec["p99_ms"] is not None and rec["p99_ms"] < max_p99


# --------------------------------------------------------------------------------------------
# Phases


def compare_upstreams(rig: Rig, tiergate: Path) -> dict:
    """nginx's fixed answer against `tiergate mock-upstream`, each alone on core 1, closed loop."""
    out = {}
    d = rig.work / "upstream-check"
    d.mkdir(exist_ok=True)
    port, sse = free_port(), free_port()
    candidates = []
    ng = start_upstream_on(rig.work / "upstream-check", port, sse)
    candidates.append(("nginx", ng, port))
    mport = free_port()
    mock = Proc("mock-upstream", [str(tiergate), "mock-upstream", "--listen",
                                  f"127.0.0.1:{mport}"], PEER_CORE, d / "mock.log",
                env={"TOKIO_WORKER_THREADS": "1", "TIERGATE_LOG": "warn"})
    wait_port(mport, mock, 20)
    candidates.append(("mock-upstream", mock, mport))
    try:
        for name, proc, p in candidates:
            peer = Direct(p)
            peer.name = f"upstream:{name}"
            rec = rig.measure(peer, "plain", None, rig.args.max_duration, "upcheck")
            c = cpu_seconds(proc.pids())
            out[name] = {"rps": rec["achieved_rps"], "p50_ms": rec["p50_ms"],
                         "p99_ms": rec["p99_ms"], "loadgen_core_pct": rec["loadgen_core_pct"],
                         "cpu_s_total": c}
    finally:
        ng.stop()
        mock.stop()
    return out


def start_upstream_on(d: Path, port: int, sse: int) -> Proc:
    d.mkdir(exist_ok=True, parents=True)
    return start_upstream(d, port, sse, PEER_CORE)


def machine_info() -> dict:
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception as e:
            return f"({e})"
    info = {
        "lscpu": run(["lscpu"]),
        "kernel": run(["uname", "-srvm"]),
        "nproc": os.cpu_count(),
        "mem_total": next((l for l in Path("/proc/meminfo").read_text().splitlines()
                           if l.startswith("MemTotal")), ""),
        "loadavg_start": Path("/proc/loadavg").read_text().strip(),
        "python": platform.python_version(),
        "nginx": run([nginx_bin(), "-v"]) or subprocess.run(
            [nginx_bin(), "-v"], capture_output=True, text=True).stderr.strip(),
        "oha": run([os.environ.get("BENCH_OHA", "oha"), "--version"]),
        "redis": run(["redis-server", "--version"]),
        "rustc": run(["rustc", "--version"]),
        "git": run(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "git_log": run(["git", "-C", str(REPO), "log", "-1", "--format=%H %s"]),
    }
    venv = Path(os.environ.get("BENCH_VENV", "/var/tmp/tiergate-bench/venv"))
    info["litellm"] = run([str(venv / "bin" / "python"), "-c",
                           "import importlib.metadata as m; print(m.version('litellm'))"])
    return info


def build_tiergate(args) -> Path:
    if args.tiergate:
        return Path(args.tiergate)
    env = dict(os.environ)
    target = Path(env.get("CARGO_TARGET_DIR", REPO / "target"))
    log(f"cargo build --release --locked (CARGO_TARGET_DIR={target})")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "tiergate"],
                   cwd=REPO, env=env, check=True)
    return target / "release" / "tiergate"


def perf_summary(data: Path, out: Path, top: int) -> str:
    r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                        "--sort", "dso,symbol", "--percent-limit", "0.5", "-g", "none"],
                       capture_output=True, text=True, timeout=300)
    def clean(l: str) -> str:
        # perf pads every line to the terminal's width and adds empty columns: drop them.
        return re.sub(r"(\s+-)+\s*$", "", l).rstrip()
    lines = [clean(l) for l in r.stdout.splitlines() if l.strip() and not l.startswith("#")]
    text = "\n".join(lines[:top])
    r2 = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                         "--sort", "dso", "-g", "none"], capture_output=True, text=True,
                        timeout=300)
    dso = [clean(l) for l in r2.stdout.splitlines() if l.strip() and not l.startswith("#")][:15]
    out.write_text("# by shared object\n" + "\n".join(dso) + "\n\n# top symbols\n" + text + "\n")
    return out.read_text()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: few rates, short runs, one round (< 2 minutes)")
    ap.add_argument("--peers", default="direct,nginx,litellm,tiergate,tiergate-redis",
                    help="comma-separated peers to run")
    ap.add_argument("--scenarios", default="plain,stream,reject50,denied")
    ap.add_argument("--rates", default="500,1000,2000,5000,10000,15000,20000,25000,30000,"
                    "40000,50000,60000,80000",
                    help="open-loop offered rates (req/s), ascending; each peer stops at its "
                         "first failing rate")
    ap.add_argument("--always-upto", type=float, default=5000,
                    help="rates up to this one are run whatever happened at lower rates (the "
                         "issue's fixed rates, and the latency target at 2k req/s); above it, "
                         "a peer stops at its first failing rate")
    ap.add_argument("--low-rates", default="10,25,50,100,200,300",
                    help="extra rates below the list, run only for peers whose max "
                         "throughput is under 1000 req/s")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per open-loop run")
    ap.add_argument("--max-duration", type=float, default=8.0,
                    help="seconds per max-throughput run")
    ap.add_argument("--rounds", type=int, default=3, help="max-throughput rounds")
    ap.add_argument("--conns", type=int, default=64, help="connections per run")
    ap.add_argument("--workspaces", type=int, default=1000,
                    help="workspaces (each with a key) created in each tiergate")
    ap.add_argument("--max-p99-ms", type=float, default=50.0)
    ap.add_argument("--max-error-rate", type=float, default=0.01)
    ap.add_argument("--perf", action="store_true",
                    help="record `perf record -g` on tiergate (memory) during a max-throughput "
                         "run and write a top-N summary")
    ap.add_argument("--perf-top", type=int, default=40)
    ap.add_argument("--no-upstream-check", action="store_true",
                    help="skip the nginx vs mock-upstream comparison")
    ap.add_argument("--no-pause", action="store_true",
                    help="do not SIGSTOP the peers not being measured")
    ap.add_argument("--tiergate", help="use this tiergate binary instead of building one")
    ap.add_argument("--out", help="output directory (default bench/results, or bench/smoke "
                                  "with --quick)")
    ap.add_argument("--benchmarks-md", help="where to write BENCHMARKS.md (default: the "
                                            "repository's, or OUT/BENCHMARKS.md with --quick)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()

    if args.quick:
        args.rates = "1000,2000"
        args.low_rates = "10"
        args.always_upto = 2000
        args.conns = min(args.conns, 16)  # a slow peer's closed-loop runs drain sooner
        args.duration = min(args.duration, 2.0)
        args.max_duration = min(args.max_duration, 2.0)
        args.rounds = 1
        args.workspaces = min(args.workspaces, 50)
        args.no_upstream_check = True
    out = Path(args.out) if args.out else BENCH / ("smoke" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    bench_md = Path(args.benchmarks_md) if args.benchmarks_md else (
        out / "BENCHMARKS.md" if args.quick else REPO / "BENCHMARKS.md")

    if os.cpu_count() is None or os.cpu_count() < 2:
        log("this harness needs 2 cores (load on core 0, the peer on core 1)")
        return 2
    started = time.time()
    tiergate = build_tiergate(args)
    work = Path(tempfile.mkdtemp(prefix="tiergate-bench-", dir=os.environ.get("TMPDIR", "/tmp")))
    log(f"scratch directory {work}")

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    rig = Rig(args, work)
    rig.tiergate = tiergate
    results: dict = {
        "schema": 1, "quick": args.quick,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "options": vars(args), "machine": machine_info(),
        "placement": {"load_generator_and_upstream": f"core {LOAD_CORE}",
                      "peer": f"core {PEER_CORE}",
                      "redis": f"core {PEER_CORE} (with the gateway)"},
    }
    try:
        if not args.no_upstream_check:
            log("upstream: nginx vs tiergate mock-upstream, each alone on core 1")
            results["upstream_check"] = compare_upstreams(rig, tiergate)
        rig.up_port, rig.up_sse_port = free_port(), free_port()
        rig.up_proc = start_upstream(work, rig.up_port, rig.up_sse_port, LOAD_CORE)

        wanted = [p.strip() for p in args.peers.split(",") if p.strip()]
        makers = {"direct": lambda: Direct(rig.up_port), "nginx": NginxLimitReq,
                  "litellm": LiteLLM, "tiergate": lambda: Tiergate(False),
                  "tiergate-redis": lambda: Tiergate(True)}
        for w in wanted:
            if w not in makers:
                raise SystemExit(f"unknown peer {w}; known: {', '.join(makers)}")
        peer_info = {}
        for w in wanted:
            peer = makers[w]()
            log(f"starting {peer.label}")
            t = time.monotonic()
            with rig.only(None):
                peer.start(rig)
            rig.peers.append(peer)
            peer.pause() if not args.no_pause else None
            info = {"label": peer.label, "start_s": round(time.monotonic() - t, 1)}
            if isinstance(peer, Tiergate):
                info["idle_rss_mb"] = round(peer.idle_rss_kb / 1024, 1)
                info["threads"] = peer.threads
            if peer.gateway:
                info["idle_hwm_mb"] = round(status_kb(peer.gateway_pids(), "VmHWM") / 1024, 1)
            peer_info[peer.name] = info
        results["peers"] = peer_info
        scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]

        # Warm-up: requests one by one until a few succeed in a row (LiteLLM imports parts of
        # its upstream client on first use, which takes seconds), then a short run per peer,
        # so first connections and lazy paths are not measured.
        for peer in rig.peers:
            with rig.only(peer):
                for stream in (False, True):
                    prime(peer, stream)
                for sc in [s for s in scenarios if s not in ("reject50", "denied")] or ["plain"]:
                    rig.measure(peer, sc, 200, 0.5 if args.quick else 1.0, "warmup")

        # Max throughput: interleaved rounds, the order rotating.
        max_scen = [s for s in scenarios if s in ("plain", "stream")]
        for r in range(args.rounds):
            order = rig.peers[r % len(rig.peers):] + rig.peers[:r % len(rig.peers)]
            for peer in order:
                with rig.only(peer):
                    for sc in max_scen:
                        rig.measure(peer, sc, None, args.max_duration, "max", r + 1)

        if args.perf and any(p.name == "tiergate" for p in rig.peers):
            peer = next(p for p in rig.peers if p.name == "tiergate")
            data = work / "perf.data"
            with rig.only(peer):
                rig.measure(peer, "plain", None, args.max_duration, "perf", perf=data)
            results["perf"] = perf_summary(data, out / "perf-tiergate.txt", args.perf_top)

        maxtp = {}
        for peer in rig.peers:
            for sc in max_scen:
                v = [x["achieved_rps"] for x in rig.runs
                     if x["phase"] == "max" and x["peer"] == peer.name and x["scenario"] == sc]
                if v:
                    maxtp[(peer.name, sc)] = statistics.median(v)

        # Open loop: ascending rates until one fails.
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
        low = [float(x) for x in args.low_rates.split(",") if x.strip()]
        for peer in rig.peers:
            with rig.only(peer):
                for sc in scenarios:
                    if sc in ("reject50", "denied") and not peer.gateway:
                        continue  # nothing to reject without a gateway
                    # Denials are compared with admissions at the same rate: only where plain
                    # passed (scenarios run in order, plain first).
                    plain_ok = {x["offered_rps"] for x in rig.runs
                                if x["phase"] == "open" and x["peer"] == peer.name
                                and x["scenario"] == "plain"
                                and passes(x, args.max_p99_ms, args.max_error_rate)}
                    mt = maxtp.get((peer.name, "stream" if sc == "stream" else "plain"))
                    # Below the fixed rates (slow peers only), stop at the first failure.
                    for rate in (low if mt is not None and mt < 1000 else []):
                        if sc == "denied" and "plain" in scenarios and rate not in plain_ok:
                            break
                        rec = rig.measure(peer, sc, rate, args.duration, "open")
                        if not passes(rec, args.max_p99_ms, args.max_error_rate):
                            break
                    for rate in rates:
                        if sc == "denied" and "plain" in scenarios and rate not in plain_ok:
                            break
                        rec = rig.measure(peer, sc, rate, args.duration, "open")
                        if (not passes(rec, args.max_p99_ms, args.max_error_rate)
                                and rate >= args.always_upto):
                            break
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); writing what was measured")
        results["interrupted"] = True
    except Exception:
        traceback.print_exc()
        results["failed"] = traceback.format_exc()
    finally:
        for peer in rig.peers:
            try:
                peer.stop()
            except Exception as e:
                log(f"stopping {peer.name}: {e}")
        Proc.stop_all()
        results["runs"] = rig.runs
        results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        results["elapsed_s"] = round(time.time() - started, 1)
        results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().strip()
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {out / 'results.json'} ({len(rig.runs)} runs, {results['elapsed_s']} s)")
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")

    import report
    report.generate(out / "results.json", out, bench_md)
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
