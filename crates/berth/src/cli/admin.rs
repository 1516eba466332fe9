//! `berth admin`: administrative commands that act on the store directly,
//! with the configuration file of the controller.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a user and print the user's new API token (only the token, on
    /// one line).
    CreateUser(CreateUserArgs),
}

#[derive(Debug, Args)]
pub struct CreateUserArgs {
    /// The user's name.
    #[arg(value_name = "NAME", value_parser = parse_user_name)]
    name: String,
    /// Make the user an administrator, who can read every user's records.
    #[arg(long)]
    admin: bool,
    /// The controller's configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

fn parse_user_name(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("the user name is empty".into());
    }
    if text.chars().any(char::is_control) {
        return Err(format!(
            "invalid user name {text:?}: it contains a control character"
        ));
    }
    Ok(text.to_string())
}

pub async fn execute(command: AdminCommand) -> anyhow::Result<ExitCode> {
    match command {
        AdminCommand::CreateUser(args) => create_user(args).await,
    }
}

async fn create_user(args: CreateUserArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let cluster = berth_controller::ClusterSettings {
        cluster_id: config.cluster_id.clone(),
        system_token: config.system_token()?,
    };
    let token =
        berth_controller::create_user(&cluster, config.controller()?, &args.name, args.admin)
            .await
            .with_context(|| format!("failed to create user {:?}", args.name))?;
    // The token alone on stdout, so that scripts can capture it.
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: AdminCommand,
    }

    #[test]
    fn create_user_takes_name_flag_and_config() {
        let cli = Cli::try_parse_from([
            "admin",
            "create-user",
            "alice",
            "--admin",
            "--config",
            "c.yml",
        ])
        .unwrap();
        let AdminCommand::CreateUser(args) = cli.command;
        assert_eq!(args.name, "alice");
        assert!(args.admin);
        assert_eq!(args.config, PathBuf::from("c.yml"));
    }

    #[test]
    fn create_user_needs_a_config() {
        let err = Cli::try_parse_from(["admin", "create-user", "alice"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--config"), "{err}");
    }

    #[test]
    fn empty_user_name_is_rejected() {
        let err =
            Cli::try_parse_from(["admin", "create-user", " ", "--config", "c.yml"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
