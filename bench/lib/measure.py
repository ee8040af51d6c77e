#!/usr/bin/env python3
"""The scenarios of ../shared/BENCHMARKS.md, run against berth and (when given) dockerd in the
same run, interleaved, and the report built from them.

    measure.py measure --config sides.json --out results.json [--raw DIR]
    measure.py report --results results.json --facts facts.json [--breakdown bd.md]
        [--pull pull.txt] [--rootless rootless.md] [--vm vm.md] --md summary.md --tsv summary.tsv

sides.json (written by bench/run.sh):
    {"docker": "/usr/local/bin/docker", "runs": 30, "rounds": 3, "density": 200,
     "registry_ref": "127.0.0.1:PORT/busybox:latest",
     "sides": {"berth": {"host": "unix://…/docker.sock", "startup_ms": 140,
                         "daemons": {"berth up": pid, "berth-engine": pid, …},
                         "shim_match": ["berth-shim", "serve", "--state-dir …/state"]},
               "dockerd": {…, "shim_match": ["containerd-shim-runc-v2", "-address …"]}}}

A scenario that fails on one side records the error for that side and the run goes on.
"""
import argparse
import concurrent.futures
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

SIDES = ("berth", "dockerd")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# memory


# Seconds without requests before idle memory is read: berth's daemons give memory back (free heap
# pages, page-table entries of code no longer running) after about 2-3 s without work
# (berth_core::daemon::trim_when_idle), so read the settled figure rather than the tail of the last
# request. dockerd gets the same wait.
IDLE_WAIT = 5


def proc_rss_pss_kb(pid):
    rss = pss = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return rss, pss


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def shim_pids(match):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        c = cmdline(name)
        if c and all(m in c for m in match):
            out.append(int(name))
    return out


def memory(side):
    """RSS and PSS (kB) of every daemon of a side and of its shims."""
    daemons = {}
    for name, pid in side["daemons"].items():
        v = proc_rss_pss_kb(pid)
        if v is None:
            raise RuntimeError(f"{name} (pid {pid}) is gone")
        daemons[name] = {"rss_kb": v[0], "pss_kb": v[1]}
    shims = [v for v in (proc_rss_pss_kb(p) for p in shim_pids(side["shim_match"])) if v]
    return {
        "daemons": daemons,
        "daemons_rss_kb": sum(d["rss_kb"] for d in daemons.values()),
        "daemons_pss_kb": sum(d["pss_kb"] for d in daemons.values()),
        "shims": len(shims),
        "shims_rss_kb": sum(s[0] for s in shims),
        "shims_pss_kb": sum(s[1] for s in shims),
    }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """User + system CPU seconds of `pids` so far, with their waited-for children's (the runtime
    binaries and plugins they run); processes that are gone count 0."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def side_pids(side):
    """Every daemon and shim of a side."""
    return list(side["daemons"].values()) + shim_pids(side["shim_match"])


# ------------------------------------------------------------------------------------------------
# in-process HTTP over the Docker socket: the server's time without a client process start-up


class UnixDocker:
    """One keep-alive HTTP connection to a unix:// Docker socket."""

    def __init__(self, host):
        import http.client
        import socket

        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(host[len("unix://"):])

        self.conn = UnixConnection("docker", timeout=600)

    def request(self, method, path, body=None, headers=None):
        """(status, body bytes)."""
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self):
        self.conn.close()


def api_latency_ms(host, path, n=200, warmup=20):
    """Median ms of `GET path` over one keep-alive connection to a unix:// Docker socket."""
    conn = UnixDocker(host)
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        status, _ = conn.request("GET", path)
        t1 = time.perf_counter()
        if status != 200:
            raise Failed(f"GET {path}: HTTP {status}")
        if i >= warmup:
            times.append((t1 - t0) * 1000)
    conn.close()
    return statistics.median(times)


def api_build_ms(host, context_tar, query, n, warmup=1, prepare=None):
    """Median ms of `POST /build?<query>` with the context tar `context_tar()` returns, over one
    keep-alive connection (the engine's time without the CLI's start-up and context packing).
    `prepare()` runs untimed before each build."""
    conn = UnixDocker(host)
    times = []
    for i in range(warmup + n):
        if prepare:
            prepare()
        body = context_tar()
        t0 = time.perf_counter()
        status, out = conn.request("POST", f"/build?{query}", body=body,
                                   headers={"Content-Type": "application/x-tar"})
        t1 = time.perf_counter()
        if status != 200 or b'"errorDetail"' in out:
            raise Failed(f"POST /build: HTTP {status}: {out[-300:]!r}")
        if i >= warmup:
            times.append((t1 - t0) * 1000)
    conn.close()
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# a quiet machine between scenarios


def cpu_busy(window=0.5):
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    i0, t0 = read()
    time.sleep(window)
    i1, t1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def settle(threshold=0.25, timeout=15.0):
    """Waits until the CPUs are mostly idle: removing containers leaves the kernel tearing down
    namespaces, veths and mounts for seconds after the API answered, and that would be billed
    to whatever is timed next."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy()
    if busy > threshold:
        log(f"the machine is still {busy:.0%} busy after {timeout:.0f} s; measuring anyway")


# ------------------------------------------------------------------------------------------------
# running things


class Failed(Exception):
    pass


def sh(cmd, timeout=300, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise Failed(f"`{' '.join(cmd[:6])}…` exited {p.returncode}: {msg[-1] if msg else ''}")
    return p


class Bench:
    def __init__(self, cfg, raw):
        self.cfg = cfg
        self.raw = raw
        self.docker = cfg["docker"]
        self.sides = {k: v for k, v in cfg["sides"].items() if k in SIDES}
        self.runs = cfg.get("runs", 30)
        self.rounds = max(1, cfg.get("rounds", 3))
        self.warmup = cfg.get("warmup", 3)
        self.rows = []
        self.memory = {}
        self.order_flip = False

    # --- recording ---

    def row(self, key, metric, unit, values, errors=None, target=None, scale=1.0, note=""):
        r = {"key": key, "metric": metric, "unit": unit, "target": target, "note": note}
        for s in SIDES:
            v = values.get(s)
            r[s] = None if v is None else v * scale
            if errors and errors.get(s):
                r[s + "_error"] = errors[s]
        self.rows.append(r)
        shown = ", ".join(f"{s} {self.fmt(r[s])}" if r[s] is not None else
                          f"{s} {'failed' if r.get(s + '_error') else '—'}" for s in self.sides)
        log(f"{metric}: {shown} {unit}")
        return r

    @staticmethod
    def fmt(v):
        return "—" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}")

    def docker_cmd(self, side, *args):
        return [self.docker, "-H", self.sides[side]["host"], *args]

    def order(self):
        """Sides in alternating order, so neither always goes first."""
        names = list(self.sides)
        self.order_flip = not self.order_flip
        return names[::-1] if self.order_flip else names

    # --- hyperfine, interleaved in rounds ---

    def hyperfine(self, key, cmds, runs=None, prepare=None, warmup=None):
        """cmds: side -> argv. Runs `runs` timings per side in `rounds` alternating blocks.
        Returns (medians in ms, errors)."""
        runs = runs or self.runs
        warmup = self.warmup if warmup is None else warmup
        per_round = max(1, -(-runs // self.rounds))
        times = {s: [] for s in cmds}
        errors = {}
        for rnd in range(self.rounds):
            for side in self.order():
                if side not in cmds or side in errors:
                    continue
                out = os.path.join(self.raw, f"{key}.{side}.{rnd}.json")
                argv = ["hyperfine", "-N", "--style", "none", "--warmup",
                        str(warmup if rnd == 0 else 1), "--runs", str(per_round),
                        "--export-json", out]
                if prepare and prepare.get(side):
                    argv += ["--prepare", shlex.join(prepare[side])]
                argv.append(shlex.join(cmds[side]))
                p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
                if p.returncode != 0:
                    lines = [l for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
                    errors[side] = lines[-1] if lines else f"hyperfine exited {p.returncode}"
                    continue
                with open(out) as f:
                    times[side] += json.load(f)["results"][0]["times"]
        med = {s: statistics.median(t) * 1000 for s, t in times.items() if t and s not in errors}
        return med, errors

    def scenario(self, fn, *args):
        settle()
        try:
            fn(*args)
        except Exception as e:  # a scenario never aborts the run
            log(f"scenario {fn.__name__} failed: {e}")
            traceback.print_exc(file=sys.stderr)
            self.rows.append({"key": fn.__name__, "metric": f"{fn.__name__} (scenario error)",
                              "unit": "", "berth": None, "dockerd": None, "target": None,
                              "note": "", "berth_error": str(e), "dockerd_error": str(e)})

    # --- scenarios ---

    def startup(self):
        self.row("startup", "stack start-up until it answers (berth up until healthy; containerd + dockerd until /_ping)",
                 "ms", {s: v.get("startup_ms") for s, v in self.sides.items()})

    def mem_rows(self, key, label, snap):
        vals = lambda f: {s: (snap[s][f] / 1024 if s in snap else None) for s in self.sides}
        errs = {s: snap.get(s + "_error") for s in self.sides}
        self.row(key + "_rss", f"RSS of all daemons, {label}", "MB", vals("daemons_rss_kb"), errs,
                 target="berth ≤ 40 MB (goal 30)" if key == "idle" else None)
        self.row(key + "_pss", f"PSS of all daemons, {label}", "MB", vals("daemons_pss_kb"), errs)
        for s in self.sides:
            if s in snap:
                per = ", ".join(f"{n.removeprefix('berth-')} {d['rss_kb'] / 1024:.1f}/{d['pss_kb'] / 1024:.1f}"
                                for n, d in snap[s]["daemons"].items())
                log(f"  {s} per daemon, RSS/PSS MB: {per}")

    def snapshot_memory(self, label):
        snap = {}
        for s, side in self.sides.items():
            try:
                snap[s] = memory(side)
            except Exception as e:
                snap[s + "_error"] = str(e)
        self.memory[label] = snap
        return snap

    def idle_memory(self):
        time.sleep(IDLE_WAIT)
        snap = self.snapshot_memory("idle")
        self.mem_rows("idle", "idle (image loaded, no container)", snap)

    def simple(self, key, metric, args, target=None, curl_path=None, runs=None):
        if curl_path:
            cmds = {s: ["curl", "-sf", "--unix-socket", side["host"][len("unix://"):],
                        "http://docker" + curl_path] for s, side in self.sides.items()}
        else:
            cmds = {s: self.docker_cmd(s, *args) for s in self.sides}
        med, err = self.hyperfine(key, cmds, runs=runs)
        return self.row(key, metric, "ms", med, err, target=target)

    def run_rm(self):
        self.simple("run", "`docker run --rm busybox true` (berth's default runtime)",
                    ["run", "--rm", "busybox", "true"], target="≤ 0.15 × dockerd")

    def run_rm_none(self):
        self.simple("run_none", "`docker run --rm --network none busybox true` (berth's default runtime)",
                    ["run", "--rm", "--network", "none", "busybox", "true"], target="≤ 0.20 × dockerd")

    def runtimes(self):
        """`docker run --rm busybox true`, bridged and with `--network none`, with each OCI
        runtime berth has (runc, its in-process libcontainer, crun where it runs on this host)
        beside dockerd with its default runc, in the same run."""
        for rt in ["runc", "libcontainer", "crun"]:
            probe = sh(self.docker_cmd("berth", "run", "--rm", "--runtime", rt, "busybox", "true"),
                       check=False)
            reason = None
            if probe.returncode != 0:
                lines = [l for l in (probe.stderr or probe.stdout).strip().splitlines()
                         if l.strip() and "docker run --help" not in l]
                reason = f"{rt} does not run here: {lines[-1] if lines else probe.returncode}"
            for key, label, net in [("run", "`docker run --rm busybox true`", []),
                                    ("run_none", "`docker run --rm --network none busybox true`",
                                     ["--network", "none"])]:
                metric = f"{label}, berth with `--runtime {rt}`"
                target = {"run": "≤ 0.15 × dockerd", "run_none": "≤ 0.20 × dockerd"}[key]
                if reason:
                    self.row(f"{key}_{rt}", metric, "ms", {}, {"berth": reason})
                    continue
                cmds = {s: self.docker_cmd(s, "run", "--rm", *net,
                                           *(["--runtime", rt] if s == "berth" else []),
                                           "busybox", "true") for s in self.sides}
                med, err = self.hyperfine(f"{key}_{rt}", cmds)
                self.row(f"{key}_{rt}", metric, "ms", med, err,
                         target=target if rt == "libcontainer" else None)

    def exec_true(self):
        errs = {}
        for s in self.sides:
            try:
                sh(self.docker_cmd(s, "rm", "-f", "c1"), check=False)
                sh(self.docker_cmd(s, "run", "-d", "--name", "c1", "busybox", "sleep", "3000"))
            except Exception as e:
                errs[s] = str(e)
        for s in self.sides:
            if s not in errs:
                self.capture_spec(s, "c1")
        cmds = {s: self.docker_cmd(s, "exec", "c1", "true") for s in self.sides if s not in errs}
        med, err = self.hyperfine("exec", cmds)
        err.update(errs)
        self.row("exec", "`docker exec c1 true`", "ms", med, err, target="≤ 0.5 × dockerd")
        for s in self.sides:
            sh(self.docker_cmd(s, "rm", "-f", "c1"), check=False)

    def api_rows(self, key, metric, path, target=None, sides=None):
        vals, errs = {}, {}
        for s in sides or self.sides:
            try:
                vals[s] = api_latency_ms(self.sides[s]["host"], path)
            except Exception as e:
                errs[s] = str(e)
        self.row(key, metric, "ms", vals, errs, target=target)

    # --- the OCI runtime floor, with each side's own spec ---

    def capture_spec(self, side, name):
        """Keeps the config.json the side generated for container `name` (for runc_floor)."""
        try:
            cid = sh(self.docker_cmd(side, "inspect", "-f", "{{.Id}}", name)).stdout.strip()
            path = self.sides[side]["bundle_config"].replace("{id}", cid)
            with open(path) as f:
                self.specs = getattr(self, "specs", {})
                self.specs[side] = json.load(f)
        except Exception as e:
            log(f"could not keep {side}'s spec of {name}: {e}")

    def runc_floor(self):
        """`runc run` of a prepared bundle (the floor under `docker run`) and `runc exec` into a
        running one (the floor under `docker exec`), each with the OCI spec the side itself
        generated for busybox; for berth also with seccomp variants, to show what the profile
        costs inside runc."""
        import copy
        import tarfile
        specs = getattr(self, "specs", {})
        if not specs:
            raise Failed("no captured spec")
        base = os.path.join(self.cfg["tmp"], "floor")
        rootfs = os.path.join(base, "rootfs")
        os.makedirs(rootfs, exist_ok=True)
        with tarfile.open(self.cfg["busybox_tar"]) as t:
            manifest = json.load(t.extractfile("manifest.json"))
            for layer in manifest[0]["Layers"]:
                with tarfile.open(fileobj=t.extractfile(layer)) as lt:
                    lt.extractall(rootfs)
        runroot = os.path.join(base, "runc")

        def bundle(name, spec, args):
            spec = copy.deepcopy(spec)
            spec["root"] = {"path": rootfs, "readonly": False}
            spec["process"]["args"] = args
            spec["process"]["terminal"] = False
            spec.pop("hooks", None)
            spec["mounts"] = [m for m in spec.get("mounts", []) if m.get("type") != "bind"]
            for ns in spec["linux"].get("namespaces", []):
                ns.pop("path", None)
            spec["linux"]["cgroupsPath"] = f"/berth-bench/floor-{name}"
            d = os.path.join(base, name)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(spec, f)
            return d

        variants = {}
        for side, spec in specs.items():
            variants[side] = (side, spec)
        if "berth" in specs:
            b = specs["berth"]
            if b["linux"].get("seccomp"):
                v = copy.deepcopy(b)
                v["linux"].pop("seccomp")
                variants["berth-noseccomp"] = ("berth", v)
                v = copy.deepcopy(b)
                v["linux"]["seccomp"]["architectures"] = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
                variants["berth-nox32"] = ("berth", v)
                v = copy.deepcopy(b)
                v["linux"]["seccomp"]["architectures"] = ["SCMP_ARCH_X86_64"]
                variants["berth-native"] = ("berth", v)
        labels = {"berth": "its own spec", "dockerd": "its own spec",
                  "berth-noseccomp": "berth's spec without seccomp",
                  "berth-nox32": "berth's spec, seccomp for x86_64 + x86 (no x32)",
                  "berth-native": "berth's spec, seccomp for x86_64 only"}
        per_round = max(1, -(-min(self.runs, 30) // self.rounds))
        for kind in ("run", "exec"):
            res = {}
            cmds = {}
            for name, (side, spec) in variants.items():
                d = bundle(f"{kind}-{name}", spec, ["true"] if kind == "run" else ["sleep", "3000"])
                cid = f"bench-floor-{kind}-{name}"
                if kind == "run":
                    cmds[name] = ["runc", "--root", runroot, "run", "--bundle", d, cid]
                    continue
                # The detached container keeps its stdio: a file, not a pipe we would wait on.
                errf = os.path.join(base, f"{cid}.stderr")
                with open(errf, "w") as ef:
                    p = subprocess.run(["runc", "--root", runroot, "run", "-d", "--bundle", d, cid],
                                       stdin=subprocess.DEVNULL, stdout=ef, stderr=ef, timeout=60)
                if p.returncode != 0:
                    res[name] = (None, open(errf).read().strip()[-200:] or f"runc run -d exited {p.returncode}")
                    continue
                cmds[name] = ["runc", "--root", runroot, "exec", cid, "true"]
            times = {name: [] for name in cmds}
            try:
                # Variants interleaved in blocks, like the sides elsewhere.
                for rnd in range(self.rounds):
                    for name, cmd in cmds.items():
                        if name in res:
                            continue
                        out = os.path.join(self.raw, f"floor-{kind}-{name}.{rnd}.json")
                        p = subprocess.run(["hyperfine", "-N", "--style", "none", "--warmup",
                                            "3" if rnd == 0 else "1", "--runs", str(per_round),
                                            "--export-json", out, shlex.join(cmd)],
                                           capture_output=True, text=True, timeout=600)
                        if p.returncode != 0:
                            res[name] = (None, (p.stderr.strip().splitlines() or ["hyperfine failed"])[-1])
                            continue
                        with open(out) as f:
                            times[name] += json.load(f)["results"][0]["times"]
            finally:
                if kind == "exec":
                    for name in variants:
                        subprocess.run(["runc", "--root", runroot, "delete", "-f",
                                        f"bench-floor-{kind}-{name}"], capture_output=True)
            for name, t in times.items():
                if name not in res and t:
                    res[name] = (statistics.median(t) * 1000, None)
            what = "`runc run` of a prepared busybox bundle (`true`)" if kind == "run" else \
                "`runc exec … true` into a running busybox bundle"
            for name, (side, _) in variants.items():
                v, e = res.get(name, (None, "not run"))
                if name in SIDES:
                    continue
                self.row(f"floor_{kind}_{name}", f"floor: {what}, {labels[name]}", "ms",
                         {"berth": v}, {"berth": e} if e else None)
            self.row(f"floor_{kind}", f"floor: {what}, each side's own spec", "ms",
                     {s: res[s][0] for s in SIDES if s in res},
                     {s: res[s][1] for s in SIDES if s in res and res[s][1]})

    def cli_floor(self):
        self.simple("version", "`docker version` (CLI start-up floor)", ["version"])
        self.simple("ping", "`GET /_ping` (curl)", [], curl_path="/_ping")
        self.api_rows("ping_api", "`GET /_ping`, one keep-alive connection (server time, no client start-up)",
                      "/_ping")

    def running_names(self, side, prefix):
        p = sh(["curl", "-sf", "--unix-socket", self.sides[side]["host"][len("unix://"):],
                "http://docker/containers/json"], timeout=60)
        names = set()
        for c in json.loads(p.stdout):
            if c.get("State", "running") == "running":
                for n in c.get("Names") or []:
                    n = n.lstrip("/")
                    if n.startswith(prefix):
                        names.add(n)
        return names

    def start_many(self, side, prefix, n, parallel):
        """Starts n `sleep` containers, `parallel` at a time; returns seconds until all run."""
        names = [f"{prefix}{i}" for i in range(n)]

        def one(name):
            return subprocess.run(self.docker_cmd(side, "run", "-d", "--name", name, "busybox",
                                                  "sleep", "300"), capture_output=True, text=True)

        t0 = time.perf_counter()
        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as ex:
            for name, p in zip(names, ex.map(one, names)):
                if p.returncode != 0:
                    failures.append(f"{name}: {p.stderr.strip()[-200:]}")
        deadline = time.perf_counter() + 120
        while True:
            running = self.running_names(side, prefix)
            if len(running) >= n or failures:
                break
            if time.perf_counter() > deadline:
                raise Failed(f"only {len(running)} of {n} running after 120 s")
            time.sleep(0.01)
        took = time.perf_counter() - t0
        if failures:
            raise Failed(f"{len(failures)} of {n} runs failed; first: {failures[0]}")
        return took

    def remove_many(self, side, prefix, n):
        names = [f"{prefix}{i}" for i in range(n)]
        t0 = time.perf_counter()
        sh(self.docker_cmd(side, "rm", "-f", *names), timeout=600)
        return time.perf_counter() - t0

    def cleanup_prefix(self, side, prefix, n):
        names = [f"{prefix}{i}" for i in range(n)]
        subprocess.run(self.docker_cmd(side, "rm", "-f", *names), capture_output=True, timeout=600)

    def parallel20(self):
        iters = self.cfg.get("parallel_rounds", 5)
        starts = {s: [] for s in self.sides}
        rms = {s: [] for s in self.sides}
        errs = {}
        for it in range(iters):
            live = []
            for s in self.order():
                if s in errs:
                    continue
                settle()
                try:
                    starts[s].append(self.start_many(s, "p", 20, 20))
                    live.append(s)
                except Exception as e:
                    errs[s] = str(e)
                    self.cleanup_prefix(s, "p", 20)
            if it == 0:
                self.with20(live)
            for s in self.order():
                if s not in live:
                    continue
                settle()
                try:
                    rms[s].append(self.remove_many(s, "p", 20))
                except Exception as e:
                    errs.setdefault(s + "_rm", str(e))
                    self.cleanup_prefix(s, "p", 20)
        med = lambda xs: statistics.median(xs) if xs else None
        self.row("par20_run", f"20 parallel `docker run -d … sleep 300` until all running (median of {iters})",
                 "s", {s: med(v) for s, v in starts.items()}, errs, target="≤ 0.25 × dockerd")
        self.row("par20_rm", "`docker rm -f` of those 20 (one call)", "s",
                 {s: med(v) for s, v in rms.items()},
                 {s: errs.get(s + "_rm") or errs.get(s) for s in self.sides},
                 target="≤ 0.25 × dockerd")

    def with20(self, live):
        """Lists and memory while 20 containers run on every live side."""
        cmds_api = {s: ["curl", "-sf", "--unix-socket", self.sides[s]["host"][len("unix://"):],
                        "http://docker/containers/json"] for s in live}
        med, err = self.hyperfine("list20", cmds_api)
        self.row("list20", "`GET /containers/json` with 20 running (curl)", "ms", med,
                 {**err, **{s: "20 containers did not start" for s in self.sides if s not in live}},
                 target="berth ≤ 5 ms")
        self.api_rows("list20_api", "`GET /containers/json` with 20 running, one keep-alive connection",
                      "/containers/json", target="berth ≤ 5 ms", sides=live)
        med, err = self.hyperfine("ps20", {s: self.docker_cmd(s, "ps") for s in live})
        self.row("ps20", "`docker ps` with 20 running", "ms", med,
                 {**err, **{s: "20 containers did not start" for s in self.sides if s not in live}})
        time.sleep(1)
        snap = self.snapshot_memory("with20")
        self.mem_rows("with20", "20 containers running", snap)
        per = lambda f: {s: (snap[s][f] / snap[s]["shims"] / 1024
                             if s in snap and snap[s]["shims"] else None) for s in live}
        self.row("shim_rss", "per running container: shim RSS (berth-shim vs containerd-shim-runc-v2)",
                 "MB", per("shims_rss_kb"), target="berth ≤ 3 MB (goal 2)")
        self.row("shim_pss", "per running container: shim PSS", "MB", per("shims_pss_kb"))

    def pull(self):
        ref = self.cfg.get("registry_ref")
        if not ref:
            raise Failed("no registry")
        cmds, prep = {}, {}
        for s in self.sides:
            rm = " ".join(shlex.quote(a) for a in self.docker_cmd(s, "rmi", "-f", ref, "busybox:latest"))
            prep[s] = ["sh", "-c", f"{rm} >/dev/null 2>&1; true"]
            cmds[s] = self.docker_cmd(s, "pull", "-q", ref)
        med, err = self.hyperfine("pull", cmds, runs=min(self.runs, 15), prepare=prep, warmup=1)
        self.row("pull", "`docker pull` of busybox from the loopback registry after `docker rmi`",
                 "ms", med, err)
        # Put busybox:latest back for what follows.
        for s in self.sides:
            p = sh(self.docker_cmd(s, "tag", ref, "busybox:latest"), check=False)
            if p.returncode != 0:
                sh(self.docker_cmd(s, "load", "-i", self.cfg["busybox_tar"]), check=False)

    def build(self):
        """`docker build` (the classic builder, `POST /build`) of a 10-step Dockerfile with 5 RUN
        steps: cold (`--no-cache`), rebuilt with nothing changed, and with one COPY source
        changed (what follows that COPY reruns)."""
        ctx = os.path.join(self.cfg["tmp"], "buildctx")
        os.makedirs(ctx, exist_ok=True)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write("FROM busybox:latest\n"
                    "ENV BENCH=1\n"
                    "RUN echo one > /one\n"
                    "RUN echo two > /two\n"
                    "COPY static.txt /static.txt\n"
                    "RUN cat /static.txt > /copy1\n"
                    "COPY changed.txt /changed.txt\n"
                    "RUN cat /changed.txt > /copy2\n"
                    "RUN ls / > /listing\n"
                    'CMD ["sh"]\n')
        with open(os.path.join(ctx, "static.txt"), "w") as f:
            f.write("static\n")
        with open(os.path.join(ctx, "changed.txt"), "w") as f:
            f.write("0\n")
        # Without buildx the CLI needs this to use the classic builder against dockerd; berth's
        # ping already says it has only the classic one.
        os.environ["DOCKER_BUILDKIT"] = "0"
        build = lambda s, *flags: self.docker_cmd(s, "build", "-q", *flags, "-t", "benchbuild", ctx)
        runs = min(self.runs, 10)
        med, err = self.hyperfine("build_cold", {s: build(s, "--no-cache") for s in self.sides},
                                  runs=runs, warmup=1)
        self.row("build_cold", "`docker build --no-cache` of 10 steps with 5 RUN", "ms", med, err,
                 target="≤ 0.5 × dockerd")
        med, err = self.hyperfine("build_cached", {s: build(s) for s in self.sides},
                                  runs=runs, warmup=1)
        self.row("build_cached", "`docker build` of the same, nothing changed (every step cached)",
                 "ms", med, err, target="≤ 0.2 × dockerd")
        touch = ["sh", "-c", f"date +%s%N > {shlex.quote(os.path.join(ctx, 'changed.txt'))}"]
        med, err = self.hyperfine("build_copy", {s: build(s) for s in self.sides}, runs=runs,
                                  warmup=1, prepare={s: touch for s in self.sides})
        self.row("build_copy", "`docker build` with one COPY source changed (3 steps rerun)", "ms",
                 med, err, target="≤ 0.2 × dockerd")
        # The same builds as `POST /build` over a kept-alive connection: the engine's share,
        # without the CLI's start-up (about 20 ms, the `docker version` row) on both sides.
        import io
        import tarfile

        def context_tar():
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as t:
                for name in ("Dockerfile", "static.txt", "changed.txt"):
                    t.add(os.path.join(ctx, name), arcname=name)
            return buf.getvalue()

        def change():
            with open(os.path.join(ctx, "changed.txt"), "w") as f:
                f.write(f"{time.time_ns()}\n")

        for key, metric, query, prep in (
            ("build_cached_api", "`POST /build`, nothing changed, one keep-alive connection "
             "(no CLI start-up)", "t=benchbuild&q=1", None),
            ("build_copy_api", "`POST /build`, one COPY source changed, one keep-alive connection "
             "(no CLI start-up)", "t=benchbuild&q=1", change),
        ):
            vals, errs = {}, {}
            for s in self.order():
                try:
                    vals[s] = api_build_ms(self.sides[s]["host"], context_tar, query, runs,
                                           prepare=prep)
                except Exception as e:
                    errs[s] = str(e)
            self.row(key, metric, "ms", vals, errs, target="≤ 0.2 × dockerd")
        for s in self.sides:
            sh(self.docker_cmd(s, "rmi", "-f", "benchbuild"), check=False)

    def stats_cpu(self, s, window=10.0, warmup=3.0):
        """CPU % of one core the side's daemons and shims spend while one `docker stats` client
        streams every running container (the client's own CPU is not counted)."""
        client = subprocess.Popen(self.docker_cmd(s, "stats", "--format", "{{.Name}} {{.CPUPerc}}"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(warmup)
            pids = side_pids(self.sides[s])
            c0, t0 = cpu_seconds(pids), time.monotonic()
            time.sleep(window)
            c1, t1 = cpu_seconds(pids), time.monotonic()
            if client.poll() is not None:
                raise Failed(f"docker stats exited {client.returncode}")
            return 100.0 * (c1 - c0) / (t1 - t0)
        finally:
            client.kill()
            client.wait()

    def stats100(self):
        """CPU of `docker stats` streaming 100 running containers (issue 19's figure), each side
        alone with its 100."""
        n = self.cfg.get("stats_containers", 100)
        vals, errs = {}, {}
        for s in self.sides:
            try:
                settle()
                self.start_many(s, "st", n, self.cfg.get("density_parallel", 8))
                settle()
                vals[s] = self.stats_cpu(s)
            except Exception as e:
                errs[s] = str(e)
                log(f"stats100 on {s} failed: {e}")
            finally:
                self.cleanup_prefix(s, "st", n)
        self.row("stats100_cpu", f"CPU while `docker stats` streams {n} containers "
                 "(daemons + shims, % of one core)", "%", vals, errs, target="berth < 5 %")

    def density(self):
        n = self.cfg.get("density", 200)
        if n <= 0:
            return
        parallel = self.cfg.get("density_parallel", 8)
        vals = {k: {} for k in ("start", "rss", "pss", "shim_rss", "list", "list_api", "ps", "rm",
                                "stats_cpu", "scrape")}
        errs = {}
        for s in self.sides:  # one side at a time: the memory growth is that side's alone
            try:
                settle()
                base = memory(self.sides[s])
                log(f"density: starting {n} containers on {s}, {parallel} at a time")
                vals["start"][s] = self.start_many(s, "d", n, parallel)
                time.sleep(2)
                full = memory(self.sides[s])
                self.memory.setdefault("density", {})[s] = full
                vals["rss"][s] = ((full["daemons_rss_kb"] + full["shims_rss_kb"]) - base["daemons_rss_kb"]
                                  - base["shims_rss_kb"]) / n / 1024
                vals["pss"][s] = ((full["daemons_pss_kb"] + full["shims_pss_kb"]) - base["daemons_pss_kb"]
                                  - base["shims_pss_kb"]) / n / 1024
                vals["shim_rss"][s] = full["shims_rss_kb"] / max(1, full["shims"]) / 1024
                settle()
                sock = self.sides[s]["host"][len("unix://"):]
                med, err = self.hyperfine(f"list{n}.{s}", {s: ["curl", "-sf", "--unix-socket", sock,
                                                               "http://docker/containers/json"]},
                                          runs=10, warmup=2)
                vals["list"][s] = med.get(s)
                if err.get(s):
                    errs.setdefault(s, err[s])
                vals["list_api"][s] = api_latency_ms(self.sides[s]["host"], "/containers/json", n=50)
                med, err = self.hyperfine(f"ps{n}.{s}", {s: self.docker_cmd(s, "ps")}, runs=10, warmup=2)
                vals["ps"][s] = med.get(s)
                if err.get(s):
                    errs.setdefault(s, err[s])
                settle()
                vals["stats_cpu"][s] = self.stats_cpu(s)
                addr = self.sides[s].get("metrics_addr")
                if addr:
                    settle()
                    med, err = self.hyperfine(f"scrape{n}.{s}", {s: ["curl", "-sf", "-o", "/dev/null",
                                                                    f"http://{addr}/metrics"]},
                                              runs=10, warmup=2)
                    vals["scrape"][s] = med.get(s)
                    if err.get(s):
                        errs.setdefault(s, err[s])
                settle()
                vals["rm"][s] = self.remove_many(s, "d", n)
            except Exception as e:
                errs[s] = str(e)
                log(f"density on {s} failed: {e}")
                self.cleanup_prefix(s, "d", n)
        self.row("density_start", f"density: start {n} `sleep` containers ({parallel} at a time)", "s",
                 vals["start"], errs)
        self.row("density_mem_rss", f"density: memory per container, RSS (daemons + shims growth / {n})",
                 "MB", vals["rss"], errs)
        self.row("density_mem_pss", f"density: memory per container, PSS (daemons + shims growth / {n})",
                 "MB", vals["pss"], errs)
        self.row("density_shim_rss", f"density: shim RSS with {n} running", "MB", vals["shim_rss"], errs)
        self.row("density_list", f"density: `GET /containers/json` with {n} running (curl)", "ms",
                 vals["list"], errs, target="berth ≤ 20 ms with 1,000")
        self.row("density_list_api", f"density: `GET /containers/json` with {n} running, keep-alive connection",
                 "ms", vals["list_api"], errs, target="berth ≤ 20 ms with 1,000")
        self.row("density_ps", f"density: `docker ps` with {n} running", "ms", vals["ps"], errs)
        self.row("density_stats_cpu", f"density: CPU while `docker stats` streams {n} containers "
                 "(daemons + shims, % of one core)", "%", vals["stats_cpu"], errs,
                 target="berth < 5 % with 100")
        self.row("density_scrape", f"density: metrics scrape (`GET /metrics`) with {n} running", "ms",
                 vals["scrape"], errs)
        self.row("density_rm", f"density: `docker rm -f` of {n} (one call)", "s", vals["rm"], errs)

    def idle_after(self):
        time.sleep(IDLE_WAIT)
        snap = self.snapshot_memory("idle_after")
        self.mem_rows("idle_after", "idle again after every scenario", snap)


def cmd_measure(args):
    cfg = json.load(open(args.config))
    os.makedirs(args.raw, exist_ok=True)
    b = Bench(cfg, args.raw)
    order = ["startup", "idle_memory", "cli_floor", "run_rm", "run_rm_none", "runtimes", "exec_true",
             "runc_floor", "parallel20", "pull", "build", "stats100", "density", "idle_after"]
    only = [s for s in cfg.get("scenarios", "").split(",") if s]
    unknown = [s for s in only if s not in order]
    if unknown:
        log(f"unknown scenarios {unknown}; known: {', '.join(order)}")
        return 2
    for name in order:
        if not only or name in only:
            b.scenario(getattr(b, name))
    with open(args.out, "w") as f:
        json.dump({"rows": b.rows, "memory": b.memory, "config": cfg}, f, indent=1)
    return 0


# ------------------------------------------------------------------------------------------------
# report


def ratio(r):
    b, d = r.get("berth"), r.get("dockerd")
    if b is None or d in (None, 0):
        return None
    return b / d


def cell(r, side):
    v = r.get(side)
    if v is None:
        e = r.get(side + "_error")
        return f"failed ({e})" if e else "—"
    return Bench.fmt(v)


def md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def cmd_report(args):
    res = json.load(open(args.results))
    facts = json.load(open(args.facts))
    rows = res["rows"]
    has_docker = "dockerd" in res["config"]["sides"]
    # Extra rows from bench/pull.sh's summary lines.
    if args.pull and os.path.exists(args.pull):
        bm = dm = None
        for line in open(args.pull):
            if "berth median wall" in line:
                bm = float(line.split("berth median wall")[1].split()[0])
            if "dockerd median wall" in line:
                dm = float(line.split("dockerd median wall")[1].split()[0].rstrip(";"))
        if bm is not None:
            rows.append({"key": "pull_synthetic", "metric": "pull + unpack of synthetic 4 × 64 MB from "
                         "the loopback registry (bench/pull.sh; berth: images+snapshotter client, dockerd: `docker pull`)",
                         "unit": "s", "berth": bm, "dockerd": dm, "target": "≤ 0.5 × dockerd", "note": ""})

    lines = []
    lines.append(f"# berth bench, {facts.get('date')}")
    lines.append("")
    lines.append("## Machine")
    lines.append("")
    for k, v in facts.items():
        lines.append(f"- {k}: {v}")
    lines.append("")
    lines.append("## berth / dockerd")
    lines.append("")
    lines.append(f"Medians; {res['config'].get('runs')} hyperfine runs per side for each command "
                 f"(in {res['config'].get('rounds')} interleaved blocks, after warm-up). "
                 "Ratio < 1: berth is faster or smaller.")
    lines.append("")
    lines.append("| what | unit | berth | dockerd | berth/dockerd | target |")
    lines.append("|---|---|---:|---:|---:|---|")
    for r in rows:
        rt = ratio(r)
        lines.append(f"| {md_escape(r['metric'])} | {r['unit']} | {md_escape(cell(r, 'berth'))} | "
                     f"{md_escape(cell(r, 'dockerd')) if has_docker else '—'} | "
                     f"{'' if rt is None else f'{rt:.2f}'} | {md_escape(r.get('target') or '')} |")
    # Per-daemon memory.
    mem = res.get("memory", {})
    if mem:
        lines.append("")
        lines.append("## Memory per daemon (RSS / PSS, MB)")
        lines.append("")
        labels = [("idle", "idle"), ("with20", "20 running"), ("density", "density"),
                  ("idle_after", "idle after the run")]
        cols = [l for l in labels if l[0] in mem]
        lines.append("| daemon | " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        names = []
        for key, _ in cols:
            for s, snap in mem[key].items():
                if isinstance(snap, dict):
                    for n in snap.get("daemons", {}):
                        if n not in names:
                            names.append(n)
        for n in names:
            cells = []
            for key, _ in cols:
                v = None
                for s, snap in mem[key].items():
                    if isinstance(snap, dict) and n in snap.get("daemons", {}):
                        v = snap["daemons"][n]
                cells.append("" if v is None else f"{v['rss_kb'] / 1024:.1f} / {v['pss_kb'] / 1024:.1f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        for s in SIDES:
            cells = []
            for key, _ in cols:
                snap = mem[key].get(s)
                if isinstance(snap, dict) and snap.get("shims"):
                    cells.append(f"{snap['shims']} × {snap['shims_rss_kb'] / snap['shims'] / 1024:.2f} / "
                                 f"{snap['shims_pss_kb'] / snap['shims'] / 1024:.2f}")
                else:
                    cells.append("")
            if any(cells):
                lines.append(f"| {s} shims (count × per shim) | " + " | ".join(cells) + " |")
    errors = [(r["metric"], s, r[s + "_error"]) for r in rows for s in SIDES if r.get(s + "_error")]
    if errors:
        lines.append("")
        lines.append("## Failures")
        lines.append("")
        for metric, s, e in errors:
            lines.append(f"- {md_escape(metric)} — {s}: {md_escape(e)}")
    if args.breakdown and os.path.exists(args.breakdown):
        lines.append("")
        lines.append("## Where `docker run --rm busybox true` spends its time in berth")
        lines.append("")
        lines.append(open(args.breakdown).read().rstrip())
    if args.pull and os.path.exists(args.pull):
        lines.append("")
        lines.append("## bench/pull.sh")
        lines.append("")
        lines.append("```")
        lines.append(open(args.pull).read().rstrip())
        lines.append("```")
    if args.rootless and os.path.exists(args.rootless) and os.path.getsize(args.rootless):
        lines.append("")
        lines.append(open(args.rootless).read().rstrip())
    if args.vm and os.path.exists(args.vm) and os.path.getsize(args.vm):
        lines.append("")
        lines.append(open(args.vm).read().rstrip())
    with open(args.md, "w") as f:
        f.write("\n".join(lines) + "\n")

    with open(args.tsv, "w") as f:
        for k, v in facts.items():
            f.write(f"# {k}\t{v}\n")
        f.write("key\tmetric\tunit\tberth\tdockerd\tberth/dockerd\ttarget\terror\n")
        for r in rows:
            rt = ratio(r)
            err = "; ".join(f"{s}: {r[s + '_error']}" for s in SIDES if r.get(s + "_error"))
            val = lambda s: "failed" if r.get(s) is None and r.get(s + "_error") else (
                "" if r.get(s) is None else f"{r[s]:.3f}")
            f.write("\t".join([r["key"], r["metric"].replace("\t", " "), r["unit"], val("berth"),
                               val("dockerd"), "" if rt is None else f"{rt:.3f}",
                               r.get("target") or "", err.replace("\t", " ")]) + "\n")
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--config", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--raw", default=tempfile.gettempdir())
    r = sub.add_parser("report")
    r.add_argument("--results", required=True)
    r.add_argument("--facts", required=True)
    r.add_argument("--breakdown")
    r.add_argument("--pull")
    r.add_argument("--rootless")
    r.add_argument("--vm")
    r.add_argument("--md", required=True)
    r.add_argument("--tsv", required=True)
    args = ap.parse_args()
    return cmd_measure(args) if args.cmd == "measure" else cmd_report(args)


if __name__ == "__main__":
    sys.exit(main())
