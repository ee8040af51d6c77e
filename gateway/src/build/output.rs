//! The JSON stream `POST /build` answers with, as the classic builder writes it.
//!
//! Lines: `{"stream": …}` for the builder's own text and the steps' output, `{"aux":{"ID":…}}`
//! when a stage is done, pull progress as `docker pull` has it, and a final
//! `{"errorDetail":{"message":…},"error":…}` on failure. With `q` the text lines are held back:
//! a success shows only the image id, a failure the held text before its error.

use berth_core::Error;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::progress;

/// One message from the build task to the HTTP response.
#[derive(Debug)]
pub enum Msg {
    /// Bytes of JSON lines.
    Data(Bytes),
    /// The build failed: an HTTP error while nothing was sent, else an error line.
    Failed(Error),
}

/// Where a build writes its progress.
#[derive(Debug)]
pub struct Output {
    tx: mpsc::Sender<Msg>,
    quiet: bool,
    held: Vec<Bytes>,
    /// Cancelled when the client went away.
    cancel: CancellationToken,
}

impl Output {
    /// An output sending to `tx`; `cancel` is cancelled when the receiver is gone.
    pub fn new(tx: mpsc::Sender<Msg>, quiet: bool, cancel: CancellationToken) -> Self {
        Self {
            tx,
            quiet,
            held: Vec::new(),
            cancel,
        }
    }

    /// Whether the build should stop (the client disconnected).
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    async fn send(&mut self, line: Bytes) {
        if self.tx.send(Msg::Data(line)).await.is_err() {
            self.cancel.cancel();
        }
    }

    /// A `{"stream": text}` line (held back with `q`).
    pub async fn stream(&mut self, text: &str) {
        let line = progress::line(&progress::stream(text));
        if self.quiet {
            self.held.push(line);
        } else {
            self.send(line).await;
        }
    }

    /// Any other JSON message (pull progress), held back with `q`.
    pub async fn message(&mut self, v: &Value) {
        let line = progress::line(v);
        if self.quiet {
            self.held.push(line);
        } else {
            self.send(line).await;
        }
    }

    /// `{"aux":{"ID": id}}`: the image a stage made (the CLI's `--iidfile`).
    pub async fn aux_id(&mut self, id: &str) {
        if self.quiet {
            return;
        }
        self.send(progress::line(&json!({ "aux": { "ID": id } })))
            .await;
    }

    /// The end of a successful quiet build: the image id alone.
    pub async fn quiet_result(&mut self, id: &str) {
        if self.quiet {
            self.held.clear();
            self.send(progress::line(&progress::stream(&format!("{id}\n"))))
                .await;
        }
    }

    /// The end of a failed build: with `q` the held text first, then the error.
    pub async fn fail(mut self, err: Error) {
        for line in std::mem::take(&mut self.held) {
            self.send(line).await;
        }
        let _ = self.tx.send(Msg::Failed(err)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: Msg) -> String {
        match m {
            Msg::Data(b) => String::from_utf8(b.to_vec()).unwrap(),
            Msg::Failed(e) => format!("failed: {}", e.chain()),
        }
    }

    #[tokio::test]
    async fn lines_as_the_classic_builder_writes_them() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut out = Output::new(tx, false, CancellationToken::new());
        out.stream("Step 1/2 : FROM busybox\n").await;
        out.aux_id("sha256:ab").await;
        out.fail(Error::invalid_argument("boom")).await;
        assert_eq!(
            text(rx.recv().await.unwrap()),
            "{\"stream\":\"Step 1/2 : FROM busybox\\n\"}\n"
        );
        assert_eq!(
            text(rx.recv().await.unwrap()),
            "{\"aux\":{\"ID\":\"sha256:ab\"}}\n"
        );
        assert_eq!(text(rx.recv().await.unwrap()), "failed: boom");
    }

    #[tokio::test]
    async fn quiet_shows_the_id_or_the_held_text_and_the_error() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut out = Output::new(tx, true, CancellationToken::new());
        out.stream("Step 1/1 : FROM busybox\n").await;
        out.aux_id("sha256:ab").await;
        out.quiet_result("sha256:ab").await;
        assert_eq!(
            text(rx.recv().await.unwrap()),
            "{\"stream\":\"sha256:ab\\n\"}\n"
        );
        let (tx, mut rx) = mpsc::channel(16);
        let mut out = Output::new(tx, true, CancellationToken::new());
        out.stream("Step 1/1 : RUN false\n").await;
        out.fail(Error::internal("x")).await;
        assert!(text(rx.recv().await.unwrap()).contains("RUN false"));
        assert_eq!(text(rx.recv().await.unwrap()), "failed: x");
    }

    #[tokio::test]
    async fn a_gone_receiver_cancels() {
        let (tx, rx) = mpsc::channel(16);
        drop(rx);
        let cancel = CancellationToken::new();
        let mut out = Output::new(tx, false, cancel.clone());
        out.stream("x").await;
        assert!(cancel.is_cancelled());
    }
}
