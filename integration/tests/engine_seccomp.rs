//! The default seccomp profile: `unshare`, `mount` and `keyctl` fail with EPERM in a default
//! container, while ordinary programs run; with `seccomp=unconfined` the same calls get past
//! the filter.
//!
//! busybox has no `keyctl`, so this test binary doubles as the probe: run inside the container
//! (with the host's libc bind-mounted read-only) with `BERTH_SECCOMP_PROBE=1`, the test
//! `seccomp_probe` makes the raw syscalls and prints what they returned.

use std::path::Path;

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;

const PROBE_ENV: &str = "BERTH_SECCOMP_PROBE";

fn outcome(ret: libc::c_long) -> String {
    if ret >= 0 {
        "ok".into()
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => "EPERM".into(),
            Some(e) => format!("errno{e}"),
            None => "error".into(),
        }
    }
}

/// Not a test of its own: the probe the container runs.
#[test]
fn seccomp_probe() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mode = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    // SAFETY: raw syscalls with constant arguments and no pointers, except mount's, whose
    // strings are NUL-terminated literals that outlive the call.
    let (unshare, keyctl, mount) = unsafe {
        let unshare = libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER);
        let unshare = outcome(unshare);
        // KEYCTL_GET_KEYRING_ID (0) of the session keyring (-3), creating it.
        let keyctl = outcome(libc::syscall(libc::SYS_keyctl, 0, -3i64, 1));
        let mount = outcome(libc::syscall(
            libc::SYS_mount,
            c"none".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null::<u8>(),
        ));
        (unshare, keyctl, mount)
    };
    println!("PROBE seccomp={mode} unshare={unshare} keyctl={keyctl} mount={mount}");
}

fn probe_config() -> Result<(pb::ContainerConfig, Vec<pb::MountSpec>)> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().unwrap().display().to_string();
    let name = exe.file_name().unwrap().to_string_lossy().into_owned();
    let mut cfg = busybox(&[]);
    cfg.entrypoint = Some(berth_proto::berth::types::v1::StringList {
        values: vec![
            format!("/probe/{name}"),
            "--exact".into(),
            "seccomp_probe".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ],
    });
    cfg.cmd = None;
    cfg.env = vec![format!("{PROBE_ENV}=1")];
    let bind = |src: &str, dst: &str| pb::MountSpec {
        r#type: pb::MountType::Bind.into(),
        source: src.into(),
        target: dst.into(),
        read_only: true,
        ..Default::default()
    };
    let mut mounts = vec![bind(&dir, "/probe")];
    for (host, ctr) in [
        ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"),
        ("/usr/lib64", "/lib64"),
    ] {
        if Path::new(host).exists() {
            mounts.push(bind(host, ctr));
        }
    }
    Ok((cfg, mounts))
}

fn probe_line(stdout: &str) -> String {
    // The test harness prints its own text on the same line.
    stdout
        .lines()
        .find_map(|l| l.find("PROBE ").map(|i| l[i..].to_string()))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_profile_blocks_unshare_mount_and_keyctl() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;

    // Ordinary programs run under the profile.
    let r = es
        .run(
            &unique("ordinary"),
            busybox(&["sh", "-c", "ls / >/dev/null && cat /etc/passwd | wc -l && sleep 0.1 && grep Seccomp: /proc/self/status"]),
            Default::default(),
        )
        .await?;
    ensure!(r.exit_code == 0, "{r:?}");
    ensure!(r.stdout.contains("Seccomp:\t2"), "{r:?}");
    // busybox's own applets hit the filter too.
    let r = es
        .run(
            &unique("bb"),
            busybox(&["unshare", "-U", "true"]),
            Default::default(),
        )
        .await?;
    ensure!(
        r.exit_code != 0 && r.stderr.contains("Operation not permitted"),
        "{r:?}"
    );

    let (cfg, mounts) = probe_config()?;
    let host = pb::HostConfig {
        mounts: mounts.clone(),
        ..Default::default()
    };
    let r = es.run(&unique("probe"), cfg.clone(), host).await?;
    let line = probe_line(&r.stdout);
    println!("default profile: {line}");
    ensure!(
        line == "PROBE seccomp=2 unshare=EPERM keyctl=EPERM mount=EPERM",
        "{r:?}"
    );

    // Unconfined: the filter is gone; keyctl succeeds (mount still needs CAP_SYS_ADMIN).
    let host = pb::HostConfig {
        mounts,
        security: Some(pb::SecurityOptions {
            seccomp_profile: "unconfined".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = es.run(&unique("unconfined"), cfg, host).await?;
    let line = probe_line(&r.stdout);
    println!("unconfined: {line}");
    ensure!(line.starts_with("PROBE seccomp=0 "), "{r:?}");
    ensure!(line.contains("keyctl=ok"), "{r:?}");
    // unshare(CLONE_NEWUSER) now reaches the kernel, which refuses it for its own reason
    // (EINVAL: the probe is multi-threaded), not the filter's EPERM.
    ensure!(!line.contains("unshare=EPERM"), "{r:?}");
    Ok(())
}
