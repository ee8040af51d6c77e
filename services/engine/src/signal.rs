//! Signals as users write them: `SIGTERM`, `TERM`, `term`, `15`, `SIGRTMIN+3`.

use berth_core::{Error, Result};

const NAMES: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("IOT", libc::SIGIOT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("POLL", libc::SIGPOLL),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

/// Parses a signal name or number. Empty input is `InvalidArgument`.
pub fn parse(input: &str) -> Result<i32> {
    let invalid = || Error::invalid_argument(format!("Invalid signal: {input}"));
    let s = input.trim();
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(invalid())
        };
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, n)) = NAMES.iter().find(|(name, _)| *name == bare) {
        return Ok(*n);
    }
    let rt = |rest: &str, base: i32, sign: i32| -> Result<i32> {
        let off = if rest.is_empty() {
            0
        } else {
            rest.trim_start_matches(['+', '-'])
                .parse::<i32>()
                .map_err(|_| invalid())?
        };
        let n = base + sign * off;
        if (SIGRTMIN..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(invalid())
        }
    };
    if let Some(rest) = bare.strip_prefix("RTMIN") {
        return rt(rest, SIGRTMIN, 1);
    }
    if let Some(rest) = bare.strip_prefix("RTMAX") {
        return rt(rest, SIGRTMAX, -1);
    }
    Err(invalid())
}

/// Docker's spelling of a signal number for event attributes and errors: the number itself.
pub fn name(signal: i32) -> String {
    NAMES
        .iter()
        .find(|(_, n)| *n == signal)
        .map(|(name, _)| format!("SIG{name}"))
        .unwrap_or_else(|| signal.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("SIGTERM").unwrap(), 15);
        assert_eq!(parse("term").unwrap(), 15);
        assert_eq!(parse("KILL").unwrap(), 9);
        assert_eq!(parse("9").unwrap(), 9);
        assert_eq!(parse("SIGRTMIN+3").unwrap(), 37);
        assert_eq!(parse("RTMAX-1").unwrap(), 63);
        assert!(parse("").is_err());
        assert!(parse("0").is_err());
        assert!(parse("65").is_err());
        assert!(parse("SIGFOO").is_err());
        assert_eq!(name(15), "SIGTERM");
        assert_eq!(name(40), "40");
    }
}
