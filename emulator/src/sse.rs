//! Server-sent events: frame formatting, the per-session [`Broadcaster`] and the [`pump`]
//! that copies a subscriber's frames onto its HTTP connection.
//!
//! Every open stream owns an unbounded channel, so publishing (done under the store lock)
//! never blocks on a slow or dead client: a stream whose connection fails stops pumping,
//! drops its [`Subscription`], and the next publish prunes it.
//!
//! Unbounded channels are fine for ordinary events (small, a handful per turn) but not for
//! the `emulator:large` turn, which may push gigabytes. So every stream also carries a
//! [`StreamGauge`]: the bytes queued on its channel but not yet written to its socket, and
//! whether its receiving end is gone. A producer of bulk output calls [`wait_for_backlog`]
//! (without holding the store lock) before each big frame, i.e. it *blocks* until every
//! live stream has drained below a limit. Dead streams never hold it up, and a stream whose
//! backlog makes no progress for the stall timeout is *detached*: it gets no further frames,
//! its pump writes what was already queued and then ends the response (the socket write
//! timeout alone would take minutes, as the kernel keeps accepting trickles of data).
//! Frames are reference-counted, so a frame sent to several streams is held in memory once.
//!
//! Fault injection (the `emulator:fault` turns of [`crate::script`]) adds three items: raw
//! bytes that need not be UTF-8 or well-formed SSE ([`Frame::Raw`]), an abort that ends the
//! connection mid-body without the chunked terminator, as a reset upstream does
//! ([`Frame::Abort`]), and a hang: nothing more, not even heartbeats, for a while, then the
//! same abort ([`Frame::Hang`]). After an abort or a hang the stream gets no further frames.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[cfg(test)]
use crate::http::ChunkedWriter;
use crate::http::FrameSink;

/// One item on a subscriber's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A fully formatted SSE frame (shared by every stream it was sent to).
    Data(Arc<String>),
    /// Bytes written as they are (fault injection: invalid UTF-8, malformed SSE).
    Raw(Arc<Vec<u8>>),
    /// The stream must end (the session was deleted).
    End,
    /// The connection is dropped mid-body, without the chunked terminator (a reset).
    Abort,
    /// Nothing is written (no heartbeats either) for this long, then [`Frame::Abort`].
    Hang(Duration),
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

/// Flow-control state shared by a stream's publisher side and its pump.
#[derive(Debug, Default)]
pub struct StreamGauge {
    /// Bytes of [`Frame::Data`] sent to the channel and not yet written to the client.
    queued: AtomicUsize,
    /// The receiving end was dropped (the pump ended or never started).
    closed: AtomicBool,
    /// A bulk producer gave up on this stream; the next publish drops its sender.
    detached: AtomicBool,
}

impl StreamGauge {
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::SeqCst)
    }

    fn written(&self, bytes: usize) {
        // Never underflows: every decrement follows the matching increment.
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                Some(q.saturating_sub(bytes))
            });
    }
}

/// The receiving end of one stream; dropping it marks the stream closed.
pub struct Subscription {
    rx: Receiver<Frame>,
    gauge: Arc<StreamGauge>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.gauge.closed.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Subscription {
    pub fn try_recv(&self) -> Result<Frame, mpsc::TryRecvError> {
        let frame = self.rx.try_recv()?;
        if let Frame::Data(data) = &frame {
            self.gauge.written(data.len());
        }
        Ok(frame)
    }
}

struct Subscriber {
    tx: Sender<Frame>,
    /// Event types this stream asked previews for (`event_deltas[]=`).
    previews: Vec<String>,
    gauge: Arc<StreamGauge>,
}

impl Subscriber {
    /// Queues `frame`; false when the stream is gone.
    fn send(&self, frame: &Arc<String>) -> bool {
        self.send_counted(Frame::Data(Arc::clone(frame)), frame.len())
    }

    /// Queues `frame` of `len` bytes; false when the stream is gone.
    fn send_counted(&self, frame: Frame, len: usize) -> bool {
        if self.gauge.is_detached() {
            return false;
        }
        self.gauge.queued.fetch_add(len, Ordering::SeqCst);
        if self.tx.send(frame).is_ok() {
            true
        } else {
            self.gauge.written(len);
            false
        }
    }
}

/// The set of open streams of one session.
#[derive(Default)]
pub struct Broadcaster {
    subscribers: Vec<Subscriber>,
}

impl Broadcaster {
    /// Registers a new stream; it receives only frames published from now on.
    pub fn subscribe(&mut self, previews: Vec<String>) -> Subscription {
        let (tx, rx) = mpsc::channel();
        let gauge = Arc::new(StreamGauge::default());
        self.subscribers.push(Subscriber {
            tx,
            previews,
            gauge: Arc::clone(&gauge),
        });
        Subscription { rx, gauge }
    }

    /// Sends an event frame to every stream, dropping streams that have gone away.
    pub fn publish(&mut self, event_type: &str, json: &str) {
        self.publish_frame(&Arc::new(format_frame(event_type, json)));
    }

    /// Sends an already formatted frame to every stream, dropping streams that have gone
    /// away.
    pub fn publish_frame(&mut self, frame: &Arc<String>) {
        self.subscribers.retain(|s| s.send(frame));
    }

    /// The flow-control gauges of the open streams, for [`wait_for_backlog`].
    pub fn gauges(&self) -> Vec<Arc<StreamGauge>> {
        self.subscribers
            .iter()
            .map(|s| Arc::clone(&s.gauge))
            .collect()
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
                .all(|(name, json)| s.send(&Arc::new(format_frame(name, json))))
        });
    }

    /// Sends raw bytes (need not be UTF-8 or valid SSE) to every stream.
    pub fn publish_raw(&mut self, bytes: &Arc<Vec<u8>>) {
        self.subscribers
            .retain(|s| s.send_counted(Frame::Raw(Arc::clone(bytes)), bytes.len()));
    }

    /// Ends every stream with `last` ([`Frame::Abort`] or [`Frame::Hang`]): after what was
    /// already queued, the connection is dropped mid-body. The streams get nothing more.
    pub fn fail(&mut self, last: &Frame) {
        for s in self.subscribers.drain(..) {
            let _ = s.tx.send(last.clone());
        }
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

/// Blocks until every stream in `gauges` is closed, detached or has at most `limit` bytes
/// queued. A stream over the limit whose backlog has not shrunk for `stall` is detached
/// (see the module doc). Returns false, without waiting further, as soon as `stop()` holds.
pub fn wait_for_backlog(
    gauges: &[Arc<StreamGauge>],
    limit: usize,
    stall: Duration,
    stop: impl Fn() -> bool,
) -> bool {
    let start = Instant::now();
    // Per stream: the smallest backlog seen and when it was seen.
    let mut progress: Vec<(usize, Instant)> = gauges.iter().map(|g| (g.queued(), start)).collect();
    loop {
        if stop() {
            return false;
        }
        let now = Instant::now();
        let mut blocked = false;
        for (g, (least, at)) in gauges.iter().zip(&mut progress) {
            if g.is_closed() || g.is_detached() {
                continue;
            }
            let queued = g.queued();
            if queued <= limit {
                continue;
            }
            if queued < *least {
                (*least, *at) = (queued, now);
            }
            if now.duration_since(*at) >= stall {
                g.detached.store(true, Ordering::SeqCst);
                eprintln!(
                    "ma-emulator: detaching an SSE stream stalled for {stall:?} with {queued} bytes queued"
                );
                continue;
            }
            blocked = true;
        }
        if !blocked {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Copies frames from `sub` to `out` until [`Frame::End`], the channel closing, or a write
/// error; emits a heartbeat every `heartbeat` (none when `None`).
pub fn pump(
    sub: &Subscription,
    out: &mut dyn FrameSink,
    heartbeat: Option<Duration>,
    kind: HeartbeatKind,
) -> io::Result<()> {
    let rx = &sub.rx;
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
            Some(Frame::Data(frame)) => {
                out.send(frame.as_bytes())?;
                sub.gauge.written(frame.len());
            }
            Some(Frame::Raw(bytes)) => {
                out.send(&bytes)?;
                sub.gauge.written(bytes.len());
            }
            Some(Frame::End) => return Ok(()),
            Some(Frame::Abort) => return Err(aborted()),
            Some(Frame::Hang(hold)) => {
                thread::sleep(hold);
                return Err(aborted());
            }
            None => {
                out.send(kind.frame().as_bytes())?;
                next_beat = heartbeat.map(|every| Instant::now() + every);
            }
        }
    }
}

/// The error that makes the server drop a connection mid-body.
fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "stream aborted by an injected fault",
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn raw_frames_pass_verbatim_and_faults_end_the_body_with_an_error() {
        let mut b = Broadcaster::default();
        let sub = b.subscribe(vec![]);
        let gauges = b.gauges();
        b.publish_raw(&Arc::new(b"data: \xff\xfe\n\n".to_vec()));
        b.fail(&Frame::Abort);
        assert_eq!(b.len(), 0, "failed streams get nothing more");
        b.publish("late", "{}");
        let mut out = Vec::new();
        let err = pump(
            &sub,
            &mut ChunkedWriter::new(&mut out),
            None,
            HeartbeatKind::Comment,
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(out, b"a\r\ndata: \xff\xfe\n\n\r\n");
        assert_eq!(gauges[0].queued(), 0);

        let sub = b.subscribe(vec![]);
        b.fail(&Frame::Hang(Duration::from_millis(60)));
        let began = Instant::now();
        let mut out = Vec::new();
        assert!(pump(
            &sub,
            &mut ChunkedWriter::new(&mut out),
            Some(Duration::from_millis(5)),
            HeartbeatKind::Comment,
        )
        .is_err());
        assert!(began.elapsed() >= Duration::from_millis(60));
        assert!(out.is_empty(), "no heartbeat while hanging: {out:?}");
    }

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
            Frame::Data(format_frame("x", "{}").into())
        );
        assert!(live.try_recv().is_err());
        assert_eq!(
            preview.try_recv().unwrap(),
            Frame::Data(format_frame("x", "{}").into())
        );
        assert_eq!(
            preview.try_recv().unwrap(),
            Frame::Data(format_frame("event_start", "{}").into())
        );
        b.close();
        assert_eq!(live.try_recv().unwrap(), Frame::End);
    }

    #[test]
    fn gauges_count_queued_bytes_and_release_waiters() {
        let mut b = Broadcaster::default();
        let slow = b.subscribe(vec![]);
        let gone = b.subscribe(vec![]);
        let gauges = b.gauges();
        let frame = Arc::new("x".repeat(1000));
        for _ in 0..3 {
            b.publish_frame(&frame);
        }
        assert_eq!(gauges[0].queued(), 3000);
        assert!(!gauges[1].is_closed());
        drop(gone);
        assert!(gauges[1].is_closed());
        b.publish_frame(&frame);
        assert_eq!(b.len(), 1, "the dropped stream is pruned");
        // Over the limit and nobody reading: only `stop` (or a stall) ends the wait.
        let long = Duration::from_secs(60);
        assert!(!wait_for_backlog(&gauges, 2500, long, || true));
        let waiter = {
            let gauges = gauges.clone();
            std::thread::spawn(move || wait_for_backlog(&gauges, 2500, long, || false))
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished());
        slow.try_recv().unwrap();
        slow.try_recv().unwrap();
        assert_eq!(gauges[0].queued(), 2000);
        assert!(waiter.join().unwrap());
        drop(slow);
        assert!(wait_for_backlog(&gauges, 0, long, || false));
    }

    #[test]
    fn stalled_streams_are_detached_and_end_after_their_backlog() {
        let mut b = Broadcaster::default();
        let stalled = b.subscribe(vec![]);
        let fine = b.subscribe(vec![]);
        let gauges = b.gauges();
        b.publish("a", "{}");
        b.publish("b", "{}");
        fine.try_recv().unwrap();
        fine.try_recv().unwrap();
        let began = Instant::now();
        assert!(wait_for_backlog(
            &gauges,
            1,
            Duration::from_millis(50),
            || false
        ));
        assert!(began.elapsed() >= Duration::from_millis(50));
        assert!(gauges[0].is_detached() && !gauges[1].is_detached());
        b.publish("c", "{}");
        assert_eq!(b.len(), 1);
        let mut out = Vec::new();
        pump(
            &stalled,
            &mut ChunkedWriter::new(&mut out),
            None,
            HeartbeatKind::Comment,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("event: b\n") && !text.contains("event: c\n"),
            "{text}"
        );
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
