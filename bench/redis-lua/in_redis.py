#!/usr/bin/env python3
"""Times the Redis limiter's function in a real Redis: the server's own microseconds per call.

Starts a private redis-server on a free loopback port (pinned to a core with taskset when one is
given), loads src/limiter/redis.lua as the gateway does (a function library), and sends rounds of
one reserve (every limit set, one model, the server's clock) and its settle, the same calls as
mock.lua, in the steady state where each call also reaps about one expired tombstone. It prints the server's time per call from INFO commandstats, which counts only the
command's execution: not the network, not the client.

    python3 bench/redis-lua/in_redis.py [rounds] [--core N] [--source FILE]

--source times another version of redis.lua (for example one from `git show REV:...`), so two
versions can be compared in alternating runs; this machine's speed drifts.
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "..", "..", "src", "limiter", "redis.lua")


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self.buf += self.s.recv(65536)
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError("unexpected reply %r" % line)

    def call(self, *args):
        self.s.sendall(resp(*args))
        return self.read()

    def pipeline(self, commands):
        self.s.sendall(b"".join(resp(*c) for c in commands))
        return [self.read() for _ in commands]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


M = "5311023b2dd66fb0"
KEYS = ["{b:1}", "{b:1}:r", "{b:1}:e"]
# The key's idle life, the records' life and the tombstones' life, in ms (see redis.lua). The
# gateway keeps tombstones 10 s; here they last 20 ms, so that calls reap about as many expired
# tombstones as they leave, as in a steady state, within a short run.
COMMON = ["600000", "31000", "20"]


def reserve(name, i):
    return ["FCALL", name, 3, *KEYS, "reserve", "0", *COMMON, "id%d" % i, "30000", "cand%d" % i,
            "1000000000", "1000000000000000", "10000000000", "1000000000000000", "100000", M,
            "0", "0", "9", "33", "0", "", "0", "0", "0", "0"]


def settle(name, i):
    return ["FCALL", name, 3, *KEYS, "settle", "0", *COMMON, "id%d" % i, "cand%d" % i, "106",
            "10000000000", M, "0", "", "0"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("rounds", nargs="?", type=int, default=20000)
    p.add_argument("--core", type=int, default=None)
    p.add_argument("--source", default=SOURCE)
    a = p.parse_args()
    code = open(a.source).read()
    name = "tiergate_bench"
    library = ("#!lua name=%s\n%s\nredis.register_function('%s', "
               "function(keys, args) return run(keys, args) end)\n" % (name, code, name))

    port = free_port()
    server = shutil.which("redis-server")
    cmd = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    if a.core is not None:
        cmd = ["taskset", "-c", str(a.core)] + cmd
    workdir = tempfile.mkdtemp(prefix="tiergate-redis-lua-")
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                c = Conn(port)
                c.call("PING")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("redis-server did not start")
        c.call("FUNCTION", "LOAD", "REPLACE", library)
        r = c.call(*reserve(name, 0))
        if r[0] == 2:
            c.call("FCALL", name, 3, *KEYS, "base", "0", *COMMON, r[2], "60000", "0", "0", M,
                   "0", "0")
            r = c.call(*reserve(name, 0))
        assert r[0] == 1, "not admitted: %r" % (r,)
        c.call("CONFIG", "RESETSTAT")
        batch = 100
        done = 0
        while done < a.rounds:
            n = min(batch, a.rounds - done)
            cmds = []
            for i in range(done + 1, done + n + 1):
                cmds.append(reserve(name, i))
                cmds.append(settle(name, i))
            for k, reply in enumerate(c.pipeline(cmds)):
                if k % 2 == 0:
                    assert reply[0] == 1, "not admitted: %r" % (reply,)
            done += n
        stats = c.call("INFO", "commandstats")
        for line in stats.splitlines():
            if line.startswith("cmdstat_fcall:"):
                fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
                print("%.2f µs per call in Redis (%s calls)"
                      % (float(fields["usec_per_call"]), fields["calls"]))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
