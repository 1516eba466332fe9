//! The gateway's SFTP server as a program of its own, the same server
//! that `berth sftp-server` runs, for tests of this crate, which cannot
//! build the `berth` binary.

use std::process::ExitCode;

use berth_supervisor::sftp_server::{self, Options};

fn main() -> ExitCode {
    match Options::parse(std::env::args_os().skip(1)) {
        Ok(options) => sftp_server::run(&options),
        Err(message) => {
            eprintln!("berth-sftp-server: {message}");
            ExitCode::from(2)
        }
    }
}
