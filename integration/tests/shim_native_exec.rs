//! Native exec (the shim joins the container itself) against real `runc exec`: for the same
//! running container, with a Docker-like seccomp profile, capabilities, rlimits and
//! no_new_privs, a process started by `runc exec` and one started by the shim see the same
//! capabilities, NoNewPrivs/Seccomp status, ids and groups, cgroups, namespaces, environment,
//! working directory and rlimits, and denied syscalls fail the same way. Needs root; skips
//! otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use berth_integration::shim_kit::{Client, ShimTest, attach, skip};
use berth_proto::berth::shim::v1 as pb;

const T: Duration = Duration::from_secs(20);

/// What the probe prints: everything a process inherits from how it was started.
const PROBE: &str = r#"
grep -E '^(Cap|NoNewPrivs|Seccomp|Groups|Uid|Gid)' /proc/self/status
id; cat /proc/self/cgroup; for n in /proc/self/ns/*; do echo "$n $(readlink $n)"; done
env | sort; pwd; echo "nofile=$(ulimit -n)"; ulimit -u; cat /proc/self/oom_score_adj; umask
unshare -U true 2>&1; echo "unshare=$?"
mount -t tmpfs x /mnt 2>&1; echo "mount=$?"
linux32 true 2>&1; echo "personality=$?"
linux64 true 2>&1; echo "personality64=$?"
"#;

/// The probe's output without its `nofile=` line, and that line's value.
fn take_nofile(out: &str) -> (String, String) {
    let mut value = String::new();
    let rest: Vec<&str> = out
        .lines()
        .filter(|l| match l.strip_prefix("nofile=") {
            Some(v) => {
                value = v.to_string();
                false
            }
            None => true,
        })
        .collect();
    (rest.join("\n"), value)
}

/// Every syscall name the host headers know, except those the profile denies.
fn allowed_names(denied: &[&str]) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for h in ["unistd_64.h", "unistd_32.h"] {
        let text = std::fs::read_to_string(Path::new("/usr/include/x86_64-linux-gnu/asm").join(h))
            .unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("#define __NR_")
                && let Some(name) = rest.split_whitespace().next()
                && !denied.contains(&name)
            {
                names.insert(name.to_string());
            }
        }
    }
    names.into_iter().collect()
}

/// A Docker-like profile: default EPERM, an allow-list, personality by value, clone without
/// namespace flags, clone3 → ENOSYS.
fn profile() -> serde_json::Value {
    let denied = [
        "unshare",
        "mount",
        "umount2",
        "keyctl",
        "add_key",
        "request_key",
        "setns",
        "pivot_root",
        "personality",
        "clone",
        "clone3",
        "reboot",
        "kexec_load",
    ];
    serde_json::json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        "syscalls": [
            {"names": allowed_names(&denied), "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 4294967295u64, "op": "SCMP_CMP_EQ"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 2114060288u64, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
        ]
    })
}

fn process(user: (u32, u32, &[u32]), cwd: &str) -> serde_json::Value {
    let caps = [
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_NET_BIND_SERVICE",
    ];
    serde_json::json!({
        "terminal": false,
        "user": {"uid": user.0, "gid": user.1, "additionalGids": user.2},
        "args": ["sh", "-c", PROBE],
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "B=2", "A=1"],
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                         "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256},
                    {"type": "RLIMIT_NPROC", "hard": 300, "soft": 200}],
        "noNewPrivileges": true
    })
}

/// Runs `spec` with `runc exec` directly and returns its stdout.
fn runc_exec(t: &ShimTest, spec: &serde_json::Value) -> Result<String> {
    let file = t.dir.path().join("probe.json");
    std::fs::write(&file, serde_json::to_vec(spec)?)?;
    let out = Command::new("runc")
        .arg("--root")
        .arg(&t.runtime_root)
        .arg("exec")
        .arg("--process")
        .arg(&file)
        .arg(&t.id)
        .output()
        .context("runc exec")?;
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs `spec` through the shim (native exec) and returns its stdout.
async fn shim_exec(c: &mut Client, id: &str, spec: &serde_json::Value) -> Result<String> {
    run_exec(c, id, spec, false).await
}

/// Runs `echo hi` on a pty through the shim and returns what the terminal gave back: runc
/// leaves the pty's settings as the kernel makes them (`onlcr`: "\r\n"), and Docker's
/// `exec -t` shows that.
async fn tty_echo(c: &mut Client, id: &str) -> Result<String> {
    let spec = serde_json::json!({
        "terminal": true,
        "args": ["echo", "hi"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
    });
    run_exec(c, id, &spec, true).await
}

/// Execs `spec` (on a pty with `terminal`), attached from its start, and returns its output.
async fn run_exec(
    c: &mut Client,
    id: &str,
    spec: &serde_json::Value,
    terminal: bool,
) -> Result<String> {
    c.exec(pb::ExecRequest {
        exec_id: id.into(),
        spec: serde_json::to_vec(spec)?,
        terminal,
        ..Default::default()
    })
    .await?;
    let attached = attach(
        c,
        pb::AttachOptions {
            exec_id: id.into(),
            stdout: true,
            stderr: !terminal,
            stream: true,
            ..Default::default()
        },
    )
    .await?;
    c.start(pb::StartRequest { exec_id: id.into() }).await?;
    let (text, _, _) = attached.collect(T).await?;
    tokio::time::timeout(T, c.wait(pb::WaitRequest { exec_id: id.into() })).await??;
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_exec_matches_runc_exec() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("nexec", &["sleep", "1000"], false)?;
    let config_path = t.bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["linux"]["seccomp"] = profile();
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;

    let cases = [
        ("root", process((0, 0, &[]), "/")),
        ("user", process((1000, 1000, &[10, 20]), "/tmp")),
    ];
    for (name, spec) in &cases {
        let want = runc_exec(&t, spec)?;
        let got = shim_exec(&mut c, name, spec).await?;
        assert!(want.contains("Seccomp:\t2"), "runc: {want}");
        assert!(want.contains("NoNewPrivs:\t1"), "runc: {want}");
        assert!(want.contains("unshare=1"), "runc: {want}");
        assert!(want.contains("personality=1"), "runc: {want}");
        assert!(want.contains("personality64=0"), "runc: {want}");
        // runc 1.1 applies an exec process's rlimits from the outside (prlimit) while that
        // process's Go runtime (runc init, Go >= 1.19) may still be raising its soft NOFILE
        // limit to the hard one, so runc exec shows the spec's soft limit or the hard one,
        // depending on timing. Native exec must give the spec's.
        let (want, runc_nofile) = take_nofile(&want);
        let (got, native_nofile) = take_nofile(&got);
        assert_eq!(
            native_nofile, "256",
            "{name}: native exec RLIMIT_NOFILE (soft)"
        );
        assert!(
            ["256", "512"].contains(&runc_nofile.as_str()),
            "{name}: runc exec RLIMIT_NOFILE {runc_nofile}"
        );
        assert_eq!(got, want, "{name}: native exec differs from runc exec");
    }
    assert_eq!(tty_echo(&mut c, "tty").await?, "hi\r\n");
    let log = t.shim_log();
    assert!(
        log.lines()
            .filter(|l| l.contains("exec started") && l.contains("native=true"))
            .count()
            == 3,
        "every exec was native:\n{log}"
    );

    // A missing program fails Start with runc's message (so Docker's exit code is 127).
    c.exec(pb::ExecRequest {
        exec_id: "missing".into(),
        spec: serde_json::to_vec(&serde_json::json!({
            "args": ["nosuchprogram"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
        }))?,
        ..Default::default()
    })
    .await?;
    let err = c
        .start(pb::StartRequest {
            exec_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("executable file not found in $PATH"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_can_be_forced_through_runc() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("rexec", &["sleep", "1000"], false)?;
    let mut cmd = t.start_command();
    cmd.env("BERTH_SHIM_EXEC", "runc");
    let out = cmd.output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.adopt(String::from_utf8(out.stdout)?.trim())?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    let got = shim_exec(&mut c, "e1", &process((0, 0, &[]), "/")).await?;
    assert!(got.contains("uid=0(root)"), "{got}");
    assert_eq!(tty_echo(&mut c, "tty").await?, "hi\r\n", "runc's pty");
    assert!(t.shim_log().contains("native=false"), "{}", t.shim_log());
    Ok(())
}
