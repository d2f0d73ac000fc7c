from lib import *
import os, signal, subprocess
G5 = "http://127.0.0.1:47225"
ws, kid, k = setup("pgdown", tokens_per_month=100000, requests_per_second=100)
time.sleep(2.0)
H = {"Authorization": f"Bearer {k}"}
r = httpx.post(G5 + "/v1/chat/completions", headers={**H, "x-mock-usage": "8,50"}, json=body()); print("before cut:", r.status_code)
os.kill(int(open("pgproxy.pid").read()), signal.SIGKILL); time.sleep(1.0)
st = []
for i in range(30):
    r = httpx.post(G5 + "/v1/chat/completions", headers={**H, "x-mock-usage": "8,50"}, json=body(), timeout=10); st.append(r.status_code)
print("during cut: statuses", {s: st.count(s) for s in set(st)})
r = httpx.get(G5 + f"/admin/v1/workspaces/{ws}", headers=ADMIN, timeout=10); print("admin during cut:", r.status_code, r.text[:160])
r = httpx.get(G5 + "/v1/limits", headers=H, timeout=10); print("/v1/limits during cut:", r.status_code, r.text[:100] if r.status_code != 200 else r.json()["usage"]["tokens_this_month"])
m = httpx.get(G5 + "/metrics").text
print(" ", [l for l in m.splitlines() if l.startswith(("tiergate_ledger_pending", "tiergate_ledger_last_write_age", "tiergate_ledger_write_errors", "tiergate_catalog_staleness"))])
time.sleep(3)
p = subprocess.Popen(["./venv/bin/python", "pgproxy.py"]); open("pgproxy.pid", "w").write(str(p.pid))
time.sleep(4)
m = httpx.get(G5 + "/metrics").text
print(" after restore", [l for l in m.splitlines() if l.startswith(("tiergate_ledger_pending", "tiergate_ledger_last_write_age", "tiergate_ledger_write_errors", "tiergate_catalog_staleness"))])
s, u = admin("GET", f"/admin/v1/workspaces/{ws}/usage"); print(" admin usage via gw0:", u["requests_this_month"], sum(d["tokens"] for d in u["daily"]), "expected", 1 + st.count(200), (1 + st.count(200)) * 58)
r = httpx.get(G5 + f"/admin/v1/workspaces/{ws}", headers=ADMIN, timeout=10); print(" admin on gw5 after:", r.status_code)
