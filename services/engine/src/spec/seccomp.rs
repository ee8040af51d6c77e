//! berth's default seccomp profile: an allow-list with every other syscall failing with EPERM,
//! equivalent in effect to Docker's default profile.
//!
//! What it keeps out of unprivileged containers: new namespaces (`unshare`, `setns`, `clone`
//! with namespace flags, `clone3` answers ENOSYS so libcs fall back to `clone`), mounting
//! (`mount`, `umount2`, the new mount API, `pivot_root`), the kernel keyring (`keyctl`,
//! `add_key`, `request_key`), kernel modules, `kexec`, `reboot`, swap, `bpf`,
//! `perf_event_open`, `userfaultfd`, `open_by_handle_at`, clock and accounting changes,
//! `personality` except the harmless personas. Capabilities granted with `--cap-add` open the
//! syscalls they are needed for, as in Docker (e.g. `SYS_ADMIN` allows mount and unshare).

use std::collections::BTreeSet;

use berth_core::{Error, Result};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// EPERM: what a refused syscall returns.
const EPERM: u32 = 1;
/// ENOSYS: what `clone3` returns, so that glibc and musl fall back to `clone`.
const ENOSYS: u32 = 38;
/// Namespace flags `clone` may not carry without SYS_ADMIN:
/// NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET.
const CLONE_NS_FLAGS: u64 = 0x7E02_0000;

/// Allowed for everyone.
const ALWAYS: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "get_robust_list",
    "get_thread_area",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ioctl",
    "ioprio_get",
    "ioprio_set",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "process_vm_readv",
    "process_vm_writev",
    "pselect6",
    "pselect6_time64",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_thread_area",
    "set_tid_address",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "setsid",
    "setsockopt",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socket",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed when the container holds the capability.
const BY_CAPABILITY: &[(&str, &[&str])] = &[
    (
        "SYS_ADMIN",
        &[
            "bpf",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    ("SYS_BOOT", &["reboot"]),
    ("SYS_CHROOT", &["chroot"]),
    (
        "SYS_MODULE",
        &["delete_module", "init_module", "finit_module"],
    ),
    ("SYS_PACCT", &["acct"]),
    ("SYS_PTRACE", &["kcmp", "pidfd_getfd", "process_madvise"]),
    ("SYS_RAWIO", &["iopl", "ioperm"]),
    (
        "SYS_TIME",
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    ("SYS_TTY_CONFIG", &["vhangup"]),
    (
        "SYS_NICE",
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    ("SYSLOG", &["syslog"]),
    ("BPF", &["bpf"]),
    ("PERFMON", &["perf_event_open"]),
];

/// `personality` values that are allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32
/// and the query value.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

fn syscall(names: Vec<String>, action: LinuxSeccompAction) -> LinuxSyscall {
    LinuxSyscallBuilder::default()
        .names(names)
        .action(action)
        .build()
        .expect("syscall rule builds")
}

/// The default profile for a container holding `caps` (bare capability names).
pub fn default_profile(caps: &BTreeSet<String>, x32: bool) -> LinuxSeccomp {
    let mut allowed: BTreeSet<&str> = ALWAYS.iter().copied().collect();
    for (cap, names) in BY_CAPABILITY {
        if caps.contains(*cap) {
            allowed.extend(names.iter().copied());
        }
    }
    let sys_admin = caps.contains("SYS_ADMIN");
    let mut rules = vec![syscall(
        allowed.iter().map(|s| s.to_string()).collect(),
        LinuxSeccompAction::ScmpActAllow,
    )];
    for value in PERSONALITIES {
        let mut rule = syscall(vec!["personality".into()], LinuxSeccompAction::ScmpActAllow);
        rule.set_args(Some(vec![
            LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(*value)
                .op(LinuxSeccompOperator::ScmpCmpEq)
                .build()
                .expect("arg builds"),
        ]));
        rules.push(rule);
    }
    if sys_admin {
        rules.push(syscall(
            vec!["clone".into()],
            LinuxSeccompAction::ScmpActAllow,
        ));
    } else {
        // clone without any namespace flag: (flags & mask) == 0.
        let mut rule = syscall(vec!["clone".into()], LinuxSeccompAction::ScmpActAllow);
        rule.set_args(Some(vec![
            LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(CLONE_NS_FLAGS)
                .value_two(0u64)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()
                .expect("arg builds"),
        ]));
        rules.push(rule);
        let mut rule = syscall(vec!["clone3".into()], LinuxSeccompAction::ScmpActErrno);
        rule.set_errno_ret(Some(ENOSYS));
        rules.push(rule);
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(if x32 {
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
        } else {
            vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86]
        })
        .syscalls(rules)
        .build()
        .expect("seccomp profile builds")
}

/// A profile given as JSON (Docker's `--security-opt seccomp=<contents>`): either an OCI
/// `LinuxSeccomp` object or Docker's profile format with `defaultAction`, `syscalls` (with
/// `names` or `name`) and `architectures` / `archMap`.
pub fn parse_profile(json: &str) -> Result<LinuxSeccomp> {
    let invalid =
        |e: serde_json::Error| Error::invalid_argument("invalid seccomp profile").with_source(e);
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(invalid)?;
    if let Some(obj) = value.as_object_mut() {
        // Docker's format names architectures through archMap; keep the main ones.
        if let Some(map) = obj.remove("archMap")
            && !obj.contains_key("architectures")
        {
            let arches: Vec<serde_json::Value> = map
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| {
                    let mut v = vec![e.get("architecture").cloned().unwrap_or_default()];
                    v.extend(
                        e.get("subArchitectures")
                            .and_then(|s| s.as_array().cloned())
                            .unwrap_or_default(),
                    );
                    v
                })
                .filter(|v| v.is_string())
                .collect();
            obj.insert("architectures".into(), arches.into());
        }
        obj.remove("defaultErrno");
        if let Some(rules) = obj.get_mut("syscalls").and_then(|s| s.as_array_mut()) {
            for rule in rules.iter_mut().filter_map(|r| r.as_object_mut()) {
                if let Some(name) = rule.remove("name")
                    && !rule.contains_key("names")
                {
                    rule.insert("names".into(), vec![name].into());
                }
                // Docker's conditional keys have no OCI equivalent.
                for k in ["includes", "excludes", "comment"] {
                    rule.remove(k);
                }
            }
        }
    }
    serde_json::from_value(value).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp) -> BTreeSet<String> {
        p.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow && r.args().is_none())
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn unprivileged_default_blocks_namespaces_mounts_and_keyrings() {
        let caps: BTreeSet<String> = crate::spec::caps::DEFAULT
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = default_profile(&caps, true);
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(p.default_errno_ret(), Some(EPERM));
        let ok = allowed(&p);
        for blocked in [
            "unshare",
            "mount",
            "umount2",
            "keyctl",
            "add_key",
            "request_key",
            "setns",
            "bpf",
            "kexec_load",
            "reboot",
            "init_module",
            "pivot_root",
            "swapon",
            "userfaultfd",
            "open_by_handle_at",
            "perf_event_open",
            "clock_settime",
            "personality",
            "clone",
        ] {
            assert!(
                !ok.contains(blocked),
                "{blocked} must not be allowed unconditionally"
            );
        }
        for needed in [
            "read", "write", "execve", "openat", "socket", "futex", "chroot", "wait4",
        ] {
            assert!(ok.contains(needed), "{needed}");
        }
        // clone only without namespace flags; clone3 answers ENOSYS.
        let rules = p.syscalls().as_ref().unwrap();
        let clone = rules.iter().find(|r| r.names() == &["clone"]).unwrap();
        let arg = &clone.args().as_ref().unwrap()[0];
        assert_eq!(arg.value(), CLONE_NS_FLAGS);
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        let clone3 = rules.iter().find(|r| r.names() == &["clone3"]).unwrap();
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));
    }

    #[test]
    fn sys_admin_opens_mount_and_unshare_but_not_keyctl() {
        let mut caps: BTreeSet<String> = crate::spec::caps::DEFAULT
            .iter()
            .map(|s| s.to_string())
            .collect();
        caps.insert("SYS_ADMIN".into());
        let ok = allowed(&default_profile(&caps, true));
        assert!(ok.contains("mount") && ok.contains("unshare") && ok.contains("clone"));
        assert!(!ok.contains("keyctl"));
    }

    #[test]
    fn serializes_as_oci() {
        let p = default_profile(&BTreeSet::new(), true);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["architectures"][0], "SCMP_ARCH_X86_64");
        assert!(json["syscalls"][0]["names"].as_array().unwrap().len() > 300);
    }

    #[test]
    fn custom_profiles_in_both_formats() {
        let oci = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#;
        let p = parse_profile(oci).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let docker = r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,
            "archMap":[{"architecture":"SCMP_ARCH_X86_64","subArchitectures":["SCMP_ARCH_X86"]}],
            "syscalls":[{"name":"read","action":"SCMP_ACT_ALLOW","includes":{},"comment":""}]}"#;
        let p = parse_profile(docker).unwrap();
        assert_eq!(p.architectures().as_ref().unwrap().len(), 2);
        assert_eq!(p.syscalls().as_ref().unwrap()[0].names(), &["read"]);
        assert!(parse_profile("{").is_err());
    }
}
