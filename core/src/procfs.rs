//! What berth reads from procfs besides cgroups: the host's memory (`/proc/meminfo`) and the
//! interface counters of a network namespace (`/proc/<pid>/net/dev`), read the same way by the
//! engine (Docker stats), the CRI (pod and container stats) and the gateway (`/info`).

use berth_proto::berth::types::v1 as types;

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The host's memory in bytes (`MemTotal` of `/proc/meminfo`); 0 when it cannot be read.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total(&m))
        .unwrap_or(0)
}

/// The interface counters of a `net/dev` text, without `lo`, in the file's order. Lines that
/// are not `name: <16 counters>` (the two header lines, anything truncated) are skipped.
pub fn parse_net_dev(text: &str) -> Vec<(String, types::NetworkInterfaceStats)> {
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if name == "lo" || v.len() < 16 {
            continue;
        }
        out.push((
            name.to_string(),
            types::NetworkInterfaceStats {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_in_bytes() {
        let text = "MemTotal:       16318432 kB\nMemFree:         1024 kB\n";
        assert_eq!(mem_total(text), Some(16318432 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert!(host_memory() > 0);
    }

    #[test]
    fn net_dev_skips_loopback_and_short_lines_and_reads_the_columns() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
            face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
            lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
            eth0:    5000      40    1    2    0     0          0         0     3000      30    3    4    0     0       0          0\n  \
            eth1: 1 2 3\n  \
            net1: 100 2 0 1 0 0 0 0 200 3 0 0 0 0 0 0\n";
        let got = parse_net_dev(text);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["eth0", "net1"]);
        let c = &got[0].1;
        assert_eq!(
            (c.rx_bytes, c.rx_packets, c.rx_errors, c.rx_dropped),
            (5000, 40, 1, 2)
        );
        assert_eq!(
            (c.tx_bytes, c.tx_packets, c.tx_errors, c.tx_dropped),
            (3000, 30, 3, 4)
        );
        assert_eq!((got[1].1.rx_bytes, got[1].1.tx_packets), (100, 3));
    }
}
