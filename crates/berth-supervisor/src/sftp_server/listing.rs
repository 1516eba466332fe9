//! File attributes and the `ls -l` lines ("long names") of directory
//! listings, which OpenSSH's `sftp` prints for `ls -l`.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use chrono::{DateTime, Utc};
use russh_sftp::protocol::FileAttributes;

use super::confine::Names;

/// Files modified longer ago than this, or in the future, show the year
/// instead of the time of day, as `ls -l` does (about six months).
const RECENT_SECONDS: i64 = 182 * 24 * 3600;

/// Converts a file's metadata to SFTP attributes: size, owner, mode with
/// the file type bits, access and modification times. Times outside the
/// protocol's 32-bit range are clamped to it.
pub(super) fn attributes(metadata: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(metadata.size()),
        uid: Some(metadata.uid()),
        user: None,
        gid: Some(metadata.gid()),
        group: None,
        permissions: Some(metadata.mode()),
        atime: Some(clamp_time(metadata.atime())),
        mtime: Some(clamp_time(metadata.mtime())),
    }
}

fn clamp_time(seconds: i64) -> u32 {
    u32::try_from(seconds.max(0)).unwrap_or(u32::MAX)
}

/// Formats the `ls -l` line of `name`, with owner and group names from
/// the container's account files where they have an entry.
pub(super) fn long_name(name: &str, metadata: &Metadata, names: &Names, now: i64) -> String {
    let user = names
        .users
        .get(&metadata.uid())
        .cloned()
        .unwrap_or_else(|| metadata.uid().to_string());
    let group = names
        .groups
        .get(&metadata.gid())
        .cloned()
        .unwrap_or_else(|| metadata.gid().to_string());
    let modified = metadata.mtime();
    let format = if modified > now || now - modified > RECENT_SECONDS {
        "%b %e  %Y"
    } else {
        "%b %e %H:%M"
    };
    let date = DateTime::<Utc>::from_timestamp(modified, 0)
        .unwrap_or_default()
        .format(format);
    format!(
        "{} {:>3} {user:<8} {group:<8} {:>8} {date} {name}",
        mode_string(metadata.mode()),
        metadata.nlink(),
        metadata.size(),
    )
}

/// Formats a mode as `ls -l` does: the type letter, then `rwx` for owner,
/// group and others, with set-user-ID, set-group-ID and sticky bits.
pub(super) fn mode_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut text = String::with_capacity(10);
    text.push(kind);
    // (read bit, write bit, execute bit, special bit, letter when special)
    let classes = [
        (0o400, 0o200, 0o100, libc::S_ISUID, 's'),
        (0o040, 0o020, 0o010, libc::S_ISGID, 's'),
        (0o004, 0o002, 0o001, libc::S_ISVTX, 't'),
    ];
    for (read, write, execute, special, letter) in classes {
        text.push(if mode & read != 0 { 'r' } else { '-' });
        text.push(if mode & write != 0 { 'w' } else { '-' });
        text.push(match (mode & execute != 0, mode & special != 0) {
            (true, true) => letter,
            (false, true) => letter.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_as_ls_prints_them() {
        assert_eq!(mode_string(0o100644), "-rw-r--r--");
        assert_eq!(mode_string(0o040755), "drwxr-xr-x");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx");
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x");
        assert_eq!(mode_string(0o102644), "-rw-r-Sr--");
        assert_eq!(mode_string(0o041777), "drwxrwxrwt");
        assert_eq!(mode_string(0o041776), "drwxrwxrwT");
    }

    #[test]
    fn times_outside_32_bits_are_clamped() {
        assert_eq!(clamp_time(-5), 0);
        assert_eq!(clamp_time(1 << 40), u32::MAX);
        assert_eq!(clamp_time(1_700_000_000), 1_700_000_000);
    }

    #[test]
    fn long_name_shows_owner_names_and_size() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"12345").unwrap();
        let metadata = std::fs::metadata(file.path()).unwrap();
        let mut names = Names::default();
        names.users.insert(metadata.uid(), "alice".to_string());
        let line = long_name("data.txt", &metadata, &names, metadata.mtime() + 60);
        assert!(line.starts_with("-rw"), "{line}");
        assert!(line.contains(" alice "), "{line}");
        assert!(line.contains(&format!(" {} ", metadata.gid())), "{line}");
        assert!(line.contains("        5 "), "{line}");
        assert!(line.ends_with(" data.txt"), "{line}");
    }
}
