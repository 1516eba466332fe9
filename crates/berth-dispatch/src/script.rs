//! The command a job runs, and the shell script that carries it.
//!
//! Every job runs `berth supervise [--config FILE] --credentials FILE UUID`.
//! The Slurm backend wraps that command in a two-line POSIX shell script
//! whose second line `exec`s it, so that the supervisor becomes the batch
//! shell and receives the TERM that `scancel --batch` sends. The local
//! backend runs the same argument vector directly. Neither carries a
//! secret: the supervisor reads its token from the credentials file.

use std::path::Path;

use crate::SupervisorCommand;

/// The path of an argument that is not valid UTF-8.
#[derive(Debug, thiserror::Error)]
#[error("failed to build the supervisor command: {what} {path:?} is not valid UTF-8")]
pub struct NotUtf8 {
    pub what: &'static str,
    pub path: std::path::PathBuf,
}

fn utf8<'a>(what: &'static str, path: &'a Path) -> Result<&'a str, NotUtf8> {
    path.to_str().ok_or_else(|| NotUtf8 {
        what,
        path: path.to_path_buf(),
    })
}

impl SupervisorCommand {
    /// Builds the argument vector that runs the supervisor of one
    /// container, starting with the program.
    pub fn argv(
        &self,
        credentials_file: &Path,
        container_uuid: &str,
    ) -> Result<Vec<String>, NotUtf8> {
        let mut argv = vec![
            utf8("the berth program", &self.program)?.to_string(),
            "supervise".to_string(),
        ];
        if let Some(config_file) = &self.config_file {
            argv.push("--config".to_string());
            argv.push(utf8("the configuration file", config_file)?.to_string());
        }
        argv.push("--credentials".to_string());
        argv.push(utf8("the credentials file", credentials_file)?.to_string());
        argv.push(container_uuid.to_string());
        Ok(argv)
    }

    /// Checks that the program and configuration paths can go into a
    /// script.
    pub fn check(&self) -> Result<(), NotUtf8> {
        self.argv(Path::new("/"), "").map(drop)
    }
}

/// Quotes one word for a POSIX shell: inside single quotes every byte is
/// literal, and an embedded `'` becomes `'\''` (close, escaped quote, open).
pub fn shell_quote(word: &str) -> String {
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for c in word.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

/// Builds a job script that replaces the shell with `argv`.
pub fn exec_script(argv: &[String]) -> String {
    let words: Vec<String> = argv.iter().map(|word| shell_quote(word)).collect();
    format!("#!/bin/sh\nexec {}\n", words.join(" "))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn quoting_handles_quotes_spaces_and_newlines() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$HOME `x` \"y\""), "'$HOME `x` \"y\"'");
        assert_eq!(shell_quote("two\nlines"), "'two\nlines'");
    }

    #[test]
    fn quoted_words_survive_a_real_shell() {
        let words = ["it's", "a b", "$HOME", "\\n", "two\nlines", "''"];
        let argv: Vec<String> = ["/usr/bin/printf", "%s\\0"]
            .iter()
            .map(|s| s.to_string())
            .chain(words.iter().map(|s| s.to_string()))
            .collect();
        let script = exec_script(&argv);
        let output = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let printed: Vec<&str> = std::str::from_utf8(&output.stdout)
            .unwrap()
            .split_terminator('\0')
            .collect();
        assert_eq!(printed, words);
    }

    #[test]
    fn argv_with_and_without_config() {
        let with = SupervisorCommand {
            program: "/usr/bin/berth".into(),
            config_file: Some("/etc/berth/berth.yml".into()),
        };
        assert_eq!(
            with.argv(Path::new("/c/x.json"), "zzzzz-dz642-000000000000001")
                .unwrap(),
            [
                "/usr/bin/berth",
                "supervise",
                "--config",
                "/etc/berth/berth.yml",
                "--credentials",
                "/c/x.json",
                "zzzzz-dz642-000000000000001"
            ]
        );
        let without = SupervisorCommand {
            program: "berth".into(),
            config_file: None,
        };
        assert_eq!(
            without.argv(Path::new("/c/x.json"), "u").unwrap(),
            ["berth", "supervise", "--credentials", "/c/x.json", "u"]
        );
    }

    #[test]
    fn non_utf8_program_is_reported() {
        use std::os::unix::ffi::OsStringExt;
        let command = SupervisorCommand {
            program: PathBuf::from(std::ffi::OsString::from_vec(vec![b'/', 0xff])),
            config_file: None,
        };
        let err = command.check().unwrap_err();
        assert!(err.to_string().contains("berth program"), "{err}");
    }
}
