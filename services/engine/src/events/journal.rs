//! The hub's history on disk (`<root>/engine/events.log`), so `since`/`until` give the same
//! answers after the engine restarts, however it stopped.
//!
//! An append-only file of records, each a little-endian `u32` length and a protobuf
//! `Envelope`. The hub appends every event with one `write(2)` under its lock, before any
//! subscriber sees it: once in the page cache an event survives a `kill -9` of the engine (a
//! power loss may lose the last few, as with Docker's logs). A record cut short or unreadable
//! (a crash in the middle of a write) ends the file: it is truncated there on open.
//!
//! The file is rewritten from the retained history (temporary file, fsync, rename) when it
//! holds twice as many records as the history keeps, so it stays bounded by the same count and
//! age as the in-memory ring.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use berth_proto::berth::events::v1 as pb;
use berth_proto::prost::Message;

/// Largest record accepted when reading; anything longer is treated as damage.
const MAX_RECORD: usize = 16 << 20;

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Records in the file, retained or not.
    records: usize,
}

impl Journal {
    /// Opens (creating) the journal at `path` and returns it with every readable record,
    /// oldest first. A damaged tail is cut off.
    pub fn open(path: &Path) -> io::Result<(Self, Vec<pb::Envelope>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let (events, good) = decode(&data);
        if good < data.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = data.len() - good,
                "events journal: cutting off a damaged tail"
            );
            file.set_len(good as u64)?;
        }
        let journal = Self {
            path: path.to_path_buf(),
            file,
            records: events.len(),
        };
        Ok((journal, events))
    }

    /// Appends one record with a single write.
    pub fn append(&mut self, ev: &pb::Envelope) -> io::Result<()> {
        let mut buf = Vec::with_capacity(ev.encoded_len() + 4);
        encode(ev, &mut buf);
        self.file.write_all(&buf)?;
        self.records += 1;
        Ok(())
    }

    /// Records in the file.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Replaces the file with `retained` (a crash leaves the old file or the new one).
    pub fn rewrite<'a>(
        &mut self,
        retained: impl IntoIterator<Item = &'a pb::Envelope>,
    ) -> io::Result<()> {
        let tmp = self.path.with_extension("log.tmp");
        let mut buf = Vec::new();
        let mut n = 0;
        for ev in retained {
            encode(ev, &mut buf);
            n += 1;
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.records = n;
        Ok(())
    }
}

fn encode(ev: &pb::Envelope, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&(ev.encoded_len() as u32).to_le_bytes());
    ev.encode(buf).expect("a Vec grows as needed");
}

/// The records of `data` up to the first damaged one, and the length of that good prefix.
fn decode(data: &[u8]) -> (Vec<pb::Envelope>, usize) {
    let mut events = Vec::new();
    let mut at = 0;
    while data.len() - at >= 4 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let body = at + 4;
        if len > MAX_RECORD || data.len() - body < len {
            break;
        }
        match pb::Envelope::decode(&data[body..body + len]) {
            Ok(ev) => events.push(ev),
            Err(_) => break,
        }
        at = body + len;
    }
    (events, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64) -> pb::Envelope {
        pb::Envelope {
            topic: "/containers/start".into(),
            action: "start".into(),
            sequence: seq,
            ..Default::default()
        }
    }

    #[test]
    fn appends_survive_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let (mut j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        for i in 1..=3 {
            j.append(&ev(i)).unwrap();
        }
        drop(j);
        // A crash in the middle of the fourth write.
        let mut half = Vec::new();
        encode(&ev(4), &mut half);
        half.truncate(half.len() - 3);
        let good = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&half)
            .unwrap();
        let (mut j, old) = Journal::open(&path).unwrap();
        assert_eq!(
            old.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        j.append(&ev(5)).unwrap();
        let (_, old) = Journal::open(&path).unwrap();
        assert_eq!(old.last().unwrap().sequence, 5);
    }

    #[test]
    fn rewrite_keeps_only_what_is_retained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let (mut j, _) = Journal::open(&path).unwrap();
        let all: Vec<_> = (1..=10).map(ev).collect();
        for e in &all {
            j.append(e).unwrap();
        }
        j.rewrite(&all[7..]).unwrap();
        assert_eq!(j.records(), 3);
        j.append(&ev(11)).unwrap();
        let (_, old) = Journal::open(&path).unwrap();
        assert_eq!(
            old.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [8, 9, 10, 11]
        );
    }
}
