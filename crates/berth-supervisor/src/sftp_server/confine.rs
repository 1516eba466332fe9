//! Confinement of the SFTP server to the container's root and the login
//! user. The steps run in the order that leaves no way back. First the
//! container's capability bounding set is read, then come `chroot` and
//! the user lookup in the container's own files. Last come the
//! supplementary groups, GID, UID, capabilities and home directory.
//!
//! A login as a user other than root loses every capability when its UID
//! changes. A root login keeps only the capabilities of the container's
//! bounding set (Docker's default set, for Berth's containers), so it can
//! do no more to files than the container's own root.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use nix::unistd::{Gid, Uid};
use rustix::thread::{CapabilitySet, CapabilitySets};

use super::Options;
use crate::gateway::user::{find_user, UserError};

/// Largest `/etc/passwd` or `/etc/group` the server reads.
const MAX_ACCOUNT_FILE_BYTES: u64 = 4 << 20;

/// Umask of the server's new files and directories, sshd's default.
const UMASK: u32 = 0o022;

#[derive(Debug, thiserror::Error)]
pub(super) enum ConfineError {
    #[error("failed to read the capability bounding set of process {pid} from {path}: {message}")]
    Bounding {
        pid: u32,
        path: String,
        message: String,
    },
    #[error("failed to chroot into the container's root {path}: {source}; serving SFTP needs the supervisor to run as root")]
    Chroot {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("failed to read the container's {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to {action}: {source}")]
    Drop {
        action: String,
        #[source]
        source: nix::Error,
    },
}

/// User and group names by ID, from the container's `/etc/passwd` and
/// `/etc/group`, for directory listings.
#[derive(Debug, Default, Clone)]
pub(super) struct Names {
    pub users: HashMap<u32, String>,
    pub groups: HashMap<u32, String>,
}

/// The server's state once confined.
#[derive(Debug)]
pub(super) struct Confined {
    pub names: Names,
    /// Messages for the supervisor's log, such as a missing home.
    pub warnings: Vec<String>,
}

/// Confines the process to the root of process `options.pid` as
/// `options.user`.
pub(super) fn confine(options: &Options) -> Result<Confined, ConfineError> {
    let bounding = read_bounding_set(options.pid)?;
    let root = format!("/proc/{}/root", options.pid);
    nix::unistd::chroot(root.as_str()).map_err(|source| ConfineError::Chroot {
        path: root.clone(),
        source,
    })?;
    // The working directory is still outside the new root until this.
    nix::unistd::chdir("/").map_err(|source| ConfineError::Chroot {
        path: root.clone(),
        source,
    })?;

    let passwd = read_account_file("/etc/passwd")?;
    let group = read_account_file("/etc/group")?;
    let user = find_user(passwd.as_deref(), &options.user)?;
    let name = user.exec.name.as_deref().unwrap_or("");
    let groups = supplementary_groups(group.as_deref().unwrap_or(""), name, user.exec.gid);

    let gids: Vec<Gid> = groups.iter().map(|gid| Gid::from_raw(*gid)).collect();
    nix::unistd::setgroups(&gids).map_err(|source| ConfineError::Drop {
        action: format!("set the supplementary groups {groups:?}"),
        source,
    })?;
    nix::unistd::setgid(Gid::from_raw(user.exec.gid)).map_err(|source| ConfineError::Drop {
        action: format!("set GID {}", user.exec.gid),
        source,
    })?;
    nix::unistd::setuid(Uid::from_raw(user.exec.uid)).map_err(|source| ConfineError::Drop {
        action: format!("set UID {}", user.exec.uid),
        source,
    })?;
    if user.exec.uid != 0 && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(ConfineError::Drop {
            action: format!(
                "drop root for UID {}: UID 0 could be taken back",
                user.exec.uid
            ),
            source: nix::Error::EPERM,
        });
    }
    limit_capabilities(bounding)?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(UMASK));

    let mut warnings = Vec::new();
    // As sshd does, a home that cannot be entered leaves the session in /.
    if let Err(error) = nix::unistd::chdir(Path::new(&user.home)) {
        warnings.push(format!(
            "failed to enter the home directory {} of user {:?}, so the session starts in /: {error}",
            user.home, options.user
        ));
    }
    Ok(Confined {
        names: Names {
            users: parse_names(passwd.as_deref().unwrap_or("")),
            groups: parse_names(group.as_deref().unwrap_or("")),
        },
        warnings,
    })
}

/// Reads the `CapBnd` line of `/proc/PID/status`: the capabilities any
/// process of the container may ever have.
fn read_bounding_set(pid: u32) -> Result<CapabilitySet, ConfineError> {
    let path = format!("/proc/{pid}/status");
    let error = |message: String| ConfineError::Bounding {
        pid,
        path: path.clone(),
        message,
    };
    let status = std::fs::read_to_string(&path).map_err(|source| error(source.to_string()))?;
    parse_bounding_set(&status).ok_or_else(|| error("no valid CapBnd line".to_string()))
}

fn parse_bounding_set(status: &str) -> Option<CapabilitySet> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))?;
    let bits = u64::from_str_radix(line.trim(), 16).ok()?;
    Some(CapabilitySet::from_bits_truncate(bits))
}

/// Keeps only the capabilities in `bounding`, none inheritable, and sets
/// `no_new_privs`. After a change to a UID other than 0 the process has
/// none left anyway.
fn limit_capabilities(bounding: CapabilitySet) -> Result<(), ConfineError> {
    let drop_error = |action: &str, source: rustix::io::Errno| ConfineError::Drop {
        action: action.to_string(),
        source: nix::Error::from_raw(source.raw_os_error()),
    };
    let current = rustix::thread::capabilities(None)
        .map_err(|source| drop_error("read the capabilities", source))?;
    let sets = CapabilitySets {
        effective: current.effective & bounding,
        permitted: current.permitted & bounding,
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, sets)
        .map_err(|source| drop_error("limit the capabilities to the container's", source))?;
    rustix::thread::set_no_new_privs(true).map_err(|source| drop_error("set no_new_privs", source))
}

/// Reads a regular file of at most [`MAX_ACCOUNT_FILE_BYTES`], `None`
/// when it is missing or not a regular file (a FIFO would block).
fn read_account_file(path: &'static str) -> Result<Option<String>, ConfineError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => {}
        Ok(_) => return Ok(None),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ConfineError::Read { path, source }),
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_ACCOUNT_FILE_BYTES).read_to_end(&mut bytes))
        .map_err(|source| ConfineError::Read { path, source })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Returns the primary GID and the GIDs of the `/etc/group` entries that
/// list `user` as a member, each once.
fn supplementary_groups(group: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut gids = vec![primary];
    // Lines: name:password:gid:member,member
    for fields in group
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
    {
        let [_, _, gid, members, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        let listed = !user.is_empty() && members.split(',').any(|member| member.trim() == user);
        if listed && !gids.contains(&gid) {
            gids.push(gid);
        }
    }
    gids
}

/// Maps the ID of each `name:password:id:...` line to its name; the
/// first entry for an ID wins, as `getpwuid` finds it.
fn parse_names(text: &str) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split(':').collect();
        if let (Some(name), Some(Ok(id))) = (fields.first(), fields.get(2).map(|id| id.parse())) {
            names.entry(id).or_insert_with(|| name.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = "root:x:0:\n\
        wheel:x:10:root,alice\n\
        users:x:100:\n\
        audio:x:29:bob, alice\n\
        broken:x:gid:alice\n";

    #[test]
    fn member_groups_follow_the_primary_group() {
        assert_eq!(supplementary_groups(GROUP, "alice", 100), vec![100, 10, 29]);
    }

    #[test]
    fn primary_group_is_listed_once() {
        assert_eq!(supplementary_groups(GROUP, "root", 10), vec![10]);
    }

    #[test]
    fn user_without_name_gets_only_the_primary_group() {
        assert_eq!(supplementary_groups(GROUP, "", 0), vec![0]);
    }

    #[test]
    fn bounding_set_is_read_from_status() {
        let status = "Name:\tsleep\nCapEff:\t0000000000000000\nCapBnd:\t00000000a80425fb\n";
        let bounding = parse_bounding_set(status).unwrap();
        assert!(bounding.contains(CapabilitySet::CHOWN));
        assert!(bounding.contains(CapabilitySet::DAC_OVERRIDE));
        assert!(!bounding.contains(CapabilitySet::SYS_ADMIN));
        assert!(!bounding.contains(CapabilitySet::DAC_READ_SEARCH));
    }

    #[test]
    fn missing_bounding_set_is_none() {
        assert_eq!(parse_bounding_set("Name:\tsleep\n"), None);
        assert_eq!(parse_bounding_set("CapBnd:\tzz\n"), None);
    }

    #[test]
    fn names_map_ids_to_the_first_entry() {
        let names = parse_names("root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\n# c:x:1:\n");
        assert_eq!(names.get(&0).map(String::as_str), Some("root"));
        assert_eq!(names.len(), 1);
    }
}
