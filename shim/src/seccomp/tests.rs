use super::*;

/// A Docker-like profile: allow-list, personality values, clone without namespace flags,
/// clone3 → ENOSYS, default EPERM.
const DOCKERISH: &str = r#"{
  "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
  "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
  "syscalls": [
    {"names": ["read", "write", "exit_group", "execve", "openat", "socketcall", "_llseek",
               "arch_prctl", "not_a_syscall"], "action": "SCMP_ACT_ALLOW"},
    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 0, "value": 4294967295, "op": "SCMP_CMP_EQ"}]},
    {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
     "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
  ]
}"#;

fn nr(arch: Arch, name: &str) -> u32 {
    arch.number(name).unwrap()
}

#[test]
fn tables_are_sorted_and_know_the_usual_names() {
    for t in [syscalls::X86_64, syscalls::I386, syscalls::X32] {
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
    }
    assert_eq!(nr(Arch::X86_64, "read"), 0);
    assert_eq!(nr(Arch::I386, "read"), 3);
    assert_eq!(nr(Arch::X32, "read"), X32_SYSCALL_BIT);
    assert_eq!(nr(Arch::I386, "_llseek"), 140);
    assert!(Arch::X86_64.number("_llseek").is_none());
}

#[test]
fn the_docker_like_profile_decides_as_runc_does() {
    let p: Profile = serde_json::from_str(DOCKERISH).unwrap();
    let r = resolve(&p).unwrap();
    let f = compile(&r).unwrap();
    let x = AUDIT_ARCH_X86_64;
    let no = [0u64; 6];
    let eperm = RET_ERRNO | EPERM;
    let run = |arch, n, args: &[u64; 6]| run(&f.program, arch, n, args);
    assert_eq!(run(x, 0, &no), RET_ALLOW);
    assert_eq!(run(x, nr(Arch::X86_64, "mount"), &no), eperm);
    assert_eq!(run(x, nr(Arch::X86_64, "clone3"), &no), RET_ERRNO | ENOSYS);
    // Newer than anything the profile names: ENOSYS (runc's stub).
    assert_eq!(run(x, 1000, &no), RET_ERRNO | ENOSYS);
    let pers = nr(Arch::X86_64, "personality");
    assert_eq!(run(x, pers, &no), RET_ALLOW);
    assert_eq!(run(x, pers, &[0xffff_ffff, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(run(x, pers, &[8, 0, 0, 0, 0, 0]), eperm);
    // 64-bit comparison: the high half matters on x86_64 ...
    assert_eq!(run(x, pers, &[0x1_0000_0000, 0, 0, 0, 0, 0]), eperm);
    // ... but not on i386, where arguments are 32 bits.
    let i = AUDIT_ARCH_I386;
    let pers32 = nr(Arch::I386, "personality");
    assert_eq!(run(i, pers32, &[0x1_0000_0000, 0, 0, 0, 0, 0]), RET_ALLOW);
    let clone = nr(Arch::X86_64, "clone");
    assert_eq!(run(x, clone, &[0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(run(x, clone, &[0x1000_0000, 0, 0, 0, 0, 0]), eperm); // CLONE_NEWUSER
    assert_eq!(run(i, nr(Arch::I386, "_llseek"), &no), RET_ALLOW);
    assert_eq!(run(i, nr(Arch::I386, "mount"), &no), eperm);
    // x32 is not listed: killed, like an unknown architecture.
    assert_eq!(run(x, X32_SYSCALL_BIT, &no), RET_KILL_THREAD);
    assert_eq!(run(0xc000_00b7, 0, &no), RET_KILL_THREAD); // aarch64
}

#[test]
fn permissive_defaults_get_no_enosys_stub() {
    let p: Profile = serde_json::from_str(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    let f = compile(&resolve(&p).unwrap()).unwrap();
    assert_eq!(run(&f.program, AUDIT_ARCH_X86_64, 1000, &[0; 6]), RET_ALLOW);
    assert_eq!(
        run(&f.program, AUDIT_ARCH_X86_64, 83, &[0; 6]),
        RET_ERRNO | EPERM
    );
    // Only x86_64 is listed: i386 is an unknown architecture.
    assert_eq!(run(&f.program, AUDIT_ARCH_I386, 3, &[0; 6]), 0);
}

#[test]
fn unsupported_parts_are_refused() {
    for json in [
        r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","listenerPath":"/run/x.sock"}"#,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","flags":["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}"#,
    ] {
        assert!(compile_json(json.as_bytes()).is_err(), "{json}");
    }
}

/// xorshift64*: deterministic pseudo-random numbers for the fuzz tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

const OPS: [&str; 7] = [
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
];
const ACTIONS: [&str; 6] = [
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_LOG",
    "SCMP_ACT_KILL_PROCESS",
];

/// Interesting 64-bit values: around 0, 2^32, the high bit, and random.
fn value(rng: &mut Rng) -> u64 {
    let base = *rng.pick(&[0u64, 1, 0xffff_ffff, 0x1_0000_0000, 1 << 63, u64::MAX]);
    match rng.below(4) {
        0 => base,
        1 => base.wrapping_add(rng.below(3) as u64).wrapping_sub(1),
        2 => rng.next() & 0xff,
        _ => rng.next(),
    }
}

fn random_profile(rng: &mut Rng) -> (serde_json::Value, Vec<u64>) {
    let names: Vec<&str> = syscalls::X86_64.iter().map(|(n, _)| *n).take(60).collect();
    let mut constants = Vec::new();
    let mut rules = Vec::new();
    for _ in 0..rng.below(25) {
        let mut args = Vec::new();
        for _ in 0..rng.below(4) {
            let (v, v2) = (value(rng), value(rng));
            constants.extend([v, v2]);
            args.push(serde_json::json!({
                "index": rng.below(3), "value": v, "valueTwo": v2, "op": rng.pick(&OPS)
            }));
        }
        let n = 1 + rng.below(3);
        let rule_names: Vec<&str> = (0..n).map(|_| *rng.pick(&names)).collect();
        rules.push(serde_json::json!({
            "names": rule_names, "action": rng.pick(&ACTIONS),
            "errnoRet": rng.below(5), "args": args
        }));
    }
    let arches: Vec<&str> = match rng.below(3) {
        0 => vec!["SCMP_ARCH_X86_64"],
        1 => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
        _ => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    };
    let p = serde_json::json!({
        "defaultAction": rng.pick(&ACTIONS), "defaultErrnoRet": rng.below(3) + 1,
        "architectures": arches, "syscalls": rules
    });
    (p, constants)
}

#[test]
fn compiled_programs_agree_with_the_profile_on_random_inputs() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let arches = [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, 0xc000_00b7];
    let mut checked = 0;
    for _ in 0..300 {
        let (json, constants) = random_profile(&mut rng);
        let p: Profile = serde_json::from_value(json.clone()).unwrap();
        let r = resolve(&p).unwrap();
        let f = compile(&r).unwrap();
        // The numbers with rules, some neighbours, x32 numbers and random ones.
        let mut nrs: Vec<u32> = r.rules.values().flat_map(|m| m.keys().copied()).collect();
        nrs.extend([
            0,
            1,
            59,
            60,
            61,
            400,
            1000,
            X32_SYSCALL_BIT,
            X32_SYSCALL_BIT | 1,
        ]);
        for _ in 0..800 {
            let nr = *rng.pick(&nrs);
            let mut args = [0u64; 6];
            for a in args.iter_mut().take(3) {
                *a = if constants.is_empty() || rng.below(3) == 0 {
                    value(&mut rng)
                } else {
                    let c = *rng.pick(&constants);
                    c.wrapping_add(rng.below(3) as u64).wrapping_sub(1) & rng.pick(&[u64::MAX, c])
                };
            }
            let arch = *rng.pick(&arches);
            let want = r.decide(arch, nr, &args);
            let got = run(&f.program, arch, nr, &args);
            assert_eq!(
                got, want,
                "profile {json} arch {arch:#x} nr {nr} args {args:x?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 240_000);
}

#[test]
fn rules_follow_runc_precedence() {
    let p: Profile = serde_json::from_str(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
          {"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
          {"names":["write"],"action":"SCMP_ACT_TRAP","args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
          {"names":["write"],"action":"SCMP_ACT_ALLOW"},
          {"names":["close"],"action":"SCMP_ACT_ALLOW","args":[
             {"index":0,"value":1,"op":"SCMP_CMP_EQ"},{"index":0,"value":2,"op":"SCMP_CMP_EQ"}]}
        ]}"#,
    )
    .unwrap();
    let r = resolve(&p).unwrap();
    // The rule equal to the default action is dropped; the unconditional rule wins; a rule
    // comparing one argument twice is an OR.
    assert!(!r.rules[&Arch::X86_64].contains_key(&0));
    assert_eq!(
        r.decide(AUDIT_ARCH_X86_64, 1, &[1, 0, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        r.decide(AUDIT_ARCH_X86_64, 3, &[2, 0, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        r.decide(AUDIT_ARCH_X86_64, 3, &[3, 0, 0, 0, 0, 0]),
        RET_ERRNO | EPERM
    );
}
