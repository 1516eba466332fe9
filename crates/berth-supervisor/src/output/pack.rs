//! Packing output files into blocks and writing the blocks.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use berth_client::{Client, ClientError};
use berth_core::locator::Locator;
use berth_core::manifest::Segment;
use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::walk::OutputFile;
use super::OutputError;
use crate::retry::{retry, Backoff};

/// A file's piece of a block that is not written yet.
struct Piece {
    file: usize,
    offset: u64,
    length: u64,
}

/// Fills one block buffer with the files' bytes in order and writes each
/// block when it is full, so memory stays at one block.
pub struct BlockPacker<'a> {
    client: &'a Client,
    block_size: usize,
    retry_timeout: Duration,
    backoff: Backoff,
    buffer: BytesMut,
    /// The pieces of the buffer, in order.
    pieces: Vec<Piece>,
    /// Each added file's collection path and finished segments.
    files: Vec<(String, Vec<Segment>)>,
}

impl<'a> BlockPacker<'a> {
    pub fn new(
        client: &'a Client,
        block_size: usize,
        retry_timeout: Duration,
        backoff: Backoff,
    ) -> BlockPacker<'a> {
        BlockPacker {
            client,
            block_size,
            retry_timeout,
            backoff,
            buffer: BytesMut::with_capacity(block_size),
            pieces: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Reads one file into the blocks. The file must still have the size
    /// the walk saw, because the container has exited and nothing else
    /// writes there.
    pub async fn add_file(&mut self, file: &OutputFile) -> Result<(), OutputError> {
        let read_error = |source| OutputError::Read {
            path: file.path.clone(),
            source,
        };
        // O_NOFOLLOW: the walk resolved links, so a link here is a change.
        // O_NONBLOCK: opening a FIFO put in place of the file must not hang.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&file.source)
            .map_err(read_error)?;
        let metadata = opened.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(read_error(std::io::Error::other(
                "it is no longer a regular file",
            )));
        }

        let mut reader = tokio::fs::File::from_std(opened);
        let index = self.files.len();
        self.files.push((file.path.clone(), Vec::new()));
        let mut read_total = 0u64;

        loop {
            let room = self.block_size - self.buffer.len();
            let start = self.buffer.len();
            let read = (&mut reader)
                .take(room as u64)
                .read_buf(&mut self.buffer)
                .await
                .map_err(read_error)?;
            if read == 0 {
                break;
            }
            read_total += read as u64;
            self.pieces.push(Piece {
                file: index,
                offset: start as u64,
                length: read as u64,
            });
            if self.buffer.len() == self.block_size {
                self.write_block().await?;
            }
        }

        if read_total != file.size {
            return Err(OutputError::SizeChanged {
                path: file.path.clone(),
                expected: file.size,
                read: read_total,
            });
        }
        Ok(())
    }

    /// Writes the last block and returns each file's path and segments.
    pub async fn finish(mut self) -> Result<Vec<(String, Vec<Segment>)>, OutputError> {
        if !self.buffer.is_empty() {
            self.write_block().await?;
        }
        Ok(self.files)
    }

    async fn write_block(&mut self) -> Result<(), OutputError> {
        let data = self.buffer.split().freeze();
        let client = self.client;
        let text = retry(
            "writing an output block",
            self.retry_timeout,
            self.backoff,
            ClientError::is_transient,
            || client.put_block(data.clone()),
        )
        .await
        .map_err(OutputError::Upload)?;
        let locator = Locator::parse(&text).map_err(|_| OutputError::Locator(text.clone()))?;
        // Pieces of one file that follow each other in a block merge into
        // one segment.
        for piece in self.pieces.drain(..) {
            let segments = &mut self.files[piece.file].1;
            match segments.last_mut() {
                Some(last)
                    if last.locator == locator && last.offset + last.length == piece.offset =>
                {
                    last.length += piece.length;
                }
                _ => segments.push(Segment {
                    locator: locator.clone(),
                    offset: piece.offset,
                    length: piece.length,
                }),
            }
        }
        self.buffer.reserve(self.block_size);
        Ok(())
    }
}
