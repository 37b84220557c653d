//! `herald`: the command-line tool. Runs the server (`serve`), talks to one (`publish`,
//! `history`, `bench publish`, `verify`) and manages configuration (`config init`,
//! `config check`).
//!
//! Client commands find the server with `--url` (env `HERALD_URL`) and authenticate with
//! `--key` (env `HERALD_KEY`), falling back to the admin key the server generated in its data
//! directory (`--data`, default `./herald-data`), so a local user needs no setup.
//!
//! Exit codes are part of the interface (see [`EXIT_CODES`]).

mod bench;
mod subscribe;
mod verify;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use herald_protocol::{ErrorBody, PageBody, PublishAck, PublishMessage, PublishRequest, Ttl};
use herald_server::config::{self, Overrides};
use serde_json::value::RawValue;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  failure (invalid configuration, the server could not start or stopped with an error)
  2  usage error (bad arguments)
  3  the server rejected the request (its error code and message are printed)
  4  the server could not be reached, or did not answer in time";

/// Exit code when the server answered with an error.
const EXIT_REJECTED: u8 = 3;
/// Exit code when the server could not be reached.
const EXIT_UNREACHABLE: u8 = 4;
/// Exit code for usage errors found after argument parsing (clap uses 2 as well).
const EXIT_USAGE: u8 = 2;

/// How long a client command waits for one HTTP exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "herald",
    version,
    about = "Herald: realtime pub/sub with delivery guarantees you can check",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Publish one message to a channel and print the acknowledgement.
    #[command(after_help = EXIT_CODES)]
    Publish(PublishArgs),
    /// Read a channel's messages (oldest first, or newest first with --newest or --before).
    #[command(after_help = EXIT_CODES)]
    History(HistoryArgs),
    /// Receive messages live (WebSocket), resuming by itself after a drop. Prints one JSON
    /// line per message on stdout; notices go to stderr.
    Subscribe(SubscribeArgs),
    /// Print or check configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Measure a running server.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Check the delivery guarantees of a deployment (or of a server it spawns and kills):
    /// publishers, subscribers of every guarantee and surface, faults, then a table of
    /// violations. Exit 0: none; 1: a violation; 2: usage; 3: key refused; 4: unreachable.
    Verify(Box<verify::VerifyArgs>),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML config file (see `herald config init`). HERALD_* variables override it.
    #[arg(long, value_name = "FILE", env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory [config: data_dir, default ./herald-data].
    #[arg(long = "data", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP listen address [config: http_addr, default 127.0.0.1:7600]; port 0 picks one.
    #[arg(long = "http", value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// Allow anonymous access with every capability (loopback addresses only).
    #[arg(long)]
    dev: bool,
    /// MQTT 3.1.1/5.0 listen address [config: mqtt.listen, default 127.0.0.1:1883]; turns the
    /// listener on even when the config turns it off. Port 0 picks one.
    #[arg(long = "mqtt", value_name = "ADDR", conflicts_with = "no_mqtt")]
    mqtt_listen: Option<SocketAddr>,
    /// Turn the MQTT listener off [config: mqtt.enabled, default on].
    #[arg(long = "no-mqtt")]
    no_mqtt: bool,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// Base URL of the server.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:7600")]
    url: String,
    /// API key. Without one, <DIR>/admin.key is used if it exists.
    #[arg(long, env = "HERALD_KEY", hide_env_values = true)]
    key: Option<String>,
    /// The server's data directory, where the generated admin key is read from.
    #[arg(
        long = "data",
        value_name = "DIR",
        env = "HERALD_DATA_DIR",
        default_value = "./herald-data"
    )]
    data_dir: PathBuf,
}

#[derive(Args, Debug)]
struct PublishArgs {
    /// Channel name, e.g. chat:room-1.
    channel: String,
    /// Message data: sent as JSON if it parses as JSON, else as a JSON string.
    #[arg(value_name = "DATA")]
    payload: String,
    /// Idempotency key; publishing the same id again is answered with the original position.
    #[arg(long)]
    id: Option<String>,
    /// Time to live, e.g. 10s, 500ms, 1h.
    #[arg(long)]
    ttl: Option<String>,
    /// Message name (event type).
    #[arg(long)]
    name: Option<String>,
    /// Header as KEY=VALUE; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Print the acknowledgement as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
struct HistoryArgs {
    /// Channel name.
    channel: String,
    /// Messages after this position (EPOCH:SERIAL), oldest first.
    #[arg(long, value_name = "POS", conflicts_with = "before")]
    after: Option<String>,
    /// Messages before this position, newest first.
    #[arg(long, value_name = "POS")]
    before: Option<String>,
    /// The newest messages first, starting at the channel's top.
    #[arg(long, conflicts_with_all = ["after", "before"])]
    newest: bool,
    /// Messages per page (server default 100).
    #[arg(long)]
    limit: Option<u32>,
    /// Print the page exactly as the server returned it (JSON).
    #[arg(long, conflicts_with = "follow")]
    json: bool,
    /// Print every message after --after (or from the oldest retained), then keep printing
    /// new ones as they arrive, with no gap and no duplicate (Ctrl-C to stop).
    #[arg(long, conflicts_with_all = ["before", "newest", "limit"])]
    follow: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args, Debug)]
struct SubscribeArgs {
    /// Channel names.
    #[arg(required = true, value_name = "CHANNEL")]
    channels: Vec<String>,
    /// Resume after a position: EPOCH:SERIAL (one channel), or CHANNEL=EPOCH:SERIAL; repeat
    /// for several channels. Needs exactly-once.
    #[arg(long, value_name = "POS")]
    from: Vec<String>,
    /// Start with the last N messages of each channel (exactly-once).
    #[arg(long, value_name = "N", conflicts_with = "from")]
    rewind: Option<u64>,
    /// exactly-once (resumable, no loss), at-most-once (live only, drops reported as gaps) or
    /// at-least-once (a durable subscriber named by --subscriber-id: the server keeps its
    /// acked position and delivers every message until acked; one channel only).
    #[arg(long, value_enum, default_value_t = subscribe::GuaranteeArg::ExactlyOnce)]
    guarantee: subscribe::GuaranteeArg,
    /// A CEL filter over `name` and `headers`, e.g. 'headers.kind == "order"'.
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Print positions only (hints), not the messages.
    #[arg(long)]
    hints: bool,
    /// Exit after this many messages (--ack manual: then once stdin is closed).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    at_least_once: subscribe::AtLeastOnceArgs,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the default configuration, with comments.
    Init,
    /// Validate a configuration file (exit 1 with the reason if invalid).
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Durable publish throughput and ack latency, and the disk's raw group-commit limit.
    Publish(bench::BenchArgs),
    /// WebSocket fan-out: delivered messages/s, publish-to-deliver latency, server CPU per
    /// delivery and RSS per idle connection, for 1 publisher and N subscribers.
    Fanout(bench::fanout::FanoutArgs),
    /// MQTT: the same load generator against Herald and Mosquitto (both started by the
    /// bench), QoS 0/1/2, 1 -> 1 and 1 -> 100: delivered messages/s and latency at a fixed rate.
    Mqtt(bench::mqtt::MqttArgs),
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} must look like KEY=VALUE")),
    }
}

/// A failure with its exit code.
enum Failure {
    /// The server answered with an error.
    Rejected { status: u16, body: Box<ErrorBody> },
    /// Anything else, with the exit code to use.
    Other { exit: u8, error: anyhow::Error },
}

impl Failure {
    fn other(exit: u8, error: impl Into<anyhow::Error>) -> Self {
        Failure::Other {
            exit,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let cli = match cli.command {
        Command::Verify(args) => return ExitCode::from(runtime.block_on(verify::main(*args))),
        command => Cli { command },
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Rejected { status, body }) => {
            let error = &body.error;
            eprintln!(
                "herald: the server refused the request ({status} {}): {}",
                error.code, error.message
            );
            let details: Vec<String> = [
                ("reason", &error.reason),
                ("requested", &error.requested),
                ("first_available", &error.first_available),
                ("top", &error.top),
                ("id", &error.id),
                ("position", &error.position),
            ]
            .into_iter()
            .filter_map(|(name, value)| value.as_ref().map(|value| format!("{name}={value}")))
            .collect();
            if !details.is_empty() {
                eprintln!("herald: {}", details.join(" "));
            }
            if error.retryable {
                eprintln!("herald: this error is retryable");
            }
            ExitCode::from(EXIT_REJECTED)
        }
        Err(Failure::Other { exit, error }) => {
            eprintln!("herald: {}", error_chain(&error));
            ExitCode::from(exit)
        }
    }
}

/// The error and its causes, each once: many of our error messages already include their
/// source's text, so a cause already spelled out is not repeated.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Publish(args) => publish(args).await,
        Command::History(args) if args.follow => {
            let from = match &args.after {
                Some(after) => vec![Some(herald_core::Position::parse(after).map_err(
                    |error| Failure::other(EXIT_USAGE, anyhow::anyhow!("--after: {error}")),
                )?)],
                None => vec![None],
            };
            let plan = subscribe::Plan {
                channels: vec![args.channel.clone()],
                // Without --after: everything retained, then live.
                rewind: from[0].is_none().then_some(u64::MAX),
                from,
                guarantee: herald_core::Guarantee::ExactlyOnce,
                hints: false,
                filter: None,
                count: None,
                format: subscribe::Format::Table,
            };
            subscribe::run(plan, &args.client).await
        }
        Command::History(args) => history(args).await,
        Command::Subscribe(args) => subscribe::command(args).await,
        Command::Config(ConfigCommand::Init) => {
            print!("{}", config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            config::load(Some(&file), std::iter::empty(), &Overrides::default()).map_err(
                |error| Failure::other(1, anyhow::anyhow!("{}: {error}", file.display())),
            )?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Bench(BenchCommand::Publish(args)) => bench::run(args)
            .await
            .map_err(|error| Failure::other(1, error)),
        Command::Bench(BenchCommand::Fanout(args)) => bench::fanout::run(args)
            .await
            .map_err(|error| Failure::other(1, error)),
        Command::Bench(BenchCommand::Mqtt(args)) => bench::mqtt::run(args)
            .await
            .map_err(|error| Failure::other(1, error)),
        Command::Verify(_) => unreachable!("verify has its own exit codes, handled in main"),
    }
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    init_tracing();
    let overrides = Overrides {
        data_dir: args.data_dir,
        http_addr: args.http_addr,
        dev: args.dev,
        mqtt_listen: args.mqtt_listen,
        no_mqtt: args.no_mqtt,
    };
    let config = config::load(args.config.as_deref(), std::env::vars(), &overrides)
        .map_err(|error| Failure::other(1, anyhow::anyhow!("invalid configuration: {error}")))?;
    herald_server::run(config, herald_server::shutdown_signal())
        .await
        .map_err(|error| Failure::other(1, error))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The HTTP client side of `publish` and `history`.
struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    key: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Client, Failure> {
        let base = reqwest::Url::parse(&args.url).map_err(|error| {
            Failure::other(
                EXIT_USAGE,
                anyhow::anyhow!("--url {:?} is not a URL: {error}", args.url),
            )
        })?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(Failure::other(
                EXIT_USAGE,
                anyhow::anyhow!("--url {:?} must be an http:// or https:// URL", args.url),
            ));
        }
        let key = match &args.key {
            Some(key) => Some(key.clone()),
            None => read_admin_key(&args.data_dir),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(CLIENT_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| Failure::other(1, error))?;
        Ok(Client { http, base, key })
    }

    /// `<base>/v1/channels/<channel>/messages`, with the channel percent-encoded.
    fn messages_url(&self, channel: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked to be a base URL")
            .pop_if_empty()
            .extend(["v1", "channels", channel, "messages"]);
        url
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), Failure> {
        let request = match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        };
        let response = request.send().await.map_err(|error| {
            Failure::other(
                EXIT_UNREACHABLE,
                anyhow::anyhow!("cannot reach the server at {}: {error}", self.base),
            )
        })?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|error| {
            Failure::other(
                EXIT_UNREACHABLE,
                anyhow::anyhow!("the connection to {} broke: {error}", self.base),
            )
        })?;
        if (200..300).contains(&status) {
            return Ok((status, body.to_vec()));
        }
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(body) => Err(Failure::Rejected {
                status,
                body: Box::new(body),
            }),
            Err(_) => Err(Failure::other(
                EXIT_REJECTED,
                anyhow::anyhow!(
                    "the server answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            )),
        }
    }
}

/// The generated admin key in a data directory, if there is one.
fn read_admin_key(data_dir: &Path) -> Option<String> {
    let path = data_dir.join(herald_server::auth::ADMIN_KEY_FILE);
    let key = std::fs::read_to_string(path).ok()?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

fn unexpected_body(error: serde_json::Error) -> Failure {
    Failure::other(
        EXIT_UNREACHABLE,
        anyhow::anyhow!("the server's answer is not what Herald sends: {error}"),
    )
}

async fn publish(args: PublishArgs) -> Result<(), Failure> {
    let client = Client::new(&args.client)?;
    let data = match serde_json::from_str::<Box<RawValue>>(&args.payload) {
        Ok(raw) => raw,
        Err(_) => serde_json::value::to_raw_value(&args.payload)
            .map_err(|error| Failure::other(1, error))?,
    };
    let headers: BTreeMap<String, String> = args.headers.into_iter().collect();
    let message = PublishMessage {
        id: args.id,
        name: args.name,
        headers: (!headers.is_empty()).then_some(headers),
        data,
        encoding: None,
        ttl: args.ttl.map(Ttl::Text),
    };
    let request = client
        .http
        .post(client.messages_url(&args.channel))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(
            serde_json::to_vec(&PublishRequest::Single(message))
                .map_err(|error| Failure::other(1, error))?,
        );
    let (_, body) = client.send(request).await?;
    let ack: PublishAck = serde_json::from_slice(&body).map_err(unexpected_body)?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body).trim());
    } else if ack.duplicate {
        println!(
            "{} id={} (duplicate: already published, nothing new stored)",
            ack.position, ack.id
        );
    } else {
        println!("{} id={}", ack.position, ack.id);
    }
    Ok(())
}

async fn history(args: HistoryArgs) -> Result<(), Failure> {
    let client = Client::new(&args.client)?;
    let mut url = client.messages_url(&args.channel);
    {
        let mut query = url.query_pairs_mut();
        if let Some(after) = &args.after {
            query.append_pair("after", after);
        }
        if args.newest {
            query.append_pair("order", "newest");
        }
        if let Some(before) = &args.before {
            query.append_pair("before", before);
        }
        if let Some(limit) = args.limit {
            query.append_pair("limit", &limit.to_string());
        }
    }
    let (_, body) = client.send(client.http.get(url)).await?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&body).trim());
        return Ok(());
    }
    let page: PageBody = serde_json::from_slice(&body).map_err(unexpected_body)?;
    for message in &page.messages {
        let time =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(message.time));
        let data = match message.encoding {
            Some(herald_protocol::Encoding::Base64) => {
                format!("base64:{}", message.data.get().trim_matches('"'))
            }
            _ => message.data.get().to_owned(),
        };
        let name = message.name.as_deref().unwrap_or("-");
        println!(
            "{}\t{time}\t{}\t{name}\t{data}",
            message.position, message.id
        );
    }
    for skipped in &page.skipped {
        eprintln!(
            "herald: serials {}..={} skipped ({})",
            skipped.from, skipped.to, skipped.reason
        );
    }
    eprintln!(
        "herald: {} message(s); next={} top={}{}",
        page.messages.len(),
        page.next.as_deref().unwrap_or("-"),
        page.top.as_deref().unwrap_or("-"),
        if page.more { " (more)" } else { "" }
    );
    Ok(())
}
