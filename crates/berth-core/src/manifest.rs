//! Collection manifests in Arvados's manifest text format, and the
//! portable data hash that names a collection's content.
//!
//! A manifest is zero or more *streams*, each one line ending in `\n`:
//!
//! ```text
//! ./dir 37b51d194a7513e45b56f6524f2d51f2+3 acbd18db4cc2f85cedef654fccc4a4d8+3 0:3:a.txt 3:3:b\040c.txt
//! ```
//!
//! The first token names a directory (`.` is the collection's root, `./a/b`
//! a subdirectory). Then come one or more block locators, whose blocks,
//! concatenated in order, make the stream's bytes. Each remaining token is a
//! *file segment* `position:size:name`: `size` bytes of the stream from
//! `position` belong to the file `name`, which may name subdirectories with
//! `/`. Several segments of one path, in the same or different streams,
//! concatenate in the order they appear. Spaces, `:`, `\` and control
//! characters in names are written as a backslash and three octal digits
//! (`\040` for a space). A zero-length file named `.` (`0:0:\056`) marks an
//! empty directory.
//!
//! [`Manifest::parse`] reads and validates a manifest into [`File`]s, each a
//! list of [`Segment`]s of blocks, and rejects names with empty, `.` or
//! `..` components, so that no path of a parsed manifest leaves the
//! collection. [`Manifest::to_text`] writes the normalised form: one stream
//! per directory, streams and files sorted by name, each block listed once
//! per stream, adjacent segments of a file merged, as Arvados's SDKs
//! normalise. The portable data hash is the MD5 of the normalised text
//! with every hint but the size removed from the locators, then `+` and
//! that text's length in bytes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use md5::{Digest, Md5};

use crate::locator::{Locator, EMPTY_BLOCK_LOCATOR};

/// The portable data hash of the empty collection.
pub const EMPTY_COLLECTION_PDH: &str = "d41d8cd98f00b204e9800998ecf8427e+0";

/// A run of bytes of one block: part of a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub locator: Locator,
    /// Offset of the first byte in the block.
    pub offset: u64,
    pub length: u64,
}

/// A file of a collection: its path from the root, such as `dir/a.txt`,
/// and its content as segments of blocks, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub segments: Vec<Segment>,
}

impl File {
    /// Returns the file's length in bytes.
    pub fn size(&self) -> u64 {
        self.segments.iter().map(|segment| segment.length).sum()
    }
}

/// A parsed, valid manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Files in the order of their first segment in the text.
    files: Vec<File>,
    /// Directories marked with a `.` file, as paths from the root.
    directories: BTreeSet<String>,
}

/// A manifest validation error: the line (from 1), the token and the
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub line: usize,
    pub token: String,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.token.is_empty() {
            write!(f, "invalid manifest: line {}: {}", self.line, self.reason)
        } else {
            write!(
                f,
                "invalid manifest: line {}, token {:?}: {}",
                self.line, self.token, self.reason
            )
        }
    }
}

/// An invalid path of a collection file or directory, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid collection path {path:?}: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: &'static str,
}

/// Checks a relative path of a collection: components separated by
/// single `/`, none empty, `.` or `..`.
pub fn check_path(path: &str) -> Result<(), PathError> {
    let error = |reason| PathError {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() {
        return Err(error("the path is empty"));
    }
    for component in path.split('/') {
        match component {
            "" => {
                return Err(error(
                    "it has an empty component (a leading, trailing or double /)",
                ))
            }
            "." | ".." => return Err(error("it has a . or .. component")),
            _ => {}
        }
    }
    Ok(())
}

/// Escapes a name for a manifest: `\`, `:` and bytes up to the space
/// become `\` and three octal digits.
pub fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c == '\\' || c == ':' || (c as u32) <= 0x20 {
            out.push_str(&format!("\\{:03o}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Decodes the `\NNN` octal escapes of a manifest token.
fn unescape_name(token: &str) -> Result<String, &'static str> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let digits = bytes
                .get(i + 1..i + 4)
                .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)))
                .ok_or("a backslash must start an escape of three octal digits, such as \\040")?;
            let value = digits
                .iter()
                .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
            let byte = u8::try_from(value).map_err(|_| "an octal escape is above \\377")?;
            out.push(byte);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the unescaped name is not valid UTF-8")
}

/// Joins a directory and a name; the root directory is `""`.
fn join(directory: &str, name: &str) -> String {
    if directory.is_empty() {
        name.to_string()
    } else {
        format!("{directory}/{name}")
    }
}

/// Splits a path into its directory (`""` for the root) and name.
fn split_path(path: &str) -> (&str, &str) {
    match path.rsplit_once('/') {
        Some((directory, name)) => (directory, name),
        None => ("", path),
    }
}

/// One line of a manifest as it is parsed.
struct LineParser<'a> {
    line: usize,
    text: &'a str,
}

impl LineParser<'_> {
    fn error(&self, token: &str, reason: impl Into<String>) -> ManifestError {
        ManifestError {
            line: self.line,
            token: token.to_string(),
            reason: reason.into(),
        }
    }

    /// Parses the line's stream name into a directory path (`""` for the
    /// root).
    fn directory(&self, token: &str) -> Result<String, ManifestError> {
        let name = unescape_name(token).map_err(|reason| self.error(token, reason))?;
        if name == "." {
            return Ok(String::new());
        }
        let Some(rest) = name.strip_prefix("./") else {
            return Err(self.error(token, "a stream name must be . or start with ./"));
        };
        check_path(rest).map_err(|err| self.error(token, err.reason))?;
        Ok(rest.to_string())
    }

    fn number(&self, token: &str, text: &str, what: &str) -> Result<u64, ManifestError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(token, format!("the {what} must be a decimal number")));
        }
        text.parse()
            .map_err(|_| self.error(token, format!("the {what} is too large")))
    }

    fn parse(&self, manifest: &mut ManifestBuilder) -> Result<(), ManifestError> {
        if let Some(bad) = self
            .text
            .chars()
            .find(|c| c.is_control() || (c.is_whitespace() && *c != ' '))
        {
            return Err(self.error(
                "",
                format!("the line contains the control or whitespace character {bad:?}: escape it as \\NNN"),
            ));
        }
        let tokens: Vec<&str> = self.text.split(' ').collect();
        if tokens.iter().any(|token| token.is_empty()) {
            return Err(self.error(
                "",
                "the line is empty, or has a leading, trailing or double space",
            ));
        }
        let directory = self.directory(tokens[0])?;

        let mut blocks: Vec<(Locator, u64)> = Vec::new();
        let mut stream_size: u64 = 0;
        let mut rest = &tokens[1..];
        while let Some((token, tail)) = rest.split_first() {
            if token.contains(':') {
                break;
            }
            let locator = Locator::parse(token).map_err(|err| self.error(token, err.reason))?;
            blocks.push((locator.clone(), stream_size));
            stream_size = stream_size
                .checked_add(locator.size())
                .ok_or_else(|| self.error(token, "the stream is longer than 2^64 bytes"))?;
            rest = tail;
        }
        if blocks.is_empty() {
            let token = rest.first().copied().unwrap_or(tokens[0]);
            return Err(self.error(
                token,
                "a stream needs at least one block locator after its name",
            ));
        }
        if rest.is_empty() {
            return Err(self.error(
                tokens[0],
                "a stream needs at least one file segment pos:size:name",
            ));
        }

        for token in rest {
            let mut parts = token.splitn(3, ':');
            let (Some(position), Some(size), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(self.error(token, "expected a file segment position:size:name"));
            };
            let position = self.number(token, position, "position")?;
            let size = self.number(token, size, "size")?;
            let name = unescape_name(name).map_err(|reason| self.error(token, reason))?;
            let end = position
                .checked_add(size)
                .filter(|end| *end <= stream_size)
                .ok_or_else(|| {
                    self.error(
                        token,
                        format!("the segment ends past the stream's {stream_size} bytes"),
                    )
                })?;
            if name == "." {
                if size != 0 {
                    return Err(self.error(
                        token,
                        "a . entry marks an empty directory and must have size 0",
                    ));
                }
                manifest.mark_directory(&directory);
                continue;
            }
            check_path(&name).map_err(|err| self.error(token, err.reason))?;
            let path = join(&directory, &name);
            let mut segments = Vec::new();
            for (locator, start) in &blocks {
                let block_end = start + locator.size();
                if block_end <= position || *start >= end {
                    continue;
                }
                let from = position.max(*start);
                let to = end.min(block_end);
                segments.push(Segment {
                    locator: locator.clone(),
                    offset: from - start,
                    length: to - from,
                });
            }
            manifest.append(&path, segments);
        }
        Ok(())
    }
}

/// Builds a manifest file by file: used by the parser, and by writers that
/// upload files and then describe them.
#[derive(Debug, Default)]
pub struct ManifestBuilder {
    manifest: Manifest,
    index: HashMap<String, usize>,
}

impl ManifestBuilder {
    pub fn new() -> ManifestBuilder {
        ManifestBuilder::default()
    }

    /// Adds a file, or appends the segments to the file of that path.
    pub fn add_file(&mut self, path: &str, segments: Vec<Segment>) -> Result<(), PathError> {
        check_path(path)?;
        self.append(path, segments);
        Ok(())
    }

    /// Adds an empty directory.
    pub fn add_directory(&mut self, path: &str) -> Result<(), PathError> {
        check_path(path)?;
        self.mark_directory(path);
        Ok(())
    }

    /// Appends segments to a file, merging each with the one before it
    /// when it continues that one in the same block.
    fn append(&mut self, path: &str, segments: Vec<Segment>) {
        let index = match self.index.get(path) {
            Some(&index) => index,
            None => {
                self.index
                    .insert(path.to_string(), self.manifest.files.len());
                self.manifest.files.push(File {
                    path: path.to_string(),
                    segments: Vec::new(),
                });
                self.manifest.files.len() - 1
            }
        };
        let file = &mut self.manifest.files[index].segments;
        for segment in segments.into_iter().filter(|segment| segment.length > 0) {
            match file.last_mut() {
                Some(last)
                    if last.locator.bare() == segment.locator.bare()
                        && last.offset + last.length == segment.offset =>
                {
                    last.length += segment.length;
                }
                _ => file.push(segment),
            }
        }
    }

    fn mark_directory(&mut self, path: &str) {
        if !path.is_empty() {
            self.manifest.directories.insert(path.to_string());
        }
    }

    /// Returns the manifest, or an error for a path that is both a file
    /// and a directory (`a` and `a/b`), which no file system can hold.
    pub fn finish(self) -> Result<Manifest, PathError> {
        let mut directories: BTreeSet<&str> = self
            .manifest
            .directories
            .iter()
            .map(String::as_str)
            .collect();
        for file in &self.manifest.files {
            let mut path = file.path.as_str();
            while let Some((parent, _)) = path.rsplit_once('/') {
                directories.insert(parent);
                path = parent;
            }
        }
        for file in &self.manifest.files {
            if directories.contains(file.path.as_str()) {
                return Err(PathError {
                    path: file.path.clone(),
                    reason: "it names both a file and a directory",
                });
            }
        }
        Ok(self.manifest)
    }
}

impl Manifest {
    /// Parses and validates a manifest text. Every line, the last too,
    /// must end with `\n`.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let mut builder = ManifestBuilder::new();
        let mut lines = 0;
        for (index, line) in text.split_inclusive('\n').enumerate() {
            lines = index + 1;
            let line_number = index + 1;
            let Some(line) = line.strip_suffix('\n') else {
                return Err(ManifestError {
                    line: line_number,
                    token: String::new(),
                    reason: "the last line does not end with a newline".into(),
                });
            };
            LineParser {
                line: line_number,
                text: line,
            }
            .parse(&mut builder)?;
        }
        builder.finish().map_err(|err| ManifestError {
            line: lines,
            token: err.path,
            reason: err.reason.into(),
        })
    }

    /// Files in the order they first appear.
    pub fn files(&self) -> &[File] {
        &self.files
    }

    /// Returns the file at `path`, if there is one.
    pub fn file(&self, path: &str) -> Option<&File> {
        self.files.iter().find(|file| file.path == path)
    }

    /// Directories marked as existing even when they hold no file.
    pub fn directories(&self) -> &BTreeSet<String> {
        &self.directories
    }

    /// Returns the locators of every segment, in order, with repeats.
    pub fn locators(&self) -> impl Iterator<Item = &Locator> {
        self.files
            .iter()
            .flat_map(|file| file.segments.iter().map(|segment| &segment.locator))
    }

    /// Returns a copy whose locators went through `change`, such as
    /// removing or adding signatures.
    pub fn map_locators(&self, mut change: impl FnMut(&Locator) -> Locator) -> Manifest {
        let mut mapped = self.clone();
        for file in &mut mapped.files {
            for segment in &mut file.segments {
                segment.locator = change(&segment.locator);
            }
        }
        mapped
    }

    /// Writes the normalised manifest text, with the locators as they are.
    pub fn to_text(&self) -> String {
        self.render(|locator| locator.to_string())
    }

    /// Writes the normalised text with bare `<md5>+<size>` locators.
    pub fn stripped_text(&self) -> String {
        self.render(Locator::bare)
    }

    /// Computes the portable data hash: the MD5 of the stripped text, `+`,
    /// and its length.
    pub fn portable_data_hash(&self) -> String {
        let text = self.stripped_text();
        format!("{}+{}", hex_md5(text.as_bytes()), text.len())
    }

    fn render(&self, write_locator: impl Fn(&Locator) -> String) -> String {
        let mut streams: BTreeMap<&str, Vec<&File>> = BTreeMap::new();
        for file in &self.files {
            streams
                .entry(split_path(&file.path).0)
                .or_default()
                .push(file);
        }
        for directory in &self.directories {
            let prefix = format!("{directory}/");
            let has_entries = self.files.iter().any(|file| file.path.starts_with(&prefix))
                || self
                    .directories
                    .iter()
                    .any(|other| other.starts_with(&prefix));
            if !has_entries {
                streams.entry(directory.as_str()).or_default();
            }
        }
        let mut text = String::new();
        for (directory, mut files) in streams {
            files.sort_by(|a, b| split_path(&a.path).1.cmp(split_path(&b.path).1));
            let stream_name = if directory.is_empty() {
                ".".to_string()
            } else {
                format!("./{}", escape_name(directory))
            };
            text.push_str(&render_stream(&stream_name, &files, &write_locator));
        }
        text
    }
}

/// Writes one normalised stream line: every block once, in the order the
/// sorted files first use it, then each file's segments, adjacent ones
/// merged. A stream of empty files only gets the empty block; a stream
/// with no file is an empty directory's `0:0:\056` line.
fn render_stream(
    stream_name: &str,
    files: &[&File],
    write_locator: &impl Fn(&Locator) -> String,
) -> String {
    let mut tokens = vec![stream_name.to_string()];
    let mut block_offsets: HashMap<String, u64> = HashMap::new();
    let mut stream_size = 0u64;
    for file in files {
        for segment in &file.segments {
            if let Entry::Vacant(entry) = block_offsets.entry(segment.locator.bare()) {
                entry.insert(stream_size);
                tokens.push(write_locator(&segment.locator));
                stream_size += segment.locator.size();
            }
        }
    }
    if tokens.len() == 1 {
        tokens.push(EMPTY_BLOCK_LOCATOR.to_string());
    }
    if files.is_empty() {
        tokens.push("0:0:\\056".to_string());
    }
    for file in files {
        let name = escape_name(split_path(&file.path).1);
        let mut span: Option<(u64, u64)> = None;
        for segment in &file.segments {
            let start = block_offsets[&segment.locator.bare()] + segment.offset;
            span = match span {
                Some((from, to)) if to == start => Some((from, to + segment.length)),
                Some((from, to)) => {
                    tokens.push(format!("{from}:{}:{name}", to - from));
                    Some((start, start + segment.length))
                }
                None => Some((start, start + segment.length)),
            };
        }
        match span {
            Some((from, to)) => tokens.push(format!("{from}:{}:{name}", to - from)),
            None => tokens.push(format!("0:0:{name}")),
        }
    }
    let mut line = tokens.join(" ");
    line.push('\n');
    line
}

/// Returns the lowercase hex MD5 of `bytes`.
pub fn hex_md5(bytes: &[u8]) -> String {
    let digest = Md5::digest(bytes);
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks that `text` is a portable data hash, `<md5 hex>+<size>`.
pub fn is_portable_data_hash(text: &str) -> bool {
    text.split_once('+').is_some_and(|(hash, size)| {
        crate::locator::is_md5_hex(hash)
            && !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
