#!/usr/bin/env python3
"""The CRI scenarios of bench/cri.sh: berth's CRI and containerd 1.6's CRI plugin side by side,
through the same client (cri/examples/cri_bench.rs), interleaved in rounds.

    cri_measure.py --config sides.json --md summary.md --tsv summary.tsv --raw DIR

sides.json: {"client": path, "image": ref, "runs": 30, "rounds": 3, "pods": 20, "facts": {...},
             "sides": {"berth": {"socket": …, "roots": [pid…], "shim_match": [...]},
                       "containerd": {…}}}

Latency: medians of each stage over `runs` runs per side. Memory per pod: the growth of the RSS
and PSS of the side's processes (daemons, shims, pause or holder processes; not the containers'
own `sleep`) with `pods` pods of one container each running, divided by `pods`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cmdline, log, proc_rss_pss_kb, settle  # noqa: E402

SIDES = ("berth", "containerd")
WORKLOAD = {"sleep"}  # the containers' own processes: not the runtime's cost


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def side_processes(side):
    """Every process of a side: its daemons' and shims' trees, less the containers' workload."""
    kids = children_map()
    roots = list(side["roots"])
    for name in os.listdir("/proc"):
        if name.isdigit() and all(m in cmdline(name) for m in side["shim_match"]):
            roots.append(int(name))
    seen, stack = set(), roots
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(kids.get(pid, []))
    return [p for p in seen if comm(p) not in WORKLOAD]


def memory(side):
    procs = side_processes(side)
    vals = [v for v in (proc_rss_pss_kb(p) for p in procs) if v]
    return {
        "processes": len(vals),
        "pause": sum(1 for p in procs if comm(p) == "pause"),
        "rss_kb": sum(v[0] for v in vals),
        "pss_kb": sum(v[1] for v in vals),
    }


def client(cfg, side, scenario, runs, warmup, tag):
    cmd = [cfg["client"], "--socket", cfg["sides"][side]["socket"], "--image", cfg["image"],
           "--scenario", scenario, "--runs", str(runs), "--warmup", str(warmup), "--tag", tag,
           "--log-dir", cfg["log_dir"]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{side} {scenario}: {out.stderr.strip()[-500:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def latency(cfg, scenario, raw):
    runs, rounds = cfg["runs"], cfg["rounds"]
    per_round = max(1, runs // rounds)
    got = {s: [] for s in SIDES}
    errors = {}
    for r in range(rounds):
        order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
        for s in order:
            if s in errors:
                continue
            settle()
            try:
                got[s] += client(cfg, s, scenario, per_round, 2 if r == 0 else 0, f"{scenario}{r}")
            except Exception as e:  # one side's failure leaves the other's numbers
                errors[s] = str(e)
                log(f"{s}: {e}")
    with open(os.path.join(raw, f"{scenario}.json"), "w") as f:
        json.dump({"runs": got, "errors": errors}, f, indent=1)
    stages = sorted({k for runs in got.values() for run in runs for k in run})
    return {k: {s: statistics.median(r[k] for r in got[s]) if got[s] else None for s in SIDES}
            for k in stages}, errors


def pod_memory(cfg, side):
    settle()
    time.sleep(3)
    base = memory(cfg["sides"][side])
    n = cfg["pods"]
    cmd = [cfg["client"], "--socket", cfg["sides"][side]["socket"], "--image", cfg["image"],
           "--scenario", "hold", "--runs", str(n), "--tag", f"mem{side}", "--log-dir", cfg["log_dir"]]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"{side}: {n} pods did not start")
        settle()
        time.sleep(3)
        full = memory(cfg["sides"][side])
    finally:
        p.stdin.close()
        p.wait(timeout=600)
    return {
        "base": base, "full": full,
        "rss_mb": (full["rss_kb"] - base["rss_kb"]) / n / 1024,
        "pss_mb": (full["pss_kb"] - base["pss_kb"]) / n / 1024,
        "pause": full["pause"] - base["pause"],
        "processes": (full["processes"] - base["processes"]) / n,
    }


def fmt(v, unit):
    if v is None:
        return "n/a"
    return f"{v:.1f} {unit}" if unit != "" else f"{v:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--tsv", required=True)
    ap.add_argument("--raw", required=True)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    os.makedirs(a.raw, exist_ok=True)
    rows, errors = [], {}
    labels = {
        ("pod", "total"): "pod sandbox: run + stop + remove",
        ("pod", "run_pod"): "pod sandbox: RunPodSandbox",
        ("pod", "stop_remove_pod"): "pod sandbox: StopPodSandbox + RemovePodSandbox",
        ("pod", "stop_pod"): "pod sandbox: StopPodSandbox",
        ("pod", "remove_pod"): "pod sandbox: RemovePodSandbox",
        ("pod_container", "total"): "pod + one container: run pod, create, start, stop, remove, remove pod",
        ("pod_container", "container"): "one container in a pod: create + start + stop + remove",
        ("pod_container", "container_create_start"): "one container in a pod: create + start",
        ("pod_container", "container_stop_remove"): "one container in a pod: stop (SIGKILL) + remove",
        ("pod_container", "create"): "one container in a pod: CreateContainer",
        ("pod_container", "start"): "one container in a pod: StartContainer",
        ("pod_container", "stop"): "one container in a pod: StopContainer (timeout 0)",
        ("pod_container", "remove"): "one container in a pod: RemoveContainer",
    }
    for scenario in ("pod", "pod_container"):
        log(f"latency: {scenario}, {cfg['runs']} runs per side in {cfg['rounds']} rounds")
        med, err = latency(cfg, scenario, a.raw)
        errors.update({f"{scenario} {s}": e for s, e in err.items()})
        for (sc, stage), label in labels.items():
            if sc == scenario and stage in med:
                target = "≤ 0.3 × containerd" if stage in ("total", "container") else ""
                rows.append((label, "ms", med[stage], target))
    mem = {}
    for s in SIDES:
        log(f"memory: {cfg['pods']} pods with one container on {s}")
        try:
            mem[s] = pod_memory(cfg, s)
        except Exception as e:
            errors[f"memory {s}"] = str(e)
            log(f"memory on {s}: {e}")
    with open(os.path.join(a.raw, "memory.json"), "w") as f:
        json.dump(mem, f, indent=1)
    pick = lambda k: {s: mem[s][k] for s in mem}  # noqa: E731
    rows.append((f"memory per pod (one container), RSS growth / {cfg['pods']}", "MB", pick("rss_mb"), ""))
    rows.append((f"memory per pod (one container), PSS growth / {cfg['pods']}", "MB", pick("pss_mb"), ""))
    rows.append((f"pause processes for {cfg['pods']} pods", "", pick("pause"), "none"))
    rows.append(("runtime processes per pod (daemon growth, shims, pause/holders)", "", pick("processes"), ""))

    with open(a.tsv, "w") as f:
        f.write("metric\tunit\tberth\tcontainerd\tratio\n")
        for label, unit, vals, _ in rows:
            b, c = vals.get("berth"), vals.get("containerd")
            r = b / c if b is not None and c else None
            f.write(f"{label}\t{unit}\t{b}\t{c}\t{r}\n")
    with open(a.md, "w") as f:
        f.write("# berth CRI vs containerd 1.6 CRI\n\n")
        for k, v in cfg.get("facts", {}).items():
            f.write(f"- {k}: {v}\n")
        f.write(f"- runs: {cfg['runs']} per side and scenario, in {cfg['rounds']} interleaved rounds, "
                f"after 2 warm-up runs; medians. Client: cri/examples/cri_bench.rs (in-process gRPC)\n\n")
        f.write("| scenario | berth | containerd | berth / containerd | target |\n|---|---|---|---|---|\n")
        for label, unit, vals, target in rows:
            b, c = vals.get("berth"), vals.get("containerd")
            r = f"{b / c:.2f}" if b is not None and c else "n/a"
            show = (lambda v: "n/a" if v is None else f"{v:g}") if unit == "" else (lambda v: fmt(v, unit))
            f.write(f"| {label} | {show(b)} | {show(c)} | {r} | {target} |\n")
        if errors:
            f.write("\nErrors:\n\n")
            for k, e in errors.items():
                f.write(f"- {k}: {e}\n")
    print(open(a.md).read())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
