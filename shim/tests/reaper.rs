//! The subreaper, in a process of its own (it reaps every child of the process, so it must not
//! share one with other tests).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_shim::reaper::{Reaper, Spawner};

#[test]
fn reaps_children_and_adopted_grandchildren_and_names_what_fails_to_start() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let reaper = Reaper::new();
        tokio::spawn(reaper.run().unwrap());
        let t = Duration::from_secs(10);

        let (_, exit) = reaper.spawn(&mut Command::new("/bin/true")).unwrap();
        assert_eq!(
            tokio::time::timeout(t, exit).await.unwrap().unwrap().status,
            0
        );
        let (_, exit) = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "exit 3"]))
            .unwrap();
        assert_eq!(
            tokio::time::timeout(t, exit).await.unwrap().unwrap().status,
            3
        );
        let (pid, exit) = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "kill -TERM $$"]))
            .unwrap();
        let exit = tokio::time::timeout(t, exit).await.unwrap().unwrap();
        assert_eq!((exit.pid, exit.status), (pid, 143));

        // A grandchild whose parent exits is re-parented to us (the subreaper) and reaped; its
        // status is kept even though nobody watched it yet when it exited.
        // The grandchild outlives its parent, so the parent cannot reap it first.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "(sleep 0.3; exit 9) & echo $!"])
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // Read the pid line only: the grandchild holds stdout until it exits.
        let mut stdout = child.stdout.take().unwrap();
        let mut out = String::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            out.push(byte[0] as char);
        }
        let grandchild: u32 = out.trim().parse().unwrap();
        // Let it exit and be reaped before anyone watches it.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let exit = tokio::time::timeout(t, reaper.watch(grandchild))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((exit.pid, exit.status), (grandchild, 9));
        drop(child);

        // (In the same test: a second reaper in this process would race this one.)
        let err = reaper
            .spawn(&mut Command::new("/nonexistent/runc"))
            .unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::NotFound);
        assert!(err.message().contains("/nonexistent/runc"));
    });
}
