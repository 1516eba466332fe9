//! Streaming a container's logs to the controller.
//!
//! Each log stream (`stdout`, `stderr`, `supervisor`) has one
//! [`LogWriter`]: a task that owns the stream's byte offset and a buffer.
//! Producers send it chunks. It sends the buffer to a [`LogSink`] when the
//! buffer reaches `flush_bytes` bytes, when `flush_interval` has passed
//! since its first unsent byte, and when the writer is closed. One task
//! per stream sends in order, so bytes reach the controller in order and
//! byte-exact.
//!
//! Appends name their byte offset, and the controller ignores bytes it
//! already has, so an append whose response was lost is simply sent
//! again. The stream may already have other bytes at those offsets, written
//! by an earlier supervisor of the same container. The controller then
//! rejects the append with a conflict, or reports a size past the append's
//! end when the bytes happen to be the same. Either way the writer logs a
//! warning and appends after the stored bytes, so neither writer's bytes
//! are lost. A stream that has to move more than [`MAX_REALIGNMENTS`]
//! times for one append gives up.
//! Transient failures are retried with backoff until `retry_timeout`; a
//! stream whose append fails for good stops sending, keeps consuming (so
//! the container never blocks on it) and counts the bytes it dropped.
//!
//! While an append is in flight the writer does not read its channel, and
//! the channel is bounded, so a slow controller slows the producer down
//! instead of growing memory.
//!
//! A writer may be *held*: it buffers but sends nothing until its release
//! token is cancelled (or it is closed). The supervisor holds the
//! container's stdout and stderr until the container is `Running`, so no
//! reader sees output of a container that is not yet `Running`.
//!
//! [`SupervisorLog`] writes the supervisor's own timestamped lines: to
//! `tracing`, and to the `supervisor` stream once one is attached.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_client::{Client, ClientError};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::retry::{retry, Backoff, API_BACKOFF};

/// The largest body of one append request. A buffer that grew past it (a
/// large chunk arrived at once) is sent in several appends.
pub const MAX_APPEND_BYTES: usize = 1 << 20;

/// Capacity of a writer's channel, in chunks; producers wait when it is full.
const CHANNEL_CHUNKS: usize = 64;

/// Times one append moves past bytes that another writer added, before the
/// stream gives up. One move covers an earlier supervisor of the same
/// container; repeated moves mean a concurrent writer.
const MAX_REALIGNMENTS: u32 = 2;

/// A destination for log bytes: the controller's log endpoint, or a
/// recording in tests.
#[async_trait]
pub trait LogSink: Send + Sync + 'static {
    /// Appends `data` to `stream` at byte `offset` and returns the
    /// stream's size afterwards as the server reports it (0 if it did not).
    async fn append(&self, stream: &str, offset: u64, data: Bytes) -> Result<u64, ClientError>;
}

/// The controller's live log endpoint for one container.
#[derive(Debug, Clone)]
pub struct ApiLogSink {
    client: Client,
    container_uuid: String,
}

impl ApiLogSink {
    pub fn new(client: Client, container_uuid: String) -> ApiLogSink {
        ApiLogSink {
            client,
            container_uuid,
        }
    }
}

#[async_trait]
impl LogSink for ApiLogSink {
    async fn append(&self, stream: &str, offset: u64, data: Bytes) -> Result<u64, ClientError> {
        self.client
            .append_log(&self.container_uuid, stream, offset, data)
            .await
    }
}

/// Batching and retry settings of a log writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    pub flush_bytes: usize,
    pub flush_interval: Duration,
    pub retry_timeout: Duration,
    pub backoff: Backoff,
}

impl LogSettings {
    pub fn from_config(config: &crate::Config) -> LogSettings {
        LogSettings {
            flush_bytes: config.log_flush_bytes.max(1),
            flush_interval: config.log_flush_interval,
            retry_timeout: config.log_retry_timeout,
            backoff: API_BACKOFF,
        }
    }
}

/// A writer's account of its stream, returned when it is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    pub stream: &'static str,
    /// Bytes the controller acknowledged.
    pub bytes_sent: u64,
    /// Bytes dropped after an append failed for good.
    pub bytes_dropped: u64,
    /// The failure that made the stream stop sending.
    pub error: Option<String>,
}

/// The sending side of a writer. Cloning it is cheap.
#[derive(Debug, Clone)]
pub struct LogInput {
    sender: mpsc::Sender<Bytes>,
}

impl LogInput {
    /// Queues `data`, waiting while the writer's channel is full. Bytes
    /// sent after the writer ended are discarded.
    pub async fn send(&self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        // The writer ends only after every input is dropped or when it is
        // aborted, so a failed send has no reader to reach.
        let _ = self.sender.send(data).await;
    }
}

/// A local copy of a log stream: the bytes its writer sends, appended to
/// a file in the same order, for the log collection.
#[derive(Debug, Clone)]
pub struct LogCopy {
    file: Arc<Mutex<Option<std::fs::File>>>,
    path: std::path::PathBuf,
}

impl LogCopy {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: &std::path::Path) -> std::io::Result<LogCopy> {
        let file = std::fs::File::create(path)?;
        Ok(LogCopy {
            file: Arc::new(Mutex::new(Some(file))),
            path: path.to_path_buf(),
        })
    }

    /// Refers to a file that nothing appends to.
    pub fn open_existing(path: &std::path::Path) -> LogCopy {
        LogCopy {
            file: Arc::new(Mutex::new(None)),
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends `data`. After a write error the copy stops, and the error
    /// is logged once: the live stream goes on without it.
    fn append(&self, stream: &str, data: &[u8]) {
        use std::io::Write;
        let mut guard = match self.file.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(file) = guard.as_mut() {
            if let Err(error) = file.write_all(data) {
                tracing::error!(
                    stream,
                    path = %self.path.display(),
                    error = %error,
                    "failed to write the local copy of the log; the log collection will miss the rest of this stream"
                );
                *guard = None;
            }
        }
    }
}

/// One log stream's writer task.
#[derive(Debug)]
pub struct LogWriter {
    stream: &'static str,
    input: Option<LogInput>,
    release: Option<CancellationToken>,
    task: JoinHandle<LogSummary>,
}

impl LogWriter {
    /// Starts a writer for `stream`. Must be called within a Tokio runtime.
    pub fn spawn(sink: Arc<dyn LogSink>, stream: &'static str, settings: LogSettings) -> LogWriter {
        LogWriter::start(sink, stream, settings, None, None)
    }

    /// Starts a writer that also appends every byte it sends to `copy`,
    /// held until `release` is cancelled if one is given.
    pub fn spawn_copied(
        sink: Arc<dyn LogSink>,
        stream: &'static str,
        settings: LogSettings,
        release: Option<CancellationToken>,
        copy: LogCopy,
    ) -> LogWriter {
        LogWriter::start(sink, stream, settings, release, Some(copy))
    }

    /// Starts a held writer for `stream`: it sends nothing until `release`
    /// is cancelled or the writer is closed.
    pub fn spawn_held(
        sink: Arc<dyn LogSink>,
        stream: &'static str,
        settings: LogSettings,
        release: CancellationToken,
    ) -> LogWriter {
        LogWriter::start(sink, stream, settings, Some(release), None)
    }

    fn start(
        sink: Arc<dyn LogSink>,
        stream: &'static str,
        settings: LogSettings,
        release: Option<CancellationToken>,
        copy: Option<LogCopy>,
    ) -> LogWriter {
        let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
        let writer = Writer {
            sink,
            stream,
            settings,
            release: release.clone(),
            copy,
            offset: 0,
            dropped: 0,
            error: None,
        };
        let task = tokio::spawn(run_writer(writer, receiver).in_current_span());
        LogWriter {
            stream,
            input: Some(LogInput { sender }),
            release,
            task,
        }
    }

    /// Returns a handle that sends into this stream.
    pub fn input(&self) -> LogInput {
        match &self.input {
            Some(input) => input.clone(),
            None => {
                // Unreachable while the writer is alive: only close() takes
                // the input, and it consumes the writer.
                let (sender, _) = mpsc::channel(1);
                LogInput { sender }
            }
        }
    }

    /// Sends what is buffered and ends the writer once every other
    /// [`LogInput`] has been dropped too. Returns its summary.
    pub async fn close(mut self) -> LogSummary {
        drop(self.input.take());
        if let Some(release) = &self.release {
            release.cancel();
        }
        let stream = self.stream;
        (&mut self.task).await.unwrap_or_else(|err| LogSummary {
            stream,
            bytes_sent: 0,
            bytes_dropped: 0,
            error: Some(format!("the log writer task failed: {err}")),
        })
    }
}

/// The writer's state: the next offset and whether it gave up.
struct Writer {
    sink: Arc<dyn LogSink>,
    stream: &'static str,
    settings: LogSettings,
    /// Cancelled when a held writer may send.
    release: Option<CancellationToken>,
    /// Receives each byte as it is sent, dropped ones included.
    copy: Option<LogCopy>,
    offset: u64,
    dropped: u64,
    error: Option<String>,
}

async fn run_writer(mut writer: Writer, mut receiver: mpsc::Receiver<Bytes>) -> LogSummary {
    let settings = writer.settings;
    let mut buffer = BytesMut::new();
    let mut deadline: Option<Instant> = None;
    loop {
        let flush_at = deadline;
        tokio::select! {
            received = receiver.recv() => match received {
                Some(data) => {
                    buffer.extend_from_slice(&data);
                    if deadline.is_none() {
                        deadline = Some(Instant::now() + settings.flush_interval);
                    }
                    if buffer.len() >= settings.flush_bytes {
                        writer.flush(buffer.split().freeze()).await;
                        deadline = None;
                    }
                }
                None => break,
            },
            _ = sleep_until(flush_at), if flush_at.is_some() => {
                writer.flush(buffer.split().freeze()).await;
                deadline = None;
            }
        }
    }
    writer.flush(buffer.split().freeze()).await;
    LogSummary {
        stream: writer.stream,
        bytes_sent: writer.offset,
        bytes_dropped: writer.dropped,
        error: writer.error,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

impl Writer {
    async fn flush(&mut self, mut data: Bytes) {
        if data.is_empty() {
            return;
        }
        if let Some(release) = &self.release {
            release.cancelled().await;
        }
        if let Some(copy) = &self.copy {
            copy.append(self.stream, &data);
        }
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(MAX_APPEND_BYTES));
            self.send(piece).await;
        }
    }

    async fn send(&mut self, data: Bytes) {
        if self.error.is_some() {
            self.dropped += data.len() as u64;
            return;
        }
        let length = data.len() as u64;
        let what = format!(
            "appending {length} bytes to the {} log at offset {}",
            self.stream, self.offset
        );
        let mut offset = self.offset;
        let mut realignments = 0;
        loop {
            let sink = &self.sink;
            let stream = self.stream;
            let result = retry(
                &what,
                self.settings.retry_timeout,
                self.settings.backoff,
                ClientError::is_transient,
                || sink.append(stream, offset, data.clone()),
            )
            .await;
            // The stream already had bytes at our offsets, written by an
            // earlier supervisor of this container, which may be locked
            // more than once. The server wrote none of ours: either they
            // differ from the stored ones (a conflict), or they are the same
            // but more bytes follow. Ours are sent again after the stored
            // bytes.
            let stored_size = match result {
                Err(ClientError::LogConflict { size, message, .. }) => {
                    tracing::warn!(
                        stream,
                        offset,
                        size,
                        error = %message,
                        "the log stream already contains other bytes at this offset; appending after them"
                    );
                    size
                }
                Ok(size) if size > offset + length => {
                    tracing::warn!(
                        stream,
                        offset,
                        size,
                        "the log stream already contains bytes from an earlier writer; appending after them"
                    );
                    size
                }
                Ok(_) => {
                    self.offset = offset + length;
                    return;
                }
                Err(error) => {
                    tracing::error!(
                        stream,
                        offset,
                        error = %error,
                        "failed to send log bytes; dropping the rest of this stream"
                    );
                    self.error = Some(error.to_string());
                    self.dropped += length;
                    return;
                }
            };
            if realignments == MAX_REALIGNMENTS {
                let error = format!(
                    "another writer keeps appending to the {stream} log (now {stored_size} bytes)"
                );
                tracing::error!(stream, "{error}; dropping the rest of this stream");
                self.error = Some(error);
                self.dropped += length;
                return;
            }
            offset = stored_size;
            realignments += 1;
        }
    }
}

/// The level of a supervisor log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// The supervisor's own log: each line goes to `tracing` at once and, as
/// `<RFC 3339 time> <LEVEL> <message>\n`, to the `supervisor` stream.
/// Lines written before a stream is attached are kept and sent when it is.
/// Never give it a secret.
#[derive(Debug, Clone, Default)]
pub struct SupervisorLog {
    state: Arc<Mutex<SupervisorLogState>>,
}

#[derive(Debug, Default)]
struct SupervisorLogState {
    pending: Vec<Bytes>,
    output: Option<mpsc::UnboundedSender<Bytes>>,
}

impl SupervisorLog {
    pub fn new() -> SupervisorLog {
        SupervisorLog::default()
    }

    pub fn info(&self, message: impl AsRef<str>) {
        tracing::info!("{}", message.as_ref());
        self.record(Level::Info, message.as_ref());
    }

    pub fn warn(&self, message: impl AsRef<str>) {
        tracing::warn!("{}", message.as_ref());
        self.record(Level::Warn, message.as_ref());
    }

    pub fn error(&self, message: impl AsRef<str>) {
        tracing::error!("{}", message.as_ref());
        self.record(Level::Error, message.as_ref());
    }

    fn record(&self, level: Level, message: &str) {
        let line = format_line(&chrono::Utc::now(), level, message);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        match &state.output {
            Some(output) => {
                let _ = output.send(line);
            }
            None => state.pending.push(line),
        }
    }

    /// Starts sending lines to `writer`: the kept ones first, then each new
    /// one. The lines pass through an unbounded channel, so logging never
    /// waits. Only the supervisor's own messages use it, never the
    /// container's output, so its size follows the supervisor's few lines
    /// rather than the container's volume.
    pub fn attach(&self, writer: &LogWriter) -> JoinHandle<()> {
        let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
        if let Ok(mut state) = self.state.lock() {
            for line in state.pending.drain(..) {
                let _ = sender.send(line);
            }
            state.output = Some(sender);
        }
        let input = writer.input();
        tokio::spawn(async move {
            while let Some(line) = receiver.recv().await {
                input.send(line).await;
            }
        })
    }

    /// Returns the lines kept while no stream is attached, as text.
    pub fn pending_lines(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|state| {
                state
                    .pending
                    .iter()
                    .map(|line| String::from_utf8_lossy(line).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops sending lines to the stream; later lines go to `tracing` only.
    pub fn detach(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.output = None;
        }
    }
}

fn format_line(time: &chrono::DateTime<chrono::Utc>, level: Level, message: &str) -> Bytes {
    let mut line = format!(
        "{} {} {}",
        berth_core::time::format(time),
        level.as_str(),
        message.trim_end()
    );
    line.push('\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn api_error(status: u16) -> ClientError {
        ClientError::Api {
            method: reqwest::Method::POST,
            url: "http://127.0.0.1/arvados/v1/containers/x/log/stdout".into(),
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            message: "test failure".into(),
            retry_after: None,
        }
    }

    /// A sink that keeps each stream's bytes as the controller does (bytes
    /// it already has are ignored, different bytes at stored offsets are a
    /// conflict, a gap is rejected with 422), records every call, and fails
    /// the first `failures` calls with `status`.
    #[derive(Default)]
    struct RecordingSink {
        streams: Mutex<HashMap<String, Vec<u8>>>,
        calls: Mutex<Vec<(String, u64, Vec<u8>)>>,
        failures: Mutex<u32>,
        failure_status: u16,
    }

    impl RecordingSink {
        fn failing(failures: u32, status: u16) -> RecordingSink {
            RecordingSink {
                failures: Mutex::new(failures),
                failure_status: status,
                ..Default::default()
            }
        }

        fn stored(&self, stream: &str) -> Vec<u8> {
            self.streams
                .lock()
                .unwrap()
                .get(stream)
                .cloned()
                .unwrap_or_default()
        }

        fn calls(&self) -> Vec<(String, u64, Vec<u8>)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl LogSink for RecordingSink {
        async fn append(&self, stream: &str, offset: u64, data: Bytes) -> Result<u64, ClientError> {
            self.calls
                .lock()
                .unwrap()
                .push((stream.to_string(), offset, data.to_vec()));
            {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    return Err(api_error(self.failure_status));
                }
            }
            let mut streams = self.streams.lock().unwrap();
            let stored = streams.entry(stream.to_string()).or_default();
            let offset = offset as usize;
            if offset > stored.len() {
                return Err(api_error(422));
            }
            let already = stored.len() - offset;
            let overlap = already.min(data.len());
            if stored[offset..offset + overlap] != data[..overlap] {
                return Err(ClientError::LogConflict {
                    url: "http://127.0.0.1/arvados/v1/containers/x/log/stdout".into(),
                    size: stored.len() as u64,
                    message: "test conflict".into(),
                });
            }
            if data.len() > already {
                stored.extend_from_slice(&data[already..]);
            }
            Ok(stored.len() as u64)
        }
    }

    fn settings(flush_bytes: usize) -> LogSettings {
        LogSettings {
            flush_bytes,
            flush_interval: Duration::from_millis(250),
            retry_timeout: Duration::from_secs(60),
            backoff: Backoff {
                initial: Duration::from_millis(10),
                max: Duration::from_millis(100),
                jitter: crate::retry::Jitter::Equal,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn small_writes_are_sent_together_after_the_interval() {
        let sink = Arc::new(RecordingSink::default());
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(1024));
        let input = writer.input();
        input.send(Bytes::from_static(b"a\n")).await;
        input.send(Bytes::from_static(b"b")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(sink.calls().is_empty(), "sent before the interval");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            sink.calls(),
            vec![("stdout".to_string(), 0, b"a\nb".to_vec())]
        );
        drop(input);
        let summary = writer.close().await;
        assert_eq!(summary.bytes_sent, 3);
        assert_eq!(summary.error, None);
    }

    #[tokio::test(start_paused = true)]
    async fn full_buffer_is_sent_at_once() {
        let sink = Arc::new(RecordingSink::default());
        let writer = LogWriter::spawn(sink.clone(), "stderr", settings(64));
        let input = writer.input();
        let mut expected = Vec::new();
        for i in 0..5u8 {
            // Bytes that are not UTF-8 must pass unchanged.
            let chunk = [0xff, 0xfe, i, b'\n'].repeat(10);
            expected.extend_from_slice(&chunk);
            input.send(Bytes::from(chunk)).await;
        }
        drop(input);
        let summary = writer.close().await;
        assert_eq!(sink.stored("stderr"), expected);
        assert_eq!(summary.bytes_sent, expected.len() as u64);
        let calls = sink.calls();
        assert!(calls.len() >= 3, "{} appends", calls.len());
        let mut next = 0;
        for (stream, offset, data) in calls {
            assert_eq!(stream, "stderr");
            assert_eq!(offset, next);
            next += data.len() as u64;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn held_writer_waits_for_its_release() {
        let sink = Arc::new(RecordingSink::default());
        let release = CancellationToken::new();
        let writer = LogWriter::spawn_held(sink.clone(), "stdout", settings(4), release.clone());
        let input = writer.input();
        input.send(Bytes::from_static(b"early output")).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(sink.calls().is_empty(), "sent while held");

        release.cancel();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sink.stored("stdout"), b"early output");
        drop(input);
        writer.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn closing_a_held_writer_sends_its_bytes() {
        let sink = Arc::new(RecordingSink::default());
        let writer = LogWriter::spawn_held(
            sink.clone(),
            "stderr",
            settings(4),
            CancellationToken::new(),
        );
        writer
            .input()
            .send(Bytes::from_static(b"failed to start"))
            .await;
        let summary = writer.close().await;
        assert_eq!(sink.stored("stderr"), b"failed to start");
        assert_eq!(summary.bytes_sent, 15);
    }

    #[tokio::test(start_paused = true)]
    async fn close_sends_the_rest_before_returning() {
        let sink = Arc::new(RecordingSink::default());
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(1 << 16));
        writer.input().send(Bytes::from_static(b"last words")).await;
        let summary = writer.close().await;
        assert_eq!(sink.stored("stdout"), b"last words");
        assert_eq!(summary.bytes_sent, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_at_the_same_offset() {
        let sink = Arc::new(RecordingSink::failing(3, 503));
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(4));
        let input = writer.input();
        input.send(Bytes::from_static(b"abcd")).await;
        input.send(Bytes::from_static(b"efgh")).await;
        drop(input);
        let summary = writer.close().await;
        assert_eq!(sink.stored("stdout"), b"abcdefgh");
        assert_eq!(summary.error, None);
        let offsets: Vec<u64> = sink.calls().iter().map(|call| call.1).collect();
        assert_eq!(offsets, vec![0, 0, 0, 0, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failure_drops_the_rest_and_reports_it() {
        let sink = Arc::new(RecordingSink::failing(1, 403));
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(4));
        let input = writer.input();
        input.send(Bytes::from_static(b"abcd")).await;
        input.send(Bytes::from_static(b"efgh")).await;
        drop(input);
        let summary = writer.close().await;
        assert_eq!(sink.calls().len(), 1);
        assert_eq!(summary.bytes_sent, 0);
        assert_eq!(summary.bytes_dropped, 8);
        assert!(summary.error.unwrap().contains("403"));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_end_when_the_retry_timeout_is_spent() {
        let sink = Arc::new(RecordingSink::failing(u32::MAX, 503));
        let mut settings = settings(4);
        settings.retry_timeout = Duration::from_secs(2);
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings);
        writer.input().send(Bytes::from_static(b"abcd")).await;
        let summary = writer.close().await;
        assert_eq!(summary.bytes_dropped, 4);
        assert!(sink.calls().len() > 2, "{} calls", sink.calls().len());
    }

    #[tokio::test(start_paused = true)]
    async fn earlier_writer_bytes_are_kept() {
        let sink = Arc::new(RecordingSink::default());
        sink.streams
            .lock()
            .unwrap()
            .insert("supervisor".into(), b"earlier attempt\n".to_vec());
        let writer = LogWriter::spawn(sink.clone(), "supervisor", settings(1024));
        writer
            .input()
            .send(Bytes::from_static(b"this attempt\n"))
            .await;
        let summary = writer.close().await;
        assert_eq!(
            sink.stored("supervisor"),
            b"earlier attempt\nthis attempt\n"
        );
        assert_eq!(summary.bytes_sent, 29);
    }

    #[tokio::test(start_paused = true)]
    async fn different_earlier_bytes_are_not_merged() {
        let sink = Arc::new(RecordingSink::default());
        sink.streams
            .lock()
            .unwrap()
            .insert("stdout".into(), b"old\n".to_vec());
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(1024));
        writer
            .input()
            .send(Bytes::from_static(b"new output\n"))
            .await;
        writer.input().send(Bytes::from_static(b"more\n")).await;
        let summary = writer.close().await;
        assert_eq!(sink.stored("stdout"), b"old\nnew output\nmore\n");
        assert_eq!(summary.error, None);
        assert_eq!(summary.bytes_dropped, 0);
        let offsets: Vec<u64> = sink.calls().iter().map(|call| call.1).collect();
        assert_eq!(offsets, vec![0, 4]);
    }

    /// A sink where another writer adds more bytes than ours before each of
    /// our appends.
    struct ContestedSink(RecordingSink);

    #[async_trait]
    impl LogSink for ContestedSink {
        async fn append(&self, stream: &str, offset: u64, data: Bytes) -> Result<u64, ClientError> {
            let size = self.0.stored(stream).len() as u64;
            self.0
                .append(stream, size, Bytes::from_static(b"xxxxxxxx"))
                .await?;
            self.0.append(stream, offset, data).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_writer_makes_the_stream_give_up() {
        let sink = Arc::new(ContestedSink(RecordingSink::default()));
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(4));
        writer.input().send(Bytes::from_static(b"abcd")).await;
        let summary = writer.close().await;
        assert_eq!(summary.bytes_dropped, 4);
        assert!(summary.error.unwrap().contains("another writer"));
        assert_eq!(sink.0.calls().len(), 2 * (MAX_REALIGNMENTS as usize + 1));
    }

    #[tokio::test(start_paused = true)]
    async fn large_buffer_is_split_into_bounded_appends() {
        let sink = Arc::new(RecordingSink::default());
        let writer = LogWriter::spawn(sink.clone(), "stdout", settings(64));
        let big = vec![7u8; MAX_APPEND_BYTES * 2 + 5];
        writer.input().send(Bytes::from(big.clone())).await;
        writer.close().await;
        assert_eq!(sink.stored("stdout"), big);
        let sizes: Vec<usize> = sink.calls().iter().map(|call| call.2.len()).collect();
        assert_eq!(sizes, vec![MAX_APPEND_BYTES, MAX_APPEND_BYTES, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn supervisor_lines_before_attach_are_kept() {
        let sink = Arc::new(RecordingSink::default());
        let log = SupervisorLog::new();
        log.info("first line");
        let writer = LogWriter::spawn(sink.clone(), "supervisor", settings(1 << 16));
        let forward = log.attach(&writer);
        log.warn("second line\n");
        log.detach();
        log.error("only in tracing");
        forward.await.unwrap();
        writer.close().await;
        let text = String::from_utf8(sink.stored("supervisor")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(lines[0].ends_with(" INFO first line"), "{text:?}");
        assert!(lines[1].ends_with(" WARN second line"), "{text:?}");
        let time = lines[0].split(' ').next().unwrap();
        assert!(berth_core::time::parse(time).is_ok(), "{time:?}");
    }
}
