//! The login user of a session, looked up in the container's own
//! `/etc/passwd`.

use crate::runtime::exec::ExecUser;

/// The shell a user gets when `/etc/passwd` names none.
pub const FALLBACK_SHELL: &str = "/bin/sh";

/// A user found for a session: who the exec runs as, and the home
/// directory and shell `/etc/passwd` gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginUser {
    pub exec: ExecUser,
    pub home: String,
    pub shell: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {0:?} was not found in the container's /etc/passwd; connect as root or as a user of the container's image (USER@ in ssh)")]
    NotFound(String),
    #[error("user {0:?} has an invalid entry in the container's /etc/passwd: its UID or GID is not a number")]
    InvalidEntry(String),
}

/// Finds `user` (a name, or a numeric UID) in the text of an
/// `/etc/passwd` file, `None` when the container has none. A numeric UID
/// without an entry runs with GID 0, and `root` is UID 0 even without the
/// file, as in the Docker Engine.
pub fn find_user(passwd: Option<&str>, user: &str) -> Result<LoginUser, UserError> {
    // Lines: name:password:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .unwrap_or("")
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 4)
        .collect();
    let numeric = user.parse::<u32>().ok();
    let entry = entries.iter().find(|fields| match numeric {
        Some(uid) => fields[2].parse::<u32>().ok() == Some(uid),
        None => fields[0] == user,
    });

    let Some(fields) = entry else {
        return match (numeric, user) {
            (Some(uid), _) => Ok(LoginUser {
                exec: ExecUser {
                    name: None,
                    uid,
                    gid: 0,
                },
                home: "/".to_string(),
                shell: FALLBACK_SHELL.to_string(),
            }),
            (None, "root") => Ok(LoginUser {
                exec: ExecUser {
                    name: None,
                    uid: 0,
                    gid: 0,
                },
                home: "/root".to_string(),
                shell: FALLBACK_SHELL.to_string(),
            }),
            (None, _) => Err(UserError::NotFound(user.to_string())),
        };
    };
    let (Ok(uid), Ok(gid)) = (fields[2].parse::<u32>(), fields[3].parse::<u32>()) else {
        return Err(UserError::InvalidEntry(user.to_string()));
    };
    let field = |index: usize| {
        fields
            .get(index)
            .filter(|value| !value.is_empty())
            .map(|value| value.to_string())
    };
    Ok(LoginUser {
        exec: ExecUser {
            name: Some(fields[0].to_string()),
            uid,
            gid,
        },
        home: field(5).unwrap_or_else(|| "/".to_string()),
        shell: field(6).unwrap_or_else(|| FALLBACK_SHELL.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/ash\n\
        # a comment\n\
        daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
        alice:x:1000:100::/home/alice:\n\
        broken:x:uid:1::/:/bin/sh\n";

    #[test]
    fn name_finds_its_entry() {
        let user = find_user(Some(PASSWD), "root").unwrap();
        assert_eq!(user.exec.name.as_deref(), Some("root"));
        assert_eq!((user.exec.uid, user.exec.gid), (0, 0));
        assert_eq!(user.home, "/root");
        assert_eq!(user.shell, "/bin/ash");
    }

    #[test]
    fn empty_shell_falls_back_to_sh() {
        let user = find_user(Some(PASSWD), "alice").unwrap();
        assert_eq!((user.exec.uid, user.exec.gid), (1000, 100));
        assert_eq!(user.shell, FALLBACK_SHELL);
    }

    #[test]
    fn numeric_user_finds_entry_by_uid() {
        let user = find_user(Some(PASSWD), "1").unwrap();
        assert_eq!(user.exec.name.as_deref(), Some("daemon"));
        assert_eq!(user.shell, "/bin/false");
    }

    #[test]
    fn numeric_user_without_entry_runs_as_uid() {
        let user = find_user(Some(PASSWD), "4242").unwrap();
        assert_eq!(user.exec.name, None);
        assert_eq!(user.exec.engine_user(), "4242:0");
    }

    #[test]
    fn unknown_name_is_an_error_naming_it() {
        let error = find_user(Some(PASSWD), "mallory").unwrap_err();
        assert_eq!(error, UserError::NotFound("mallory".into()));
        assert!(error.to_string().contains("\"mallory\""));
    }

    #[test]
    fn root_works_without_passwd() {
        let user = find_user(None, "root").unwrap();
        assert_eq!((user.exec.uid, user.exec.gid), (0, 0));
        assert_eq!(user.shell, FALLBACK_SHELL);
    }

    #[test]
    fn invalid_uid_is_reported() {
        let error = find_user(Some(PASSWD), "broken").unwrap_err();
        assert_eq!(error, UserError::InvalidEntry("broken".into()));
    }
}
