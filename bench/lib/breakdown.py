#!/usr/bin/env python3
"""Stage breakdown of `docker run --rm busybox true` through berth.

The traced stack (bench/run.sh, BREAKDOWN=1) exports OTLP spans from every daemon (gateway HTTP
requests, gRPC server spans of engine, images, snapshotter, network) to otlp_collector.py, and
runs runc and berth-shim through `timewrap`, which logs each invocation's start and end. All
times are CLOCK_REALTIME, so the spans, the exec log and the CLI's own start and exit line up.

    breakdown.py run --docker docker --host unix://S --runs 20 --out runs.json
    breakdown.py analyze --runs runs.json --spans spans.jsonl --exec exec.log \
        --out breakdown.json --md breakdown.md
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

# Markers, in the order they happen in one `docker run --rm`. Each is (key, label of the stage
# that ENDS at this marker).
MARKERS = [
    ("cli_exec", None),
    ("http_first", "CLI start-up until its first request (HEAD /_ping)"),
    ("create_begin", "_ping answered, CLI sends create"),
    ("create_end", "POST /containers/create (engine Create: image Resolve, snapshot Prepare, record, AddUser)"),
    ("start_begin", "POST attach + POST wait (CLI sets up streams before start)"),
    ("attach_begin", "start: gateway → engine, snapshot Mounts, user lookup (/etc/passwd via layers), netns create"),
    ("attach_end", "network Attach (veth pair, move to netns, IP, routes, DNS record)"),
    ("shim_begin", "hosts/resolv.conf/hostname files, OCI spec generation, config.json"),
    ("shim_end", "shim spawn (`berth-shim serve` until it answers its first call)"),
    ("runc_create_begin", "shim Create RPC: connect, rootfs mount, stdio/log setup"),
    ("runc_create_end", "runtime create (runc create, or libcontainer's in the shim) — or `runc run`: create and start in one call, `true` runs"),
    ("runc_start_begin", "between create and start (attach hand-off, Start RPC; none with `runc run`)"),
    ("runc_start_end", "runtime start (`true` runs and exits; none with `runc run`)"),
    ("start_end", "start answered: attach hand-off (with `runc run`), record persisted, `start` event"),
    ("runc_delete_begin", "exit notification → engine exit handling (die event, persist) → shim Delete"),
    ("runc_delete_end", "runtime delete (netns removal and network Detach run alongside; Detach below)"),
    ("remove_begin", "rootfs unmount, shim Shutdown, bundle removal; snapshot Remove begins"),
    ("remove_end", "snapshot Remove"),
    ("cli_exit", "images RemoveUser, record delete, `destroy`, /wait answered, CLI exits"),
]


def cmd_run(args):
    runs = []
    for i in range(args.warmup + args.runs):
        t0 = time.time_ns()
        p = subprocess.run([args.docker, "-H", args.host, "run", "--rm", "busybox", "true"],
                           capture_output=True, text=True)
        t1 = time.time_ns()
        if p.returncode != 0:
            print(f"breakdown run {i}: docker run failed: {p.stderr.strip()}", file=sys.stderr)
            continue
        if i >= args.warmup:
            runs.append({"t0": t0, "t1": t1})
        # Let the batch exporters and the previous teardown settle: runs do not overlap.
        time.sleep(args.gap)
    with open(args.out, "w") as f:
        json.dump(runs, f)
    return 0 if runs else 1


def cmd_profile_run(args):
    """Times `--cmd` (a shell command line; {host} is replaced) --runs times after --setup,
    recording each run's window, for `profile`."""
    host = args.host
    fill = lambda c: c.replace("{docker}", args.docker).replace("{host}", host)
    runs = []
    for i in range(args.warmup + args.runs):
        if args.setup:
            subprocess.run(fill(args.setup), shell=True, capture_output=True)
        t0 = time.time_ns()
        p = subprocess.run(fill(args.cmd), shell=True, capture_output=True, text=True)
        t1 = time.time_ns()
        if args.teardown:
            subprocess.run(fill(args.teardown), shell=True, capture_output=True)
        if p.returncode != 0:
            print(f"profile run {i}: failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        if i >= args.warmup:
            runs.append({"t0": t0, "t1": t1})
        time.sleep(args.gap)
    with open(args.out, "w") as f:
        json.dump(runs, f)
    return 0 if runs else 1


def normalize(name):
    """Span names with container and exec ids replaced, so runs aggregate."""
    import re
    name = re.sub(r"/(containers|exec)/(?!json$|create$)[^/ ]+", r"/\1/{id}", name)
    return re.sub(r"/[0-9a-f]{12,64}(?=/|$)", "/{id}", name)


def cmd_profile_analyze(args):
    """Per span/exec name: how many per run, median duration, median start offset, and the
    summed time per run, over the windows of `profile-run`."""
    runs = json.load(open(args.runs))
    spans = load_spans(args.spans)
    execs = load_exec(args.exec)
    stats = {}
    totals = []
    for run in runs:
        t0, t1 = run["t0"], run["t1"]
        totals.append((t1 - t0) / 1e6)
        items = [(s["service"], normalize(s["name"]), s["start"], s["end"]) for s in spans
                 if t0 <= s["start"] <= t1 and not s["name"].startswith("grpc.health")]
        items += [("exec", e["name"], e["start"], e["end"]) for e in execs if t0 <= e["start"] <= t1]
        per = {}
        for svc, name, st, en in items:
            per.setdefault((svc, name), []).append(((en - st) / 1e6, (st - t0) / 1e6))
        for k, v in per.items():
            d = stats.setdefault(k, {"count": [], "dur": [], "sum": [], "first": []})
            d["count"].append(len(v))
            d["dur"] += [x[0] for x in v]
            d["sum"].append(sum(x[0] for x in v))
            d["first"].append(min(x[1] for x in v))
    med = statistics.median
    lines = [f"`{args.label}`: {len(runs)} traced runs, median wall {med(totals):.1f} ms.", "",
             "| process | span or exec | per run | median ms each | summed ms per run | first starts at ms |",
             "|---|---|---:|---:|---:|---:|"]
    for (svc, name), d in sorted(stats.items(), key=lambda kv: med(kv[1]["first"])):
        lines.append(f"| {svc} | {name[:70]} | {med(d['count']):g} | {med(d['dur']):.1f} | "
                     f"{med(d['sum']):.1f} | {med(d['first']):.1f} |")
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def load_spans(path):
    spans = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                spans.append(json.loads(line))
    return spans


def load_exec(path):
    out = []
    try:
        f = open(path)
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            parts = line.split()
            if len(parts) < 4:
                continue
            name, start, end = parts[0], int(parts[1]), int(parts[2])
            argv = parts[4:]
            op = name
            if name == "runc":
                for a in argv:
                    if a in ("create", "start", "delete", "kill", "state", "exec", "run", "update",
                             "events", "pause", "resume", "ps"):
                        op = "runc " + a
                        break
            elif name == "berth-shim" and argv:
                op = "berth-shim " + argv[0]
            out.append({"name": op, "start": start, "end": end})
    return out


def first(items, pred):
    for it in items:
        if pred(it):
            return it
    return None


def markers_for(run, spans, execs):
    t0, t1 = run["t0"], run["t1"]
    sp = sorted([s for s in spans if t0 <= s["start"] <= t1], key=lambda s: s["start"])
    ex = sorted([e for e in execs if t0 <= e["start"] <= t1], key=lambda e: e["start"])
    http = [s for s in sp if s["service"] == "berth-gateway" and s["name"][:1].isupper()
            and " /" in s["name"]]
    m = {"cli_exec": t0, "cli_exit": t1}
    if http:
        m["http_first"] = http[0]["start"]
    create = first(http, lambda s: s["name"].startswith("POST") and s["name"].endswith("/containers/create"))
    if create:
        m["create_begin"], m["create_end"] = create["start"], create["end"]
    start = first(http, lambda s: s["name"].startswith("POST") and s["name"].endswith("/start"))
    if start:
        m["start_begin"], m["start_end"] = start["start"], start["end"]
    attach = first(sp, lambda s: s["name"].endswith("Networks/Attach"))
    if attach:
        m["attach_begin"], m["attach_end"] = attach["start"], attach["end"]
    remove = first(sp, lambda s: s["name"].endswith("Snapshots/Remove"))
    if remove:
        m["remove_begin"], m["remove_end"] = remove["start"], remove["end"]
    # The engine spawns `berth-shim serve`, which runs as long as the container: its spawn ends
    # when the shim answers its first call.
    serve = first(ex, lambda e: e["name"] == "berth-shim serve")
    shim_rpc = first(sp, lambda s: s["service"] == "berth-shim")
    if serve and shim_rpc:
        m["shim_begin"], m["shim_end"] = serve["start"], shim_rpc["start"]
    for key, name in [("shim", "berth-shim start"), ("runc_create", "runc create"),
                      ("runc_start", "runc start"), ("runc_delete", "runc delete")]:
        e = first(ex, lambda e, n=name: e["name"] == n)
        if e:
            m[key + "_begin"], m[key + "_end"] = e["start"], e["end"]
    # The in-process runtime runs no binary: its calls are the shim's spans.
    for key, name in [("runc_create", "libcontainer create"), ("runc_start", "libcontainer start"),
                      ("runc_delete", "libcontainer delete")]:
        s = first(sp, lambda s, n=name: s["service"] == "berth-shim" and s["name"] == n)
        if s and key + "_begin" not in m:
            m[key + "_begin"], m[key + "_end"] = s["start"], s["end"]
    # One `runc run` (create and start in one call) stands for both; the start stages are empty.
    run = first(ex, lambda e: e["name"] == "runc run")
    if run and "runc_create_begin" not in m:
        m["runc_create_begin"], m["runc_create_end"] = run["start"], run["end"]
        m["runc_start_begin"] = m["runc_start_end"] = run["end"]
    # Details inside the stages.
    detail = {}
    for label, suffix in [("images Resolve", "Images/Resolve"), ("snapshot Prepare", "Snapshots/Prepare"),
                          ("images AddUser", "Images/AddUser"), ("snapshot Mounts", "Snapshots/Mounts"),
                          ("engine Containers/Create", "Containers/Create"),
                          ("engine Tasks/Start", "Tasks/Start"),
                          ("images RemoveUser", "Images/RemoveUser"),
                          ("network Detach (alongside runc delete)", "Networks/Detach")]:
        s = first(sp, lambda s, x=suffix: s["name"].endswith(x))
        if s:
            detail[label] = (s["end"] - s["start"]) / 1e6
    publishes = [s for s in sp if s["name"].endswith("Events/Publish")]
    detail["events published (count)"] = len(publishes)
    return m, detail, sp, ex


def fmt_ms(v):
    return "—" if v is None else f"{v:.1f}"


def cmd_analyze(args):
    runs = json.load(open(args.runs))
    spans = load_spans(args.spans)
    execs = load_exec(args.exec)
    per_stage = {k: [] for k, _ in MARKERS[1:]}
    per_marker = {k: [] for k, _ in MARKERS}
    details = {}
    totals = []
    example = None
    complete = 0
    for run in runs:
        m, detail, sp, ex = markers_for(run, spans, execs)
        totals.append((run["t1"] - run["t0"]) / 1e6)
        for k, v in m.items():
            per_marker[k].append((v - run["t0"]) / 1e6)
        keys = [k for k, _ in MARKERS]
        if all(k in m for k in keys):
            complete += 1
            for prev, cur in zip(keys, keys[1:]):
                per_stage[cur].append((m[cur] - m[prev]) / 1e6)
        for k, v in detail.items():
            details.setdefault(k, []).append(v)
        if example is None and all(k in m for k in keys):
            example = (run, sp, ex)
    med = lambda xs: statistics.median(xs) if xs else None
    stages = []
    for key, label in MARKERS[1:]:
        stages.append({"stage": label, "ends_at": key, "median_ms": med(per_stage[key]),
                       "at_ms": med(per_marker[key]), "n": len(per_stage[key])})
    result = {
        "runs": len(runs),
        "complete_runs": complete,
        "total_median_ms": med(totals),
        "sum_of_stage_medians_ms": sum(s["median_ms"] or 0 for s in stages),
        "stages": stages,
        "details_median_ms": {k: med(v) for k, v in details.items()},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    lines = []
    lines.append(f"Traced `docker run --rm busybox true` through berth: {complete} of {len(runs)} runs "
                 f"with every marker; median end-to-end {fmt_ms(result['total_median_ms'])} ms "
                 "(runc and berth-shim run through a timing wrapper: ~1 ms each).")
    lines.append("")
    lines.append("| # | stage | median ms | ends at (ms after the CLI started) |")
    lines.append("|---:|---|---:|---:|")
    for i, s in enumerate(stages, 1):
        lines.append(f"| {i} | {s['stage']} | {fmt_ms(s['median_ms'])} | {fmt_ms(s['at_ms'])} |")
    lines.append(f"| | sum of the stage medians | {fmt_ms(result['sum_of_stage_medians_ms'])} | |")
    lines.append("")
    lines.append("Inside those stages (median ms): " + "; ".join(
        f"{k} {fmt_ms(v) if 'count' not in k else int(v)}"
        for k, v in result["details_median_ms"].items() if v is not None) + ".")
    if example:
        run, sp, ex = example
        t0 = run["t0"]
        lines.append("")
        lines.append("One run, every span and exec (ms from the CLI's start):")
        lines.append("")
        lines.append("```")
        lines.append(f"{'start':>8} {'end':>8} {'dur':>7}  {'process':<18} what")
        rows = [(s["start"], s["end"], s["service"], s["name"]) for s in sp] + \
               [(e["start"], e["end"], "exec", e["name"]) for e in ex]
        rows.sort()
        for st, en, svc, name in rows:
            if name.startswith("grpc.health"):
                continue
            lines.append(f"{(st - t0) / 1e6:8.2f} {(en - t0) / 1e6:8.2f} {(en - st) / 1e6:7.2f}  "
                         f"{svc:<18} {name[:80]}")
        lines.append(f"{(run['t1'] - t0) / 1e6:8.2f} {'':8} {'':7}  {'docker CLI':<18} exit")
        lines.append("```")
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run")
    r.add_argument("--docker", default="docker")
    r.add_argument("--host", required=True)
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--gap", type=float, default=0.3)
    r.add_argument("--out", required=True)
    a = sub.add_parser("analyze")
    a.add_argument("--runs", required=True)
    a.add_argument("--spans", required=True)
    a.add_argument("--exec", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--md", required=True)
    pr = sub.add_parser("profile-run")
    pr.add_argument("--docker", default="docker")
    pr.add_argument("--host", required=True)
    pr.add_argument("--cmd", required=True)
    pr.add_argument("--setup")
    pr.add_argument("--teardown")
    pr.add_argument("--runs", type=int, default=10)
    pr.add_argument("--warmup", type=int, default=2)
    pr.add_argument("--gap", type=float, default=0.3)
    pr.add_argument("--out", required=True)
    pa = sub.add_parser("profile-analyze")
    pa.add_argument("--label", required=True)
    pa.add_argument("--runs", required=True)
    pa.add_argument("--spans", required=True)
    pa.add_argument("--exec", required=True)
    pa.add_argument("--md", required=True)
    args = ap.parse_args()
    return {"run": cmd_run, "analyze": cmd_analyze, "profile-run": cmd_profile_run,
            "profile-analyze": cmd_profile_analyze}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
