//! Measures how soon a change-feed reader hears of a container write, and,
//! for comparison in the same run, how soon a client that polls once a
//! second does. `scripts/bench/run-watch-latency.sh` runs it.
//!
//! Two set-ups, each with its own controllers on loopback (port 0):
//! - `sqlite`: one controller on a SQLite file in a temporary directory,
//!   which takes the write and serves both readers.
//! - `postgres`: two controllers, A and B, on one PostgreSQL schema
//!   (created for the run and dropped after it). The write goes through A,
//!   and both readers call B.
//!
//! Each sample first sleeps a random 0 to 1 s, so that writes fall at
//! random points of the poller's second. It then takes the time T0 and
//! sets a new `scheduler_job_id` on a locked container, as a dispatcher
//! does. A reader's latency runs from T0 until its response that carries
//! the new value arrives. The long-poller keeps a `wait=30` call open at
//! all times, and the poller calls with `wait=0` once a second.
//!
//! Usage: `watch_latency [--samples N] [--postgres URL]`

use std::time::Duration;

use anyhow::{bail, Context};
use berth_client::{Settings, Token};
use berth_controller::{bind, ClusterSettings, Config};
use berth_core::Secret;
use rand::Rng;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Interval of the polling client, the baseline.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Wait of the long-poller's calls, the contract's maximum.
const LONG_POLL_WAIT_SECONDS: u64 = 30;

/// How long a sample may take before the run fails.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Samples when `--samples` is not given.
const DEFAULT_SAMPLES: usize = 50;

const SYSTEM_TOKEN: &str = "system-token-for-the-watch-benchmark";

#[derive(Debug)]
struct Args {
    samples: usize,
    postgres: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        samples: DEFAULT_SAMPLES,
        postgres: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "--samples" => {
                let value = words.next().context("--samples needs a number")?;
                args.samples = value
                    .parse()
                    .ok()
                    .filter(|samples| *samples > 0)
                    .with_context(|| {
                        format!("invalid --samples {value:?}: give a whole number above 0")
                    })?;
            }
            "--postgres" => {
                args.postgres = Some(words.next().context("--postgres needs a database URL")?);
            }
            other => bail!("unknown argument {other:?}: use [--samples N] [--postgres URL]"),
        }
    }
    Ok(args)
}

fn cluster() -> anyhow::Result<ClusterSettings> {
    Ok(ClusterSettings {
        cluster_id: "zzzzz".parse().context("invalid cluster id")?,
        system_token: Secret::new(SYSTEM_TOKEN),
    })
}

/// A controller serving on a port of its own until it is stopped.
#[derive(Debug)]
struct Controller {
    base_url: url::Url,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Controller {
    async fn start(database_url: &str) -> anyhow::Result<Controller> {
        let config = Config::new("127.0.0.1:0".parse()?, database_url);
        let bound = bind(cluster()?, config).await?;
        let base_url = format!("{}/", bound.url()).parse()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Ok(Controller {
            base_url,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// One reader's sighting of a `scheduler_job_id` value.
type Sighting = (String, Instant);

/// Calls the change feed of `base_url` and returns the page.
async fn changes(
    http: &reqwest::Client,
    base_url: &url::Url,
    after: Option<&str>,
    wait_seconds: u64,
) -> anyhow::Result<Value> {
    let mut url = base_url.join("arvados/v1/containers/changes")?;
    url.query_pairs_mut()
        .append_pair("wait", &wait_seconds.to_string());
    if let Some(after) = after {
        url.query_pairs_mut().append_pair("after", after);
    }
    let response = http
        .get(url)
        .bearer_auth(SYSTEM_TOKEN)
        .send()
        .await?
        .error_for_status()?;
    Ok(response.json().await?)
}

/// Reports the `scheduler_job_id` of every item of `page` that is the
/// container, and returns the page's cursor.
fn report(
    page: &Value,
    container_uuid: &str,
    sightings: &mpsc::UnboundedSender<Sighting>,
) -> anyhow::Result<String> {
    let arrived = Instant::now();
    for item in page["items"]
        .as_array()
        .context("the change feed's response has no items")?
    {
        if item["uuid"] == container_uuid {
            if let Some(job) = item["scheduler_job_id"].as_str() {
                let _ = sightings.send((job.to_string(), arrived));
            }
        }
    }
    Ok(page["cursor"]
        .as_str()
        .context("the change feed's response has no cursor")?
        .to_string())
}

/// How a reader follows the feed.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Keeps a `wait=30` call open at all times.
    LongPoll,
    /// Calls with `wait=0` once every [`POLL_INTERVAL`].
    Poll,
}

/// Follows the feed from `cursor` and reports what it returns.
async fn follow(
    reader: Reader,
    base_url: url::Url,
    container_uuid: String,
    mut cursor: String,
    sightings: mpsc::UnboundedSender<Sighting>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wait_seconds = match reader {
            Reader::LongPoll => LONG_POLL_WAIT_SECONDS,
            Reader::Poll => {
                ticks.tick().await;
                0
            }
        };
        let page = changes(&http, &base_url, Some(&cursor), wait_seconds).await?;
        cursor = report(&page, &container_uuid, &sightings)?;
    }
}

/// Waits until a reader reports `job`; returns when its response arrived.
async fn sighting_of(
    sightings: &mut mpsc::UnboundedReceiver<Sighting>,
    job: &str,
    reader: &str,
) -> anyhow::Result<Instant> {
    let found = tokio::time::timeout(SAMPLE_TIMEOUT, async {
        while let Some((seen, arrived)) = sightings.recv().await {
            if seen == job {
                return Some(arrived);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(arrived)) => Ok(arrived),
        Ok(None) => bail!("the {reader} stopped before it saw {job}"),
        Err(_) => bail!("the {reader} did not see {job} within {SAMPLE_TIMEOUT:?}"),
    }
}

/// Latencies of one set-up, in milliseconds.
#[derive(Debug, Default)]
struct Latencies {
    write: Vec<f64>,
    long_poll: Vec<f64>,
    poll: Vec<f64>,
}

/// Takes `samples` samples: writes through `writer`, reads from `reader`.
async fn measure(
    writer: &Controller,
    reader: &Controller,
    samples: usize,
) -> anyhow::Result<Latencies> {
    let system = berth_client::Client::new(Settings {
        base_url: writer.base_url.clone(),
        token: Token::new(SYSTEM_TOKEN),
        insecure: false,
    })?;
    let request = system
        .create_container_request(&json!({
            "name": "watch latency",
            "state": "Committed",
            "container_image": "busybox",
            "command": ["true"],
            "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1048576}},
            "runtime_constraints": {"ram": 67108864, "vcpus": 1},
            "priority": 1,
        }))
        .await?;
    let container_uuid = request
        .container_uuid
        .context("the committed request has no container")?;
    system.lock_container(&container_uuid).await?;

    let first = changes(&reqwest::Client::new(), &reader.base_url, None, 0).await?;
    let cursor = first["cursor"]
        .as_str()
        .context("the change feed's response has no cursor")?
        .to_string();
    let (long_poll_tx, mut long_poll_rx) = mpsc::unbounded_channel();
    let (poll_tx, mut poll_rx) = mpsc::unbounded_channel();
    let long_poller = tokio::spawn(follow(
        Reader::LongPoll,
        reader.base_url.clone(),
        container_uuid.clone(),
        cursor.clone(),
        long_poll_tx,
    ));
    let poller = tokio::spawn(follow(
        Reader::Poll,
        reader.base_url.clone(),
        container_uuid.clone(),
        cursor,
        poll_tx,
    ));

    let mut latencies = Latencies::default();
    for sample in 0..samples {
        let pause = rand::thread_rng().gen_range(0..1000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let job = format!("bench-{sample}");
        let start = Instant::now();
        system
            .update_container(&container_uuid, &json!({"scheduler_job_id": job}))
            .await?;
        let written = start.elapsed();
        let long_polled = sighting_of(&mut long_poll_rx, &job, "long-poller").await?;
        let polled = sighting_of(&mut poll_rx, &job, "poller").await?;
        latencies.write.push(milliseconds(written));
        latencies
            .long_poll
            .push(milliseconds(long_polled.saturating_duration_since(start)));
        latencies
            .poll
            .push(milliseconds(polled.saturating_duration_since(start)));
    }
    long_poller.abort();
    poller.abort();
    Ok(latencies)
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Returns the nearest-rank percentile `p` (0 to 100) of `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_results(setup: &str, latencies: &Latencies) {
    let long_poll_median = percentile(&latencies.long_poll, 50.0);
    for (reader, values) in [
        ("write call (for reference)", &latencies.write),
        ("long-poll, wait=30", &latencies.long_poll),
        ("poll every 1 s", &latencies.poll),
    ] {
        let median = percentile(values, 50.0);
        println!(
            "| {setup} | {reader} | {} | {median:.1} | {:.1} | {:.1} |",
            values.len(),
            percentile(values, 95.0),
            median / long_poll_median,
        );
    }
}

/// A PostgreSQL schema for the run, dropped by [`Schema::drop`].
struct Schema {
    base_url: String,
    name: String,
    url: String,
}

impl Schema {
    async fn create(base_url: &str) -> anyhow::Result<Schema> {
        let name = format!("bench_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(base_url)
            .await
            .context("failed to connect to the --postgres database")?;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let separator = if base_url.contains('?') { '&' } else { '?' };
        Ok(Schema {
            url: format!("{base_url}{separator}options[search_path]={name}"),
            base_url: base_url.to_string(),
            name,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.base_url).await?;
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.name))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(())
    }
}

async fn run_postgres(base_url: &str, samples: usize) -> anyhow::Result<Latencies> {
    let schema = Schema::create(base_url).await?;
    let measured = async {
        let a = Controller::start(&schema.url).await?;
        let b = Controller::start(&schema.url).await?;
        let latencies = measure(&a, &b, samples).await;
        a.stop().await?;
        b.stop().await?;
        latencies
    }
    .await;
    schema.drop().await?;
    measured
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    println!("| set-up | reader | samples | median (ms) | p95 (ms) | median / long-poll's |");
    println!("| --- | --- | --- | --- | --- | --- |");

    let directory = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}/berth.db", directory.path().display());
    let controller = Controller::start(&sqlite_url).await?;
    let latencies = measure(&controller, &controller, args.samples).await;
    controller.stop().await?;
    print_results("SQLite, one controller", &latencies?);

    if let Some(base_url) = &args.postgres {
        let latencies = run_postgres(base_url, args.samples).await?;
        print_results("PostgreSQL, write on A, read on B", &latencies);
    }
    Ok(())
}
