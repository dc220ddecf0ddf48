//! Server-sent events: frame formatting, the per-session [`Broadcaster`] and the [`pump`]
//! that copies a subscriber's frames onto its HTTP connection.
//!
//! Every open stream owns an unbounded channel, so publishing never blocks on a slow or
//! dead client: a stream whose connection fails stops pumping, drops its receiver, and the
//! next publish prunes it.

use std::io;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::http::ChunkedWriter;

/// One item on a subscriber's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A fully formatted SSE frame.
    Data(String),
    /// The stream must end (the session was deleted).
    End,
}

/// The two heartbeat shapes seen in the wild.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatKind {
    /// `: ping\n\n`
    Comment,
    /// `event: ping\ndata: {"type":"ping"}\n\n`
    Event,
}

impl HeartbeatKind {
    pub fn frame(self) -> &'static str {
        match self {
            Self::Comment => ": ping\n\n",
            Self::Event => "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        }
    }
}

/// Formats `event: <name>\ndata: <json>\n\n`. `json` must be single-line (serde_json's
/// compact output always is).
pub fn format_frame(name: &str, json: &str) -> String {
    format!("event: {name}\ndata: {json}\n\n")
}

struct Subscriber {
    tx: Sender<Frame>,
    /// Event types this stream asked previews for (`event_deltas[]=`).
    previews: Vec<String>,
}

/// The set of open streams of one session.
#[derive(Default)]
pub struct Broadcaster {
    subscribers: Vec<Subscriber>,
}

impl Broadcaster {
    /// Registers a new stream; it receives only frames published from now on.
    pub fn subscribe(&mut self, previews: Vec<String>) -> Receiver<Frame> {
        let (tx, rx) = mpsc::channel();
        self.subscribers.push(Subscriber { tx, previews });
        rx
    }

    /// Sends an event frame to every stream, dropping streams that have gone away.
    pub fn publish(&mut self, event_type: &str, json: &str) {
        let frame = format_frame(event_type, json);
        self.subscribers
            .retain(|s| s.tx.send(Frame::Data(frame.clone())).is_ok());
    }

    /// Whether any stream asked for previews of `event_type`.
    pub fn wants_preview(&self, event_type: &str) -> bool {
        self.subscribers
            .iter()
            .any(|s| s.previews.iter().any(|p| p == event_type))
    }

    /// Sends preview frames (`event_start`/`event_delta`) only to streams that asked for
    /// previews of `event_type`.
    pub fn publish_preview(&mut self, event_type: &str, frames: &[(&str, String)]) {
        self.subscribers.retain(|s| {
            if !s.previews.iter().any(|p| p == event_type) {
                return true;
            }
            frames
                .iter()
                .all(|(name, json)| s.tx.send(Frame::Data(format_frame(name, json))).is_ok())
        });
    }

    /// Ends every stream.
    pub fn close(&mut self) {
        for s in self.subscribers.drain(..) {
            let _ = s.tx.send(Frame::End);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }
}

/// Copies frames from `rx` to `out` until [`Frame::End`], the channel closing, or a write
/// error; emits a heartbeat every `heartbeat` (none when `None`).
pub fn pump(
    rx: &Receiver<Frame>,
    out: &mut ChunkedWriter<'_>,
    heartbeat: Option<Duration>,
    kind: HeartbeatKind,
) -> io::Result<()> {
    let mut next_beat = heartbeat.map(|every| Instant::now() + every);
    loop {
        let received = match next_beat {
            Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(frame) => Some(frame),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            },
            None => match rx.recv() {
                Ok(frame) => Some(frame),
                Err(_) => return Ok(()),
            },
        };
        match received {
            Some(Frame::Data(frame)) => out.send(frame.as_bytes())?,
            Some(Frame::End) => return Ok(()),
            None => {
                out.send(kind.frame().as_bytes())?;
                next_beat = heartbeat.map(|every| Instant::now() + every);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_exact() {
        assert_eq!(
            format_frame("agent.message", r#"{"type":"agent.message"}"#),
            "event: agent.message\ndata: {\"type\":\"agent.message\"}\n\n"
        );
        assert_eq!(HeartbeatKind::Comment.frame(), ": ping\n\n");
    }

    #[test]
    fn dead_subscribers_are_pruned_and_previews_targeted() {
        let mut b = Broadcaster::default();
        let live = b.subscribe(vec![]);
        let dead = b.subscribe(vec![]);
        let preview = b.subscribe(vec!["agent.message".into()]);
        drop(dead);
        b.publish("x", "{}");
        assert_eq!(b.len(), 2);
        assert!(b.wants_preview("agent.message"));
        b.publish_preview("agent.message", &[("event_start", "{}".into())]);
        assert_eq!(
            live.try_recv().unwrap(),
            Frame::Data(format_frame("x", "{}"))
        );
        assert!(live.try_recv().is_err());
        assert_eq!(
            preview.try_recv().unwrap(),
            Frame::Data(format_frame("x", "{}"))
        );
        assert_eq!(
            preview.try_recv().unwrap(),
            Frame::Data(format_frame("event_start", "{}"))
        );
        b.close();
        assert_eq!(live.try_recv().unwrap(), Frame::End);
    }

    #[test]
    fn pump_writes_frames_heartbeats_and_stops_at_end() {
        let mut b = Broadcaster::default();
        let rx = b.subscribe(vec![]);
        b.publish("a", "{}");
        let mut out = Vec::new();
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(120));
            b.close();
        });
        {
            let mut chunks = ChunkedWriter::new(&mut out);
            pump(
                &rx,
                &mut chunks,
                Some(Duration::from_millis(40)),
                HeartbeatKind::Comment,
            )
            .unwrap();
        }
        handle.join().unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("13\r\nevent: a\ndata: {}\n\n\r\n"),
            "{text:?}"
        );
        assert!(text.contains("8\r\n: ping\n\n\r\n"));
    }
}
