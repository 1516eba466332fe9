//! The SFTP requests on the confined process's own filesystem view.
//!
//! Each request runs blocking file calls directly in the protocol loop:
//! the process serves one client, one request at a time, so nothing else
//! waits meanwhile. Paths are the client's, relative to the working
//! directory (the user's home) unless absolute; `chroot` keeps both, and
//! every `..`, inside the container's root. The kernel checks every
//! access against the user's UID and groups.
//!
//! Errors map to SFTP status codes: a missing file to `NO_SUCH_FILE`, a
//! denied access to `PERMISSION_DENIED`, anything else to `FAILURE`, each
//! with a message that names the path.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::RenameFlags;
use nix::sys::stat::UtimensatFlags;
use nix::sys::time::TimeSpec;
use russh_sftp::protocol::{
    Attrs, Data, File as Entry, FileAttributes, Handle, Name, OpenFlags, Packet, Status,
    StatusCode, Version,
};
use russh_sftp::server::StatusReply;

use super::confine::Names;
use super::listing::{attributes, long_name};

/// Largest read the server returns: larger requests get this much, which
/// the protocol allows. OpenSSH's `sftp` reads 32 KiB at a time.
const MAX_READ_BYTES: u32 = 255 * 1024;

/// Directory entries sent per `READDIR` reply.
const ENTRIES_PER_READDIR: usize = 100;

/// Maximum handles open at once, so a client cannot use up the process's
/// file descriptors.
const MAX_HANDLES: usize = 256;

/// Mode of a new file when the client sends none, before the umask.
const DEFAULT_FILE_MODE: u32 = 0o666;

/// Mode of a new directory when the client sends none, before the umask.
const DEFAULT_DIRECTORY_MODE: u32 = 0o777;

/// The extension for a rename that replaces an existing target, as
/// `rename(2)` does (OpenSSH's `sftp` uses it when offered).
const POSIX_RENAME: &str = "posix-rename@openssh.com";

/// An open handle.
#[derive(Debug)]
enum Open {
    File { file: File, path: String },
    Directory(Listing),
}

/// A directory being listed: the entries not yet sent, `.` and `..`
/// first.
#[derive(Debug)]
struct Listing {
    path: PathBuf,
    dots: std::array::IntoIter<&'static str, 2>,
    entries: fs::ReadDir,
}

impl Listing {
    fn next_name(&mut self) -> Option<io::Result<String>> {
        if let Some(dot) = self.dots.next() {
            return Some(Ok(dot.to_string()));
        }
        let entry = self.entries.next()?;
        Some(entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
    }
}

/// The request handler: the open handles and the names for listings.
#[derive(Debug)]
pub(super) struct FileSystem {
    handles: HashMap<String, Open>,
    next_handle: u64,
    names: Names,
}

impl FileSystem {
    pub(super) fn new(names: Names) -> FileSystem {
        FileSystem {
            handles: HashMap::new(),
            next_handle: 0,
            names,
        }
    }

    fn insert(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure.with_message(format!(
                "too many open handles (maximum {MAX_HANDLES}); close some first"
            )));
        }
        let handle = self.next_handle.to_string();
        self.next_handle += 1;
        self.handles.insert(handle.clone(), open);
        Ok(handle)
    }

    fn file(&self, handle: &str) -> Result<(&File, &str), StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File { file, path }) => Ok((file, path)),
            _ => Err(invalid_handle(handle)),
        }
    }
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".to_string(),
        language_tag: "en-US".to_string(),
    }
}

fn invalid_handle(handle: &str) -> StatusReply {
    StatusCode::Failure.with_message(format!("invalid handle {handle:?}: not open"))
}

/// Maps an I/O error on `path` to a status with a message.
fn io_status(action: &str, path: &str, error: &io::Error) -> StatusReply {
    let code = match error.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    code.with_message(format!("failed to {action} {path}: {error}"))
}

fn nix_status(action: &str, path: &str, error: nix::Error) -> StatusReply {
    io_status(action, path, &io::Error::from(error))
}

/// Returns the path a client names, with `.` for an empty one.
fn client_path(path: &str) -> &Path {
    if path.is_empty() {
        Path::new(".")
    } else {
        Path::new(path)
    }
}

/// Applies `attrs` to `path` in the order OpenSSH's sftp-server does:
/// size, mode, times, owner.
fn set_path_attributes(path: &str, attrs: &FileAttributes) -> Result<(), StatusReply> {
    let target = client_path(path);
    if let Some(size) = attrs.size {
        let size = libc::off_t::try_from(size).map_err(|_| {
            StatusCode::Failure.with_message(format!("invalid size {size} for {path}"))
        })?;
        nix::unistd::truncate(target, size).map_err(|error| nix_status("truncate", path, error))?;
    }
    if let Some(mode) = attrs.permissions {
        fs::set_permissions(target, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|error| io_status("change the mode of", path, &error))?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let atime = TimeSpec::new(i64::from(atime), 0);
        let mtime = TimeSpec::new(i64::from(mtime), 0);
        nix::sys::stat::utimensat(None, target, &atime, &mtime, UtimensatFlags::FollowSymlink)
            .map_err(|error| nix_status("set the times of", path, error))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::chown(target, attrs.uid, attrs.gid)
            .map_err(|error| io_status("change the owner of", path, &error))?;
    }
    Ok(())
}

fn set_file_attributes(file: &File, path: &str, attrs: &FileAttributes) -> Result<(), StatusReply> {
    if let Some(size) = attrs.size {
        file.set_len(size)
            .map_err(|error| io_status("truncate", path, &error))?;
    }
    if let Some(mode) = attrs.permissions {
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|error| io_status("change the mode of", path, &error))?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let times = fs::FileTimes::new()
            .set_accessed(system_time(atime))
            .set_modified(system_time(mtime));
        file.set_times(times)
            .map_err(|error| io_status("set the times of", path, &error))?;
    }
    if attrs.uid.is_some() || attrs.gid.is_some() {
        std::os::unix::fs::fchown(file, attrs.uid, attrs.gid)
            .map_err(|error| io_status("change the owner of", path, &error))?;
    }
    Ok(())
}

fn system_time(seconds: u32) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::from(seconds))
}

/// Returns the absolute form of `path` with `.` and `..` resolved by
/// name, for a path that does not exist (yet).
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::Normal(name) => normal.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    normal
}

/// Reads the next batch of a listing: each entry with its `lstat`
/// attributes. Entries that vanish meanwhile are left out.
fn read_entries(listing: &mut Listing, names: &Names) -> io::Result<Vec<Entry>> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let mut entries = Vec::new();
    while entries.len() < ENTRIES_PER_READDIR {
        let Some(name) = listing.next_name() else {
            break;
        };
        let name = name?;
        let Ok(metadata) = fs::symlink_metadata(listing.path.join(&name)) else {
            continue;
        };
        entries.push(Entry {
            longname: long_name(&name, &metadata, names, now),
            attrs: attributes(&metadata),
            filename: name,
        });
    }
    Ok(entries)
}

impl russh_sftp::server::Handler for FileSystem {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusReply::new(StatusCode::OpUnsupported)
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        let mut version = Version::new();
        version
            .extensions
            .insert(POSIX_RENAME.to_string(), "1".to_string());
        Ok(version)
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let mut options = OpenOptions::new();
        options
            .read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.unwrap_or(DEFAULT_FILE_MODE) & 0o7777);
        if pflags.contains(OpenFlags::CREATE) {
            if pflags.contains(OpenFlags::EXCLUDE) {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        let file = options
            .open(client_path(&filename))
            .map_err(|error| io_status("open", &filename, &error))?;
        let handle = self.insert(Open::File {
            file,
            path: filename,
        })?;
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(_) => Ok(ok(id)),
            None => Err(invalid_handle(&handle)),
        }
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let (file, path) = self.file(&handle)?;
        let mut data = vec![0; len.min(MAX_READ_BYTES) as usize];
        let count = loop {
            match file.read_at(&mut data, offset) {
                Ok(count) => break count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(io_status("read", path, &error)),
            }
        };
        if count == 0 && !data.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        data.truncate(count);
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let (file, path) = self.file(&handle)?;
        // A file opened with APPEND gets the data at its end whatever the
        // offset: Linux's pwrite(2) appends on O_APPEND descriptors.
        file.write_all_at(&data, offset)
            .map_err(|error| io_status("write", path, &error))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let metadata = fs::symlink_metadata(client_path(&path))
            .map_err(|error| io_status("lstat", &path, &error))?;
        Ok(Attrs {
            id,
            attrs: attributes(&metadata),
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let metadata =
            fs::metadata(client_path(&path)).map_err(|error| io_status("stat", &path, &error))?;
        Ok(Attrs {
            id,
            attrs: attributes(&metadata),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let metadata = match self.handles.get(&handle) {
            Some(Open::File { file, path }) => file
                .metadata()
                .map_err(|error| io_status("stat", path, &error))?,
            Some(Open::Directory(listing)) => fs::metadata(&listing.path)
                .map_err(|error| io_status("stat", &listing.path.display().to_string(), &error))?,
            None => return Err(invalid_handle(&handle)),
        };
        Ok(Attrs {
            id,
            attrs: attributes(&metadata),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        set_path_attributes(&path, &attrs)?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        match self.handles.get(&handle) {
            Some(Open::File { file, path }) => set_file_attributes(file, path, &attrs)?,
            Some(Open::Directory(listing)) => {
                set_path_attributes(&listing.path.display().to_string(), &attrs)?
            }
            None => return Err(invalid_handle(&handle)),
        }
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let directory = client_path(&path).to_path_buf();
        let entries =
            fs::read_dir(&directory).map_err(|error| io_status("open directory", &path, &error))?;
        let handle = self.insert(Open::Directory(Listing {
            path: directory,
            dots: [".", ".."].into_iter(),
            entries,
        }))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Directory(listing)) = self.handles.get_mut(&handle) else {
            return Err(invalid_handle(&handle));
        };
        let files = read_entries(listing, &self.names).map_err(|error| {
            io_status(
                "read directory",
                &listing.path.display().to_string(),
                &error,
            )
        })?;
        if files.is_empty() {
            return Err(StatusReply::new(StatusCode::Eof));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        fs::remove_file(client_path(&filename))
            .map_err(|error| io_status("remove", &filename, &error))?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        fs::DirBuilder::new()
            .mode(attrs.permissions.unwrap_or(DEFAULT_DIRECTORY_MODE) & 0o7777)
            .create(client_path(&path))
            .map_err(|error| io_status("make directory", &path, &error))?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        fs::remove_dir(client_path(&path))
            .map_err(|error| io_status("remove directory", &path, &error))?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = client_path(&path);
        let resolved = match fs::canonicalize(target) {
            Ok(resolved) => resolved,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let current =
                    std::env::current_dir().map_err(|error| io_status("resolve", &path, &error))?;
                normalize(&current.join(target))
            }
            Err(error) => return Err(io_status("resolve", &path, &error)),
        };
        let resolved = resolved.to_string_lossy().into_owned();
        Ok(Name {
            id,
            files: vec![Entry {
                longname: resolved.clone(),
                filename: resolved,
                attrs: FileAttributes::default(),
            }],
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        // SFTP version 3 renames fail when the target exists.
        nix::fcntl::renameat2(
            None,
            client_path(&oldpath),
            None,
            client_path(&newpath),
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|error| nix_status("rename", &format!("{oldpath} to {newpath}"), error))?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let target = fs::read_link(client_path(&path))
            .map_err(|error| io_status("read link", &path, &error))?;
        let target = target.to_string_lossy().into_owned();
        Ok(Name {
            id,
            files: vec![Entry {
                longname: target.clone(),
                filename: target,
                attrs: FileAttributes::default(),
            }],
        })
    }

    /// OpenSSH's client sends the link's target first and the new link's
    /// path second, the reverse of the protocol draft's order. Its server
    /// reads them in that order, and so does this one, although
    /// `russh_sftp` names the fields in the draft's order.
    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        let (target, link) = (linkpath, targetpath);
        std::os::unix::fs::symlink(&target, client_path(&link))
            .map_err(|error| io_status("make symbolic link", &link, &error))?;
        Ok(ok(id))
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        if request != POSIX_RENAME {
            return Err(StatusCode::OpUnsupported
                .with_message(format!("extension {request:?} is not supported")));
        }
        let invalid =
            || StatusCode::BadMessage.with_message(format!("invalid {POSIX_RENAME} request"));
        let (oldpath, rest) = read_string(&data).ok_or_else(invalid)?;
        let (newpath, _) = read_string(rest).ok_or_else(invalid)?;
        fs::rename(client_path(&oldpath), client_path(&newpath))
            .map_err(|error| io_status("rename", &format!("{oldpath} to {newpath}"), &error))?;
        Ok(Packet::Status(ok(id)))
    }
}

/// Reads one SSH `string` (a 32-bit big-endian length, then the bytes)
/// from the start of `data`. Returns it and the bytes after it.
fn read_string(data: &[u8]) -> Option<(String, &[u8])> {
    let (length, rest) = data.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    if rest.len() < length {
        return None;
    }
    let (text, rest) = rest.split_at(length);
    Some((String::from_utf8_lossy(text).into_owned(), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_components_stop_at_the_root() {
        assert_eq!(
            normalize(Path::new("/home/a/../../../../etc/./hostname")),
            PathBuf::from("/etc/hostname")
        );
    }

    #[test]
    fn ssh_strings_are_read_in_order() {
        let data = [&[0, 0, 0, 1][..], b"a", &[0, 0, 0, 2], b"bc"].concat();
        let (first, rest) = read_string(&data).unwrap();
        let (second, rest) = read_string(rest).unwrap();
        assert_eq!((first.as_str(), second.as_str()), ("a", "bc"));
        assert!(rest.is_empty());
    }

    #[test]
    fn short_ssh_string_is_rejected() {
        assert!(read_string(&[0, 0, 0, 5, b'a']).is_none());
        assert!(read_string(&[0, 0]).is_none());
    }

    #[test]
    fn missing_file_maps_to_no_such_file() {
        let error = io::Error::from(io::ErrorKind::NotFound);
        let status = io_status("open", "/nope", &error);
        assert_eq!(status.status_code, StatusCode::NoSuchFile);
        assert!(status.error_message.unwrap().contains("/nope"));
    }

    #[test]
    fn denied_access_maps_to_permission_denied() {
        let error = io::Error::from(io::ErrorKind::PermissionDenied);
        let status = io_status("open", "/root/x", &error);
        assert_eq!(status.status_code, StatusCode::PermissionDenied);
    }
}
