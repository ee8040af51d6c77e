//! Resolving `--user` against the container's own `/etc/passwd` and `/etc/group`, the way runc's
//! and Docker's user lookup does.
//!
//! `user` is `name`, `uid`, `name:group`, `uid:gid` (or any mix). Without a user part the
//! process runs as root. A numeric user that is not in passwd is used as is (gid 0, home `/`);
//! a name that is not found is an error. Without an explicit group, the user's supplementary
//! groups are the groups of `/etc/group` that list it as a member.

use berth_core::{Error, Result};

/// Who the container's process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, in file order, then the `group_add` ones.
    pub additional_gids: Vec<u32>,
    /// Home directory from passwd (`/` when unknown).
    pub home: String,
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(Passwd {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<Group> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            Some(Group {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` (the container's user) and `group_add` against the contents of the
/// container's passwd and group files (`None` when the file does not exist).
pub fn resolve(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
    group_add: &[String],
) -> Result<ResolvedUser> {
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let groups = group.map(parse_group).unwrap_or_default();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };

    let mut out = ResolvedUser {
        uid: 0,
        gid: 0,
        additional_gids: Vec::new(),
        home: "/".into(),
    };
    let mut user_name = None;
    // Root by default, taking root's passwd entry when there is one.
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let numeric = user_part.parse::<u32>().ok();
    let entry = users
        .iter()
        .find(|u| u.name == user_part || numeric == Some(u.uid));
    match (entry, numeric) {
        (Some(u), _) => {
            out.uid = u.uid;
            out.gid = u.gid;
            if !u.home.is_empty() {
                out.home = u.home.clone();
            }
            user_name = Some(u.name.clone());
        }
        (None, Some(uid)) => out.uid = uid,
        (None, None) => {
            return Err(Error::invalid_argument(format!(
                "unable to find user {user_part}: no matching entries in passwd file"
            )));
        }
    }

    match group_part {
        Some(g) if !g.is_empty() => out.gid = lookup_group(&groups, g)?,
        _ => {
            if let Some(name) = &user_name {
                for g in &groups {
                    if g.members.iter().any(|m| m == name) && !out.additional_gids.contains(&g.gid)
                    {
                        out.additional_gids.push(g.gid);
                    }
                }
            }
        }
    }
    for g in group_add {
        let gid = lookup_group(&groups, g)?;
        if !out.additional_gids.contains(&gid) {
            out.additional_gids.push(gid);
        }
    }
    Ok(out)
}

/// The gids of `group_add` (names looked up in the container's /etc/group, or numbers).
pub fn group_ids(group: Option<&str>, group_add: &[String]) -> Result<Vec<u32>> {
    let groups = group.map(parse_group).unwrap_or_default();
    let mut out = Vec::new();
    for g in group_add {
        let gid = lookup_group(&groups, g)?;
        if !out.contains(&gid) {
            out.push(gid);
        }
    }
    Ok(out)
}

fn lookup_group(groups: &[Group], g: &str) -> Result<u32> {
    let numeric = g.parse::<u32>().ok();
    if let Some(found) = groups.iter().find(|e| e.name == g) {
        return Ok(found.gid);
    }
    numeric.ok_or_else(|| {
        Error::invalid_argument(format!(
            "unable to find group {g}: no matching entries in group file"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
        postgres:x:70:70::/var/lib/postgresql:/bin/sh\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        wheel:x:10:root,postgres\n\
        postgres:x:70:\n\
        audio:x:29:postgres\n\
        nogroup:x:65534:\n";

    fn r(spec: &str) -> Result<ResolvedUser> {
        resolve(spec, Some(PASSWD), Some(GROUP), &[])
    }

    #[test]
    fn root_by_default() {
        let u = r("").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
        assert_eq!(u.additional_gids, [10]);
        let u = resolve("", None, None, &[]).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/"));
    }

    #[test]
    fn names_and_ids() {
        let u = r("postgres").unwrap();
        assert_eq!((u.uid, u.gid), (70, 70));
        assert_eq!(u.home, "/var/lib/postgresql");
        assert_eq!(u.additional_gids, [10, 29]);
        let u = r("70").unwrap();
        assert_eq!((u.uid, u.gid), (70, 70));
        let u = r("1234").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1234, 0, "/"));
        assert!(u.additional_gids.is_empty());
        let u = r("1234:5678").unwrap();
        assert_eq!((u.uid, u.gid), (1234, 5678));
    }

    #[test]
    fn explicit_groups_replace_supplementary_ones() {
        let u = r("postgres:daemon").unwrap();
        assert_eq!((u.uid, u.gid), (70, 1));
        assert!(u.additional_gids.is_empty());
        let u = r("nobody:nogroup").unwrap();
        assert_eq!((u.uid, u.gid), (65534, 65534));
    }

    #[test]
    fn unknown_names_are_errors() {
        let err = r("alice").unwrap_err();
        assert_eq!(
            err.message(),
            "unable to find user alice: no matching entries in passwd file"
        );
        let err = r("root:nosuch").unwrap_err();
        assert_eq!(
            err.message(),
            "unable to find group nosuch: no matching entries in group file"
        );
    }

    #[test]
    fn group_add() {
        let u = resolve(
            "daemon",
            Some(PASSWD),
            Some(GROUP),
            &["audio".into(), "4242".into(), "audio".into()],
        )
        .unwrap();
        assert_eq!(u.additional_gids, [29, 4242]);
        assert!(resolve("daemon", Some(PASSWD), Some(GROUP), &["nope".into()]).is_err());
    }
}
