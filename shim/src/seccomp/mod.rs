//! Compiles an OCI `linux.seccomp` profile into a classic BPF program with the semantics runc
//! (libseccomp 2.5 plus runc's `patchbpf` ENOSYS stub) gives it, so that the shim can install
//! the container's filter on a natively executed process without running runc.
//!
//! The program, per architecture listed in the profile (x86_64, i386, x32):
//!
//! ```text
//! ld arch; jeq AUDIT_ARCH_X86_64 → x86_64 (x32 when the x32 bit is set and x32 is listed)
//!          jeq AUDIT_ARCH_I386   → i386;  else → kill (libseccomp's bad-arch action)
//! section: ld nr; [x86_64 without x32: nr ≥ x32 bit → kill]
//!          [runc stub: nr > highest syscall the profile names → ERRNO(ENOSYS)]
//!          for each syscall with rules: jeq nr → its rules (argument checks, in profile
//!          order, on 64-bit values as two 32-bit halves; i386 compares the low half only)
//!          → the default action
//! ```
//!
//! Like runc: names unknown on an architecture are skipped there; a rule whose action equals
//! the default is dropped; a rule comparing one argument index twice becomes one rule per
//! comparison (OR); an unconditional rule for a syscall wins over its conditional ones. Not
//! covered (the caller falls back to `runc exec`): `SCMP_ACT_NOTIFY`, listener paths,
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER`, architectures other than the three above, and i386's
//! multiplexed `socketcall`/`ipc` argument rules.

pub mod syscalls;

use std::collections::BTreeMap;

use berth_core::{Error, Result};
use serde::Deserialize;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `AUDIT_ARCH_I386`.
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// Set in x32 syscall numbers.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The OCI `LinuxSeccomp` object (the parts that matter for the filter).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// Action for syscalls no rule matches.
    pub default_action: String,
    /// Errno for an `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE` default (EPERM when absent).
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    /// `SCMP_ARCH_*` names.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `SECCOMP_FILTER_FLAG_*` names.
    #[serde(default)]
    pub flags: Vec<String>,
    /// A seccomp-notify listener (not supported natively).
    #[serde(default)]
    pub listener_path: Option<String>,
    /// Rules, in order.
    #[serde(default)]
    pub syscalls: Vec<SyscallRule>,
}

/// One `syscalls[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyscallRule {
    /// Syscall names.
    pub names: Vec<String>,
    /// `SCMP_ACT_*`.
    pub action: String,
    /// Errno (or trace message) for `SCMP_ACT_ERRNO`/`SCMP_ACT_TRACE`.
    #[serde(default)]
    pub errno_ret: Option<u32>,
    /// Argument comparisons, all of which must hold.
    #[serde(default)]
    pub args: Vec<ArgCmp>,
}

/// One argument comparison.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArgCmp {
    /// Argument index, 0–5.
    pub index: usize,
    /// The operand (the mask, for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The expected value for `SCMP_CMP_MASKED_EQ`.
    #[serde(default)]
    pub value_two: u64,
    /// `SCMP_CMP_*`.
    pub op: Op,
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Op {
    /// `!=`
    #[serde(rename = "SCMP_CMP_NE")]
    Ne,
    /// `<`
    #[serde(rename = "SCMP_CMP_LT")]
    Lt,
    /// `<=`
    #[serde(rename = "SCMP_CMP_LE")]
    Le,
    /// `==`
    #[serde(rename = "SCMP_CMP_EQ")]
    Eq,
    /// `>=`
    #[serde(rename = "SCMP_CMP_GE")]
    Ge,
    /// `>`
    #[serde(rename = "SCMP_CMP_GT")]
    Gt,
    /// `(arg & value) == value_two`
    #[serde(rename = "SCMP_CMP_MASKED_EQ")]
    MaskedEq,
}

/// A compiled filter, ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The program.
    pub program: Vec<libc::sock_filter>,
    /// `SECCOMP_FILTER_FLAG_*` bits.
    pub flags: u32,
}

/// The architectures a filter can cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arch {
    /// x86_64 (`AUDIT_ARCH_X86_64`, x32 bit clear).
    X86_64,
    /// i386 (`AUDIT_ARCH_I386`).
    I386,
    /// x32 (`AUDIT_ARCH_X86_64`, x32 bit set).
    X32,
}

impl Arch {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "SCMP_ARCH_X86_64" => Ok(Self::X86_64),
            "SCMP_ARCH_X86" => Ok(Self::I386),
            "SCMP_ARCH_X32" => Ok(Self::X32),
            other => Err(unsupported(format!("architecture {other}"))),
        }
    }

    fn table(self) -> &'static [(&'static str, u32)] {
        match self {
            Self::X86_64 => syscalls::X86_64,
            Self::I386 => syscalls::I386,
            Self::X32 => syscalls::X32,
        }
    }

    /// The syscall number of `name` on this architecture (with the x32 bit for x32).
    pub fn number(self, name: &str) -> Option<u32> {
        let t = self.table();
        t.binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .map(|i| t[i].1)
    }

    /// Whether arguments are compared as 64-bit values (two halves) or 32-bit ones.
    fn wide(self) -> bool {
        self != Self::I386
    }
}

fn unsupported(what: String) -> Error {
    Error::failed_precondition(format!("seccomp: {what} is not supported natively"))
}

/// The `SECCOMP_RET_*` value of an action.
pub fn action(name: &str, errno_ret: Option<u32>) -> Result<u32> {
    let data = |default: u32| errno_ret.unwrap_or(default) & 0xffff;
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_ERRNO" => RET_ERRNO | data(EPERM),
        "SCMP_ACT_TRACE" => RET_TRACE | data(EPERM),
        "SCMP_ACT_LOG" => RET_LOG,
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        other => return Err(unsupported(format!("action {other}"))),
    })
}

fn flag(name: &str) -> Result<u32> {
    Ok(match name {
        "SECCOMP_FILTER_FLAG_TSYNC" => libc::SECCOMP_FILTER_FLAG_TSYNC as u32,
        "SECCOMP_FILTER_FLAG_LOG" => libc::SECCOMP_FILTER_FLAG_LOG as u32,
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW as u32,
        other => return Err(unsupported(format!("flag {other}"))),
    })
}

/// One rule as it applies to one syscall on one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Comparisons that must all hold.
    pub args: Vec<ArgCmp>,
    /// `SECCOMP_RET_*`.
    pub action: u32,
}

impl PartialEq for ArgCmp {
    fn eq(&self, o: &Self) -> bool {
        (self.index, self.value, self.value_two, self.op) == (o.index, o.value, o.value_two, o.op)
    }
}
impl Eq for ArgCmp {}

/// A profile resolved per architecture: what the program must decide, before it is code.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The default `SECCOMP_RET_*`.
    pub default: u32,
    /// Architectures in the filter.
    pub arches: Vec<Arch>,
    /// Per architecture: syscall number → its rules (an unconditional rule alone when any).
    pub rules: BTreeMap<Arch, BTreeMap<u32, Vec<Rule>>>,
    /// Per architecture: numbers above this get ENOSYS (runc's stub); `None` = no stub.
    pub enosys_above: BTreeMap<Arch, u32>,
    /// `SECCOMP_FILTER_FLAG_*` bits.
    pub flags: u32,
}

impl Resolved {
    /// What the filter decides for syscall `nr` on `arch` (an `AUDIT_ARCH_*`) with `args`:
    /// the reference the compiled program is tested against.
    pub fn decide(&self, audit_arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
        let arch = match audit_arch {
            AUDIT_ARCH_X86_64 if nr & X32_SYSCALL_BIT != 0 => Arch::X32,
            AUDIT_ARCH_X86_64 => Arch::X86_64,
            AUDIT_ARCH_I386 => Arch::I386,
            _ => return RET_KILL_THREAD,
        };
        if !self.arches.contains(&arch) {
            return RET_KILL_THREAD;
        }
        if let Some(max) = self.enosys_above.get(&arch)
            && nr > *max
        {
            return RET_ERRNO | ENOSYS;
        }
        let Some(rules) = self.rules.get(&arch).and_then(|r| r.get(&nr)) else {
            return self.default;
        };
        let holds = |c: &ArgCmp| {
            let mut a = args[c.index];
            let (mut v, mut v2) = (c.value, c.value_two);
            if !arch.wide() {
                (a, v, v2) = (a & 0xffff_ffff, v & 0xffff_ffff, v2 & 0xffff_ffff);
            }
            match c.op {
                Op::Eq => a == v,
                Op::Ne => a != v,
                Op::Lt => a < v,
                Op::Le => a <= v,
                Op::Gt => a > v,
                Op::Ge => a >= v,
                Op::MaskedEq => a & v == v2,
            }
        };
        rules
            .iter()
            .find(|r| r.args.iter().all(holds))
            .map_or(self.default, |r| r.action)
    }
}

/// Resolves `profile` per architecture (see the module doc for the rules runc applies).
pub fn resolve(profile: &Profile) -> Result<Resolved> {
    if profile
        .listener_path
        .as_deref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(unsupported("a seccomp listener".into()));
    }
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let mut arches = vec![Arch::X86_64];
    for a in &profile.architectures {
        let a = Arch::parse(a)?;
        if !arches.contains(&a) {
            arches.push(a);
        }
    }
    arches.sort();
    let mut flags = 0;
    for f in &profile.flags {
        flags |= flag(f)?;
    }
    let mut rules: BTreeMap<Arch, BTreeMap<u32, Vec<Rule>>> = BTreeMap::new();
    let mut max: BTreeMap<Arch, u32> = BTreeMap::new();
    for r in &profile.syscalls {
        let act = action(&r.action, r.errno_ret)?;
        if r.args.iter().any(|a| a.index > 5) {
            return Err(Error::invalid_argument("seccomp: argument index above 5"));
        }
        let repeated = (0..6).any(|i| r.args.iter().filter(|a| a.index == i).count() > 1);
        let alternatives: Vec<Vec<ArgCmp>> = if repeated {
            r.args.iter().map(|a| vec![*a]).collect()
        } else {
            vec![r.args.clone()]
        };
        for name in &r.names {
            for &arch in &arches {
                let Some(nr) = arch.number(name) else {
                    continue;
                };
                let m = max.entry(arch).or_insert(0);
                *m = (*m).max(nr);
                if act == default {
                    continue;
                }
                let list = rules.entry(arch).or_default().entry(nr).or_default();
                if list.iter().any(|x| x.args.is_empty()) {
                    continue;
                }
                for args in &alternatives {
                    if args.is_empty() {
                        list.clear();
                    }
                    list.push(Rule {
                        args: args.clone(),
                        action: act,
                    });
                    if args.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    // runc's stub: unless the default already allows (or is ENOSYS), syscalls newer than any
    // the profile names get ENOSYS, so that glibc falls back to older ones.
    let allowish = matches!(default, RET_ALLOW | RET_LOG);
    let enosys_default = profile.default_errno_ret == Some(ENOSYS);
    let enosys_above = if allowish || enosys_default {
        BTreeMap::new()
    } else {
        max
    };
    Ok(Resolved {
        default,
        arches,
        rules,
        enosys_above,
        flags,
    })
}

/// Parses and compiles a profile (the JSON of `linux.seccomp`).
pub fn compile_json(json: &[u8]) -> Result<Filter> {
    let profile: Profile = serde_json::from_slice(json)
        .map_err(|e| Error::invalid_argument("seccomp profile").with_source(e))?;
    compile(&resolve(&profile)?)
}

// Classic BPF opcodes.
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JMP_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Offset of the low 32 bits of argument `i` (little endian).
fn off_arg_lo(i: usize) -> u32 {
    16 + 8 * i as u32
}

/// A jump target, resolved when the program is assembled.
type Label = usize;

enum Insn {
    Plain(libc::sock_filter),
    /// A conditional jump: `code k` with true/false targets (`None` = next instruction).
    Cond(u16, u32, Option<Label>, Option<Label>),
    Ja(Label),
    Mark(Label),
}

#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        self.labels - 1
    }
    fn mark(&mut self, l: Label) {
        self.code.push(Insn::Mark(l));
    }
    fn stmt(&mut self, code: u16, k: u32) {
        self.code.push(Insn::Plain(libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        }));
    }
    fn ret(&mut self, k: u32) {
        self.stmt(RET_K, k);
    }
    fn cond(&mut self, code: u16, k: u32, t: Option<Label>, f: Option<Label>) {
        self.code.push(Insn::Cond(code, k, t, f));
    }
    /// `if (A op k) goto target` for a target that may be far away.
    fn jump_far_if(&mut self, code: u16, k: u32, target: Label) {
        let skip = self.label();
        self.cond(code, k, None, Some(skip));
        self.code.push(Insn::Ja(target));
        self.mark(skip);
    }

    fn assemble(self) -> Result<Vec<libc::sock_filter>> {
        let mut at = vec![usize::MAX; self.labels];
        let mut n = 0;
        for i in &self.code {
            match i {
                Insn::Mark(l) => at[*l] = n,
                _ => n += 1,
            }
        }
        if n > libc::BPF_MAXINSNS as usize {
            return Err(unsupported(format!("a filter of {n} instructions")));
        }
        let mut out = Vec::with_capacity(n);
        for i in self.code {
            let pc = out.len();
            let rel = |l: Option<Label>| -> Result<u8> {
                let Some(l) = l else { return Ok(0) };
                u8::try_from(at[l] - pc - 1)
                    .map_err(|_| Error::internal("seccomp: conditional jump out of range"))
            };
            match i {
                Insn::Mark(_) => {}
                Insn::Plain(f) => out.push(f),
                Insn::Cond(code, k, t, f) => out.push(libc::sock_filter {
                    code,
                    jt: rel(t)?,
                    jf: rel(f)?,
                    k,
                }),
                Insn::Ja(l) => out.push(libc::sock_filter {
                    code: JMP_JA,
                    jt: 0,
                    jf: 0,
                    k: (at[l] - pc - 1) as u32,
                }),
            }
        }
        Ok(out)
    }
}

/// Compiles a resolved profile.
pub fn compile(r: &Resolved) -> Result<Filter> {
    let mut a = Asm::default();
    let sections: Vec<(Arch, Label)> = r.arches.iter().map(|&x| (x, a.label())).collect();
    let section = |x: Arch| sections.iter().find(|s| s.0 == x).map(|s| s.1);

    a.stmt(LD_W_ABS, OFF_ARCH);
    if let Some(l) = section(Arch::X86_64) {
        a.jump_far_if(JEQ_K, AUDIT_ARCH_X86_64, l);
    }
    if let Some(l) = section(Arch::I386) {
        a.jump_far_if(JEQ_K, AUDIT_ARCH_I386, l);
    }
    // libseccomp's bad-architecture action.
    a.ret(RET_KILL_THREAD);

    for &(arch, label) in &sections {
        a.mark(label);
        a.stmt(LD_W_ABS, OFF_NR);
        match arch {
            Arch::X86_64 => match section(Arch::X32) {
                Some(x32) => {
                    let skip = a.label();
                    a.cond(JSET_K, X32_SYSCALL_BIT, None, Some(skip));
                    a.code.push(Insn::Ja(x32));
                    a.mark(skip);
                }
                None => {
                    let skip = a.label();
                    a.cond(JGE_K, X32_SYSCALL_BIT, None, Some(skip));
                    a.ret(RET_KILL_THREAD);
                    a.mark(skip);
                }
            },
            Arch::X32 => {} // only reached with the x32 bit set
            Arch::I386 => {}
        }
        if let Some(max) = r.enosys_above.get(&arch) {
            let skip = a.label();
            a.cond(JGT_K, *max, None, Some(skip));
            a.ret(RET_ERRNO | ENOSYS);
            a.mark(skip);
        }
        let empty = BTreeMap::new();
        let rules = r.rules.get(&arch).unwrap_or(&empty);
        let blocks: Vec<(u32, Label)> = rules.keys().map(|&nr| (nr, a.label())).collect();
        for &(nr, l) in &blocks {
            a.jump_far_if(JEQ_K, nr, l);
        }
        a.ret(r.default);
        for (nr, l) in blocks {
            a.mark(l);
            for rule in &rules[&nr] {
                let next = a.label();
                for c in &rule.args {
                    compare(&mut a, arch.wide(), c, next);
                }
                a.ret(rule.action);
                a.mark(next);
            }
            a.ret(r.default);
        }
    }
    Ok(Filter {
        program: a.assemble()?,
        flags: r.flags,
    })
}

/// Emits `if !(arg op value) goto fail`, comparing the high halves first on 64-bit arches.
fn compare(a: &mut Asm, wide: bool, c: &ArgCmp, fail: Label) {
    let lo_off = off_arg_lo(c.index);
    let (v_hi, v_lo) = ((c.value >> 32) as u32, c.value as u32);
    let (w_hi, w_lo) = ((c.value_two >> 32) as u32, c.value_two as u32);
    let ok = a.label();
    // Loads a half, masked for MASKED_EQ.
    let load = |a: &mut Asm, off: u32, mask: u32| {
        a.stmt(LD_W_ABS, off);
        if c.op == Op::MaskedEq {
            a.stmt(AND_K, mask);
        }
    };
    match c.op {
        Op::Eq | Op::MaskedEq | Op::Ne => {
            let (hi, lo) = if c.op == Op::MaskedEq {
                (w_hi, w_lo)
            } else {
                (v_hi, v_lo)
            };
            // EQ-like: both halves equal. NE: either differs.
            let (equal, differ) = if c.op == Op::Ne {
                (fail, ok)
            } else {
                (ok, fail)
            };
            if wide {
                load(a, lo_off + 4, v_hi);
                a.cond(JEQ_K, hi, None, Some(differ));
            }
            load(a, lo_off, v_lo);
            a.cond(JEQ_K, lo, Some(equal), Some(differ));
        }
        Op::Gt | Op::Ge | Op::Lt | Op::Le => {
            // GT/GE hold when the value is above; LT/LE are their negations.
            let (strict_code, above, below) = match c.op {
                Op::Gt => (JGT_K, ok, fail),
                Op::Ge => (JGE_K, ok, fail),
                Op::Lt => (JGE_K, fail, ok),
                _ => (JGT_K, fail, ok),
            };
            if wide {
                let low = a.label();
                a.stmt(LD_W_ABS, lo_off + 4);
                a.cond(JGT_K, v_hi, Some(above), None);
                a.cond(JEQ_K, v_hi, Some(low), Some(below));
                a.mark(low);
            }
            a.stmt(LD_W_ABS, lo_off);
            a.cond(strict_code, v_lo, Some(above), Some(below));
        }
    }
    a.mark(ok);
}

/// Installs `filter` on the calling thread. Async-signal-safe (no allocation), for use between
/// fork and exec.
///
/// # Safety
/// Only the calling thread is filtered; call it where nothing else must run unfiltered.
pub unsafe fn install(filter: &Filter) -> std::result::Result<(), i32> {
    let prog = libc::sock_fprog {
        len: filter.program.len() as u16,
        filter: filter.program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points at a live program of `len` instructions.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            filter.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        // SAFETY: reading errno of this thread.
        return Err(unsafe { *libc::__errno_location() });
    }
    Ok(())
}

/// A classic BPF interpreter for seccomp programs, to check compiled filters (and those
/// runc installs, read back with `PTRACE_SECCOMP_GET_FILTER`).
pub fn run(program: &[libc::sock_filter], audit_arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&audit_arch.to_le_bytes());
    for (i, v) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    let (mut acc, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0usize;
    loop {
        let Some(i) = program.get(pc) else {
            return RET_KILL_THREAD;
        };
        pc += 1;
        let k = i.k;
        let class = (i.code & 0x07) as u32;
        match class {
            libc::BPF_LD | libc::BPF_LDX => {
                let v = match (i.code & 0xe0) as u32 {
                    libc::BPF_ABS => {
                        let o = k as usize;
                        u32::from_le_bytes(data[o..o + 4].try_into().unwrap())
                    }
                    libc::BPF_IMM => k,
                    libc::BPF_MEM => mem[k as usize],
                    libc::BPF_LEN => 64,
                    _ => return RET_KILL_THREAD,
                };
                if class == libc::BPF_LD {
                    acc = v
                } else {
                    x = v
                }
            }
            libc::BPF_ST => mem[k as usize] = acc,
            libc::BPF_STX => mem[k as usize] = x,
            libc::BPF_ALU => {
                let src = if (i.code & 0x08) as u32 == libc::BPF_X {
                    x
                } else {
                    k
                };
                acc = match (i.code & 0xf0) as u32 {
                    libc::BPF_ADD => acc.wrapping_add(src),
                    libc::BPF_SUB => acc.wrapping_sub(src),
                    libc::BPF_MUL => acc.wrapping_mul(src),
                    libc::BPF_DIV => acc.checked_div(src).unwrap_or(0),
                    libc::BPF_AND => acc & src,
                    libc::BPF_OR => acc | src,
                    libc::BPF_LSH => acc.wrapping_shl(src),
                    libc::BPF_RSH => acc.wrapping_shr(src),
                    libc::BPF_NEG => acc.wrapping_neg(),
                    0xa0 => acc ^ src,
                    _ => return RET_KILL_THREAD,
                };
            }
            libc::BPF_JMP => {
                let src = if (i.code & 0x08) as u32 == libc::BPF_X {
                    x
                } else {
                    k
                };
                let taken = match (i.code & 0xf0) as u32 {
                    libc::BPF_JA => {
                        pc += k as usize;
                        continue;
                    }
                    libc::BPF_JEQ => acc == src,
                    libc::BPF_JGT => acc > src,
                    libc::BPF_JGE => acc >= src,
                    libc::BPF_JSET => acc & src != 0,
                    _ => return RET_KILL_THREAD,
                };
                pc += if taken { i.jt } else { i.jf } as usize;
            }
            libc::BPF_RET => {
                return if (i.code & 0x18) as u32 == libc::BPF_A {
                    acc
                } else {
                    k
                };
            }
            libc::BPF_MISC => {
                if (i.code & 0xf8) as u32 == libc::BPF_TAX {
                    x = acc
                } else {
                    acc = x
                }
            }
            _ => return RET_KILL_THREAD,
        }
    }
}

#[cfg(test)]
mod tests;
