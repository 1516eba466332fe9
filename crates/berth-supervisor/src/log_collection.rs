//! The container's log collection.
//!
//! Each log stream's writer appends what it sends to a local file
//! ([`LogCopy`]), so the collection contains the bytes the live log API
//! returned, in the same order. The files are `stdout.txt`, `stderr.txt`,
//! `crunch-run.txt` (the supervisor's own log, under the name Arvados
//! clients read), `crunchstat.txt` (the container's resource use) and
//! `node-info.txt`.
//!
//! [`LogCollection::save`] writes the files' new bytes as blocks and
//! creates the collection `logs for <uuid>`, or updates it on later saves.
//! A block that filled up is written once and kept; only the last,
//! partial block of each file is written again by the next save.

use std::path::Path;
use std::time::Duration;

use berth_client::{Client, ClientError};
use berth_core::locator::Locator;
use berth_core::manifest::{ManifestBuilder, Segment};
use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::logs::LogCopy;
use crate::retry::{retry, API_BACKOFF};

/// The log collection's file of the supervisor's own log.
pub const SUPERVISOR_LOG_FILE: &str = "crunch-run.txt";

#[derive(Debug, thiserror::Error)]
pub enum LogSaveError {
    #[error("failed to read the local copy {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write a log block: {0}")]
    Upload(#[source] ClientError),
    #[error("the controller returned an invalid locator {0:?}")]
    Locator(String),
    #[error("failed to build the log manifest: {0}")]
    Manifest(#[source] berth_core::manifest::PathError),
    #[error("failed to save the log collection: {0}")]
    Save(#[source] ClientError),
}

/// One file of the log collection and what of it is written.
#[derive(Debug)]
struct LogFile {
    name: String,
    copy: LogCopy,
    /// Segments of the blocks that filled up.
    full_blocks: Vec<Segment>,
    /// Bytes covered by `full_blocks`.
    full_bytes: u64,
}

/// The local copies of a run's logs and the collection they are saved to.
#[derive(Debug)]
pub struct LogCollection {
    dir: tempfile::TempDir,
    files: Vec<LogFile>,
    block_size: usize,
    retry_timeout: Duration,
    container_uuid: String,
    /// The collection, once the first save created it.
    uuid: Option<String>,
}

impl LogCollection {
    /// Creates a private directory under `base` for the local copies.
    pub fn create(
        base: &Path,
        container_uuid: &str,
        block_size: usize,
        retry_timeout: Duration,
    ) -> std::io::Result<LogCollection> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-logs-{container_uuid}-"))
            .tempdir_in(base)?;
        Ok(LogCollection {
            dir,
            files: Vec::new(),
            block_size,
            retry_timeout,
            container_uuid: container_uuid.to_string(),
            uuid: None,
        })
    }

    /// Returns the directory of the local copies, one file per log file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Adds the file `name` and returns the copy a writer appends to.
    pub fn add_stream(&mut self, name: &str) -> std::io::Result<LogCopy> {
        let copy = LogCopy::create(&self.dir.path().join(name))?;
        self.files.push(LogFile {
            name: name.to_string(),
            copy: copy.clone(),
            full_blocks: Vec::new(),
            full_bytes: 0,
        });
        Ok(copy)
    }

    /// Adds the file `name` with fixed content.
    pub fn add_file(&mut self, name: &str, content: &[u8]) -> std::io::Result<()> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content)?;
        self.files.push(LogFile {
            name: name.to_string(),
            copy: LogCopy::open_existing(&path),
            full_blocks: Vec::new(),
            full_bytes: 0,
        });
        Ok(())
    }

    /// Writes what is new in the files and saves the collection. Returns
    /// its portable data hash.
    pub async fn save(&mut self, client: &Client) -> Result<String, LogSaveError> {
        let mut builder = ManifestBuilder::new();
        for index in 0..self.files.len() {
            let segments = self.write_file(client, index).await?;
            builder
                .add_file(&self.files[index].name, segments)
                .map_err(LogSaveError::Manifest)?;
        }
        let manifest = builder.finish().map_err(LogSaveError::Manifest)?;
        let text = manifest.to_text();
        let saved = match &self.uuid {
            None => {
                let attributes = json!({
                    "name": format!("logs for {}", self.container_uuid),
                    "manifest_text": text,
                });
                retry(
                    "creating the log collection",
                    self.retry_timeout,
                    API_BACKOFF,
                    ClientError::is_transient,
                    || client.create_collection(&attributes),
                )
                .await
            }
            Some(uuid) => {
                let attributes = json!({ "manifest_text": text });
                retry(
                    "updating the log collection",
                    self.retry_timeout,
                    API_BACKOFF,
                    ClientError::is_transient,
                    || client.update_collection(uuid, &attributes),
                )
                .await
            }
        }
        .map_err(LogSaveError::Save)?;
        self.uuid = Some(saved.uuid);
        Ok(saved.portable_data_hash)
    }

    /// Writes the file's bytes after its full blocks. Returns all of its
    /// segments.
    async fn write_file(
        &mut self,
        client: &Client,
        index: usize,
    ) -> Result<Vec<Segment>, LogSaveError> {
        let block_size = self.block_size;
        let retry_timeout = self.retry_timeout;
        let file = &mut self.files[index];
        let path = file.copy.path().to_path_buf();
        let read_error = |source| LogSaveError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut reader = tokio::fs::File::open(&path).await.map_err(read_error)?;
        reader
            .seek(std::io::SeekFrom::Start(file.full_bytes))
            .await
            .map_err(read_error)?;
        let mut segments = file.full_blocks.clone();
        loop {
            let mut buffer = BytesMut::with_capacity(block_size);
            while buffer.len() < block_size {
                let read = (&mut reader)
                    .take((block_size - buffer.len()) as u64)
                    .read_buf(&mut buffer)
                    .await
                    .map_err(read_error)?;
                if read == 0 {
                    break;
                }
            }
            if buffer.is_empty() {
                return Ok(segments);
            }
            let length = buffer.len();
            let data = buffer.freeze();
            let text = retry(
                "writing a log block",
                retry_timeout,
                API_BACKOFF,
                ClientError::is_transient,
                || client.put_block(data.clone()),
            )
            .await
            .map_err(LogSaveError::Upload)?;
            let locator = Locator::parse(&text).map_err(|_| LogSaveError::Locator(text.clone()))?;
            let segment = Segment {
                locator,
                offset: 0,
                length: length as u64,
            };
            segments.push(segment.clone());
            if length < block_size {
                return Ok(segments);
            }
            file.full_blocks.push(segment);
            file.full_bytes += length as u64;
        }
    }
}

/// Describes the node for `node-info.txt`: `uname -a`, a summary of
/// `/proc/cpuinfo`, `/proc/meminfo`, and `df -m` and `df -i` of
/// `temp_dir`. A command that fails leaves a line saying so, and the run
/// goes on. Blocking.
pub fn node_info(temp_dir: &Path) -> String {
    let mut text = String::new();
    text.push_str("## uname -a\n");
    text.push_str(&command_output("uname", &["-a"]));
    text.push_str("\n## /proc/cpuinfo summary\n");
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(cpuinfo) => text.push_str(&cpuinfo_summary(&cpuinfo)),
        Err(error) => text.push_str(&format!("failed to read /proc/cpuinfo: {error}\n")),
    }
    text.push_str("\n## /proc/meminfo\n");
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(meminfo) => text.push_str(&meminfo),
        Err(error) => text.push_str(&format!("failed to read /proc/meminfo: {error}\n")),
    }
    let dir = temp_dir.display().to_string();
    for flag in ["-m", "-i"] {
        text.push_str(&format!("\n## df {flag} {dir}\n"));
        text.push_str(&command_output("df", &[flag, &dir]));
    }
    text
}

fn command_output(program: &str, arguments: &[&str]) -> String {
    match std::process::Command::new(program).args(arguments).output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
        Ok(output) => format!(
            "{program} failed with {}: {}\n",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => format!("failed to run {program}: {error}\n"),
    }
}

/// Counts processors and lists each distinct model name with its count.
fn cpuinfo_summary(cpuinfo: &str) -> String {
    let mut processors = 0;
    let mut models: std::collections::BTreeMap<&str, usize> = Default::default();
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => processors += 1,
            "model name" => *models.entry(value.trim()).or_default() += 1,
            _ => {}
        }
    }
    let mut summary = format!("processors: {processors}\n");
    for (model, count) in models {
        summary.push_str(&format!("model name: {model} (x{count})\n"));
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_summary_counts_models() {
        let cpuinfo = "processor\t: 0\nmodel name\t: Example CPU\n\nprocessor\t: 1\nmodel name\t: Example CPU\n";
        assert_eq!(
            cpuinfo_summary(cpuinfo),
            "processors: 2\nmodel name: Example CPU (x2)\n"
        );
    }

    #[test]
    fn node_info_has_every_section() {
        let dir = tempfile::tempdir().unwrap();
        let info = node_info(dir.path());
        for heading in [
            "## uname -a",
            "## /proc/cpuinfo",
            "## /proc/meminfo",
            "## df -m",
            "## df -i",
        ] {
            assert!(info.contains(heading), "{heading} missing from {info}");
        }
        assert!(info.contains("MemTotal"), "{info}");
    }
}
