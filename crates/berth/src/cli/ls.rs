//! `berth ls`: a table of the caller's container requests, newest first,
//! in every state: the newest `--limit` of them, or all with `--all`.

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Context;
use berth_client::ListParams;
use berth_core::time::Timestamp;
use berth_core::{Container, ContainerRequest};
use chrono::Local;
use clap::Args;
use serde_json::json;

use super::api::Api;

/// The maximum number of records the controller returns in one list call.
const MAX_LIMIT: u64 = 1000;

/// Placeholder for a cell that has no value.
const EMPTY_CELL: &str = "-";

#[derive(Debug, Args)]
pub struct LsArgs {
    /// List all your requests, not only the newest --limit.
    #[arg(short, long, conflicts_with = "limit")]
    all: bool,
    /// Maximum number of requests to list.
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=MAX_LIMIT))]
    limit: u64,
}

pub async fn execute(args: LsArgs) -> anyhow::Result<ExitCode> {
    let api = Api::from_env()?;
    let owner = api.current_user_uuid().await?;
    let limit = if args.all { None } else { Some(args.limit) };
    let (requests, available) = list_requests(&api, &owner, limit).await?;
    let mut containers = HashMap::new();
    for chunk in requests.chunks(MAX_LIMIT as usize) {
        containers.extend(containers_of(&api, chunk).await?);
    }

    let rows: Vec<Row> = requests
        .iter()
        .map(|request| {
            let container = request
                .container_uuid
                .as_deref()
                .and_then(|uuid| containers.get(uuid));
            Row::new(request, container)
        })
        .collect();
    print!("{}", format_table(&rows));

    if let Some(available) = available {
        let listed = requests.len() as u64;
        if available > listed {
            eprintln!("berth: showing {listed} of {available} requests; use --limit N or --all to see more");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Fetches the caller's requests, newest first: at most `limit`, or all of
/// them page by page. Returns them with the number the controller has.
async fn list_requests(
    api: &Api,
    owner: &str,
    limit: Option<u64>,
) -> anyhow::Result<(Vec<ContainerRequest>, Option<u64>)> {
    let mut requests = Vec::new();
    let mut available = None;
    loop {
        let page_size = match limit {
            Some(limit) => limit - requests.len() as u64,
            None => MAX_LIMIT,
        };
        let params = ListParams {
            filters: Some(json!([["owner_uuid", "=", owner]])),
            // The UUID breaks ties, so that pages neither skip nor repeat
            // requests created in the same instant.
            order: Some(vec!["created_at desc".into(), "uuid desc".into()]),
            limit: Some(page_size.min(MAX_LIMIT)),
            offset: Some(requests.len() as u64),
            ..Default::default()
        };
        let page = api
            .client
            .list_container_requests(&params)
            .await
            .map_err(|err| api.explain(err))
            .context("failed to list your container requests")?;
        available = page.items_available.or(available);
        let received = page.items.len() as u64;
        requests.extend(page.items);

        let have = requests.len() as u64;
        let done = received == 0
            || limit.is_some_and(|limit| have >= limit)
            || available.is_some_and(|available| have >= available);
        if done {
            return Ok((requests, available));
        }
    }
}

/// Fetches the containers of `requests` in one list call, by UUID.
async fn containers_of(
    api: &Api,
    requests: &[ContainerRequest],
) -> anyhow::Result<HashMap<String, Container>> {
    let uuids: Vec<&str> = requests
        .iter()
        .filter_map(|request| request.container_uuid.as_deref())
        .collect();
    if uuids.is_empty() {
        return Ok(HashMap::new());
    }
    let params = ListParams {
        filters: Some(json!([["uuid", "in", uuids]])),
        limit: Some(uuids.len() as u64),
        ..Default::default()
    };
    let page = api
        .client
        .list_containers(&params)
        .await
        .map_err(|err| api.explain(err))
        .context("failed to list the containers of your requests")?;
    Ok(page
        .items
        .into_iter()
        .map(|container| (container.uuid.clone(), container))
        .collect())
}

/// One line of the table, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    request: String,
    state: String,
    container_state: String,
    exit_code: String,
    created: String,
    name: String,
}

const HEADER: [&str; 6] = ["REQUEST", "STATE", "CONTAINER", "EXIT", "CREATED", "NAME"];

impl Row {
    fn new(request: &ContainerRequest, container: Option<&Container>) -> Row {
        Row {
            request: request.uuid.clone(),
            state: request.state.to_string(),
            container_state: container
                .map(|c| c.state.to_string())
                .unwrap_or_else(|| EMPTY_CELL.into()),
            exit_code: container
                .and_then(|c| c.exit_code)
                .map(|code| code.to_string())
                .unwrap_or_else(|| EMPTY_CELL.into()),
            created: local_time(&request.created_at),
            name: request
                .name
                .as_deref()
                .filter(|name| !name.is_empty())
                .map(printable)
                .unwrap_or_else(|| EMPTY_CELL.into()),
        }
    }

    fn cells(&self) -> [&str; 6] {
        [
            &self.request,
            &self.state,
            &self.container_state,
            &self.exit_code,
            &self.created,
            &self.name,
        ]
    }
}

fn local_time(time: &Timestamp) -> String {
    time.with_timezone(&Local)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Replaces control characters (newlines, tabs, escapes) in a name, so
/// that one request stays on one line of the table.
fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Formats the header and the rows. Columns are padded to their widest
/// cell and separated by two spaces, except the last, which is not padded.
fn format_table(rows: &[Row]) -> String {
    let mut widths = HEADER.map(|title| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row.cells()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for cells in std::iter::once(HEADER).chain(rows.iter().map(Row::cells)) {
        let last = cells.len() - 1;
        for (column, cell) in cells.iter().enumerate() {
            if column == last {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                let padding = widths[column] - cell.chars().count() + 2;
                text.extend(std::iter::repeat_n(' ', padding));
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: LsArgs,
    }

    fn row(request: &str, state: &str, container: &str, exit: &str, name: &str) -> Row {
        Row {
            request: request.into(),
            state: state.into(),
            container_state: container.into(),
            exit_code: exit.into(),
            created: "2026-12-04 10:00:00".into(),
            name: name.into(),
        }
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = [
            row(
                "zzzzz-xvhdp-0123456789abcde",
                "Committed",
                "Running",
                "-",
                "first job",
            ),
            row(
                "zzzzz-xvhdp-edcba9876543210",
                "Final",
                "Cancelled",
                "137",
                "-",
            ),
        ];
        let table = format_table(&rows);
        let expected = "\
REQUEST                      STATE      CONTAINER  EXIT  CREATED              NAME
zzzzz-xvhdp-0123456789abcde  Committed  Running    -     2026-12-04 10:00:00  first job
zzzzz-xvhdp-edcba9876543210  Final      Cancelled  137   2026-12-04 10:00:00  -
";
        assert_eq!(table, expected);
    }

    #[test]
    fn empty_table_is_the_header() {
        assert_eq!(
            format_table(&[]),
            "REQUEST  STATE  CONTAINER  EXIT  CREATED  NAME\n"
        );
    }

    #[test]
    fn wide_name_does_not_pad_the_line() {
        let rows = [row("r", "Final", "Complete", "0", "a name with ünïcode")];
        let table = format_table(&rows);
        assert!(table.lines().all(|line| !line.ends_with(' ')), "{table:?}");
    }

    #[test]
    fn control_characters_in_names_are_replaced() {
        assert_eq!(printable("two\nlines\tand\x1b[31m"), "two?lines?and?[31m");
    }

    #[test]
    fn limit_defaults_to_20_and_is_bounded() {
        let cli = Cli::try_parse_from(["ls"]).unwrap();
        assert_eq!(cli.args.limit, 20);
        assert!(!cli.args.all);
        let cli = Cli::try_parse_from(["ls", "--limit", "5"]).unwrap();
        assert_eq!(cli.args.limit, 5);
        let cli = Cli::try_parse_from(["ls", "--all"]).unwrap();
        assert!(cli.args.all);
        let err = Cli::try_parse_from(["ls", "--all", "--limit", "5"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        for bad in ["0", "1001", "x"] {
            let err = Cli::try_parse_from(["ls", "--limit", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }
}
