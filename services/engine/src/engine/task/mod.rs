//! Tasks: starting a container through its shim ([`start`]), exits and restart policies
//! ([`exit`]), and stopping, killing, pausing, updating, waiting and deletion ([`control`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::envelope::Payload;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::shim::v1 as shimpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use tokio_util::sync::CancellationToken;

mod control;
mod exit;
mod start;

use super::create::network_mode;
use super::{Ctr, Engine, ExitState, now, write_atomic};
use crate::deps::Shim;
use crate::hostfiles::{self, Resolv};
use crate::restart::{self, Policy};
use crate::spec::{self, Device, Namespace, SpecInput, SpecMount};

/// Docker's exit code for a start that failed for an unknown reason.
pub const EXIT_START_FAILED: i32 = 128;
/// How long a force-delete or a stop waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// A wait's result: the status code, the start error if any, and the exit time.
pub type WaitResult = (i64, String, Option<Timestamp>);

/// What a started task needs cleaned up if the start fails half-way.
#[derive(Default)]
pub(in crate::engine) struct Partial {
    netns: Option<PathBuf>,
    attached: bool,
    shim: Option<Arc<dyn Shim>>,
}

/// Docker's exit code for a failed start, from the runtime's message.
pub fn start_failure_code(message: &str) -> i32 {
    let m = message.to_ascii_lowercase();
    if m.contains("executable file not found")
        || m.contains("no such file or directory")
        || m.contains("not found in $path")
    {
        127
    } else if m.contains("permission denied") {
        126
    } else {
        EXIT_START_FAILED
    }
}

/// `10m` → 10485760 (Docker's log-opt sizes: b, k, m, g, binary units).
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1024),
        'm' => (&s[..s.len() - 1], 1024 * 1024),
        'g' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        'b' => (&s[..s.len() - 1], 1),
        _ => (s.as_str(), 1),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .map(|n| (n * mult as f64) as i64)
}

fn ts_to_time(ts: &Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn resources_merge_and_validate(
    current: &mut pb::Resources,
    update: &pb::Resources,
    engine: &Engine,
) -> Result<()> {
    spec::resources::merge(current, update);
    spec::resources::validate(current, engine.host_info())
}

/// Whether a SIGKILL must go to every process of the container (`runtime kill --all`, which
/// walks and freezes the cgroup) rather than to its init: only when the container shares
/// another pid namespace. In its own, the kernel kills every process once the init dies
/// (Docker does the same).
fn needs_kill_all(rec: &crate::record::Record) -> bool {
    let mode = rec.host_config().pid_mode.as_str();
    mode == "host" || mode.starts_with("container:")
}

/// Docker's `NetworkSettings.Ports`: every exposed port, with the bindings the network made.
fn ports_status(
    cfg: &pb::ContainerConfig,
    attachments: &[(String, net::Attachment)],
) -> Vec<pb::PortStatus> {
    let mut map: std::collections::BTreeMap<(u32, i32), Vec<pb::HostPortBinding>> =
        std::collections::BTreeMap::new();
    for p in &cfg.exposed_ports {
        map.entry((p.port, normalize_proto(p.protocol)))
            .or_default();
    }
    for (_, a) in attachments {
        for p in &a.ports {
            map.entry((p.container_port, normalize_proto(p.protocol)))
                .or_default()
                .push(pb::HostPortBinding {
                    host_ip: p.host_ip.clone(),
                    host_port: p.host_port,
                });
        }
    }
    map.into_iter()
        .map(|((port, proto), host_bindings)| pb::PortStatus {
            container_port: port,
            protocol: proto,
            host_bindings,
        })
        .collect()
}

fn normalize_proto(p: i32) -> i32 {
    if p == types::Protocol::Unspecified as i32 {
        types::Protocol::Tcp as i32
    } else {
        p
    }
}

/// Devices mapped with `--device`, read from the host.
fn host_devices(mappings: &[pb::DeviceMapping]) -> Result<Vec<Device>> {
    let mut out = Vec::new();
    for d in mappings {
        let st = nix::sys::stat::stat(d.path_on_host.as_str()).map_err(|e| {
            Error::invalid_argument(format!(
                "error gathering device information while adding custom device \"{}\"",
                d.path_on_host
            ))
            .with_source(e)
        })?;
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFCHR => 'c',
            libc::S_IFBLK => 'b',
            _ => {
                return Err(Error::invalid_argument(format!(
                    "error gathering device information while adding custom device \"{}\": not a device node",
                    d.path_on_host
                )));
            }
        };
        out.push(Device {
            path: if d.path_in_container.is_empty() {
                d.path_on_host.clone()
            } else {
                d.path_in_container.clone()
            },
            kind,
            major: nix::sys::stat::major(st.st_rdev) as i64,
            minor: nix::sys::stat::minor(st.st_rdev) as i64,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            permissions: if d.cgroup_permissions.is_empty() {
                "rwm".into()
            } else {
                d.cgroup_permissions.clone()
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_failure_codes() {
        assert_eq!(parse_size("10m"), Some(10 << 20));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("x"), None);
        assert_eq!(
            start_failure_code("exec: \"nope\": executable file not found in $PATH"),
            127
        );
        assert_eq!(start_failure_code("exec /x: permission denied"), 126);
        assert_eq!(start_failure_code("boom"), 128);
    }
}
