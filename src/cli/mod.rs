//! The operator's side — the command line (clap derive): `serve`, the admin verbs that talk to
//! the API through [`client`], and `config`. Admin verbs print the API's `data` as JSON (lists as
//! a table) and fail with the API's message.

pub mod bundles;
pub mod client;
pub mod signing;
pub mod users;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::{Config, DEFAULT_TOML};
use client::{CliError, Client, Endpoint};

/// Hangar: on-premise firmware upgrades for gateways and devices.
#[derive(Debug, Parser)]
#[command(name = "hangar", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb understands.
#[derive(Debug, Args, Clone, Default)]
pub struct Global {
    /// Config file; default /etc/hangar/hangar.toml if present, else built-in defaults.
    #[arg(long, global = true, env = "HANGAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// (The verbs that talk to the appliance fill these in from their [`Api`] options.)
    #[arg(skip)]
    pub url: Option<String>,
    /// See `url`.
    #[arg(skip)]
    pub token: Option<String>,
    /// See `url`.
    #[arg(skip)]
    pub ca: Option<PathBuf>,
    /// See `url`; `sim` only.
    #[arg(skip)]
    pub mqtt: Option<String>,
}

/// How to reach the appliance's API: options of the verbs that talk to it (and only of those,
/// so `--help` of an offline verb does not offer them). They may stand anywhere after the verb.
#[derive(Debug, Args, Clone, Default)]
pub struct Api {
    /// Admin API base URL; default from the config's ports.json.
    #[arg(long, global = true, env = "HANGAR_URL")]
    pub url: Option<String>,
    /// Admin token; default from the config's data dir.
    #[arg(long, global = true, env = "HANGAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust; default the generated <data_dir>/certs/ca.pem.
    #[arg(long, global = true, env = "HANGAR_CA")]
    pub ca: Option<PathBuf>,
}

impl Global {
    /// These options with the API connection of a verb.
    pub fn with(&self, api: &Api) -> Global {
        Global {
            config: self.config.clone(),
            url: api.url.clone(),
            token: api.token.clone(),
            ca: api.ca.clone(),
            mqtt: self.mqtt.clone(),
        }
    }
}

/// A verb group that talks to the API: its connection options and its subcommand.
#[derive(Debug, Args)]
pub struct WithApi<T: Subcommand> {
    #[command(flatten)]
    pub api: Api,
    #[command(subcommand)]
    pub cmd: T,
}

/// `hangar sim`: the fleet's options and how it reaches the appliance.
#[derive(Debug, Args)]
pub struct SimCmd {
    #[command(flatten)]
    pub api: Api,
    /// Broker URL (mqtt://host:port or mqtts://host:port); default from ports.json.
    #[arg(long, env = "HANGAR_MQTT")]
    pub mqtt: Option<String>,
    #[command(flatten)]
    pub args: crate::device::sim::SimArgs,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (HTTPS API + downloads).
    Serve,
    /// Manage firmware images.
    Firmware(WithApi<FirmwareCmd>),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Manage the device registry.
    Device(WithApi<DeviceCmd>),
    /// Upgrade one device to a released version.
    Upgrade {
        #[command(flatten)]
        api: Api,
        /// Device id (Alibaba devices: productKey/deviceName).
        device: String,
        /// Target version.
        #[arg(long)]
        version: String,
        /// Replace an active task instead of refusing, and reinstall the version it runs.
        #[arg(long)]
        force: bool,
        /// Install a version older than the one the device runs.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// List upgrade tasks, newest first.
    Tasks(TasksArgs),
    /// Rollouts in waves: create, list, show [--follow], pause, resume, cancel, dry-run.
    Campaign(WithApi<CampaignCmd>),
    /// Online backup of the appliance (store, images, certificates, token) into a tar.
    Backup {
        #[command(flatten)]
        api: Api,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into a data dir (offline: the appliance must not run on it).
    Restore {
        /// The backup tar.
        file: PathBuf,
        /// The data dir to fill.
        #[arg(long)]
        data_dir: PathBuf,
        /// Replace a non-empty data dir (the old one is moved aside).
        #[arg(long)]
        force: bool,
    },
    /// Run a fleet of simulated devices against the appliance (tests, demos, benchmarks).
    Sim(SimCmd),
    /// Device-side updater for one application binary (config: --config agent.toml).
    Agent,
    /// Offline BSDIFF40 patches, with the server's code.
    #[command(subcommand)]
    Delta(DeltaCmd),
    /// Console users: add, list, passwd, role, delete.
    User(WithApi<users::UserCmd>),
    /// MQTT application users of the site broker: add, list, delete.
    MqttUser(WithApi<users::MqttUserCmd>),
    /// The audit log: who changed what, when, with what result (newest first).
    Audit(users::AuditArgs),
    /// Signing keys (minisign): generate.
    #[command(subcommand)]
    Key(signing::KeyCmd),
    /// Offline bundles: create (vendor side), verify (anywhere), import (into the appliance).
    Bundle(WithApi<bundles::BundleCmd>),
    /// The appliance's own key: `hangar site key` prints its public half.
    Site(WithApi<bundles::SiteCmd>),
    /// Signed site reports: export (from the appliance), verify (anywhere).
    Report(WithApi<bundles::ReportCmd>),
    /// Show a device's newest task; --follow renders live progress until it ends.
    Task {
        #[command(flatten)]
        api: Api,
        /// Device id.
        device: String,
        /// Keep polling and draw a progress bar until the task ends.
        #[arg(long)]
        follow: bool,
        /// Cancel the device's active task instead.
        #[arg(long, conflicts_with = "follow")]
        cancel: bool,
        /// Print JSON (what `task` prints without --follow; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
    },
}

/// Runs `hangar backup --out FILE`.
pub async fn backup(g: &Global, out: &std::path::Path) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    let n = client.download_to("/api/ota/backup", out).await?;
    let m = crate::server::backup::verify(out).map_err(|source| CliError::Io {
        context: format!("checking {}", out.display()),
        source,
    })?;
    eprintln!(
        "{}: {n} bytes, {} files, checksums verified",
        out.display(),
        m.files.len()
    );
    Ok(())
}

/// `hangar campaign ...`
#[derive(Debug, Subcommand)]
pub enum CampaignCmd {
    /// Create a campaign from a JSON body in FILE ("-" = stdin); prints it as JSON.
    Create {
        /// The body.
        file: PathBuf,
    },
    /// Which devices fall in which wave, deltas and bytes, without creating anything.
    DryRun {
        /// The body.
        file: PathBuf,
        /// Print the whole plan as JSON instead of a summary per wave.
        #[arg(long)]
        json: bool,
    },
    /// List campaigns.
    List {
        /// Print the API's JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one: status and why, waves, failures by error code, devices waiting for a retry;
    /// --follow draws live per-wave progress bars until it ends.
    Show {
        /// Campaign id.
        id: String,
        /// Keep polling.
        #[arg(long)]
        follow: bool,
        /// Print the API's JSON instead.
        #[arg(long, conflicts_with = "follow")]
        json: bool,
    },
    /// Stop starting devices (in-flight tasks go on).
    Pause {
        /// Campaign id.
        id: String,
    },
    /// Continue a paused campaign (acknowledges the failures so far).
    Resume {
        /// Campaign id.
        id: String,
    },
    /// Emergency brake: cancel in-flight tasks, start nothing more.
    Cancel {
        /// Campaign id.
        id: String,
    },
    /// Queue the failed devices again, each with a full retry budget.
    Retry {
        /// Campaign id.
        id: String,
    },
}

fn read_body(file: &std::path::Path) -> Result<Value, CliError> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
            CliError::Io {
                context: "reading stdin".into(),
                source,
            }
        })?;
        s
    } else {
        std::fs::read_to_string(file).map_err(|source| CliError::Io {
            context: format!("reading {}", file.display()),
            source,
        })?
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::Discover(format!("the body is not JSON: {e}")))
}

/// Runs `hangar campaign ...`.
pub async fn campaign(g: &Global, cmd: CampaignCmd) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        CampaignCmd::Create { file } => print_json(
            &client
                .post("/api/ota/campaigns", &[], &read_body(&file)?)
                .await?,
        ),
        CampaignCmd::DryRun { file, json } => {
            let plan = client
                .post("/api/ota/campaigns/dry-run", &[], &read_body(&file)?)
                .await?;
            if json {
                print_json(&plan);
            } else {
                print_plan(&plan);
            }
        }
        CampaignCmd::List { json } => {
            let (list, total) = client.get_list("/api/ota/campaigns", &[], None).await?;
            if json {
                print_json(&Value::Array(list));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|c| {
                    let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0).to_string();
                    vec![
                        field(c, "id"),
                        field(c, "name"),
                        field(c, "version"),
                        field(c, "status"),
                        field(c, "total"),
                        n("completed"),
                        n("failed"),
                        n("retrying"),
                        format!("{:.1}", c["successRate"].as_f64().unwrap_or(0.0)),
                        field(c, "statusReason"),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "NAME", "VERSION", "STATUS", "TOTAL", "DONE", "FAILED", "RETRYING",
                    "SUCCESS%", "WHY",
                ],
                &rows,
                &[4, 5, 6, 7, 8],
            );
            print_more(list.len(), total, "campaigns");
        }
        CampaignCmd::Show { id, follow, json } => {
            let path = format!("/api/ota/campaigns/{id}");
            if json {
                print_json(&client.get(&path, &[]).await?);
                return Ok(());
            }
            if !follow {
                print_campaign(&client.get(&path, &[]).await?);
                return Ok(());
            }
            let c = if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                follow_bars(&client, &path).await?
            } else {
                follow_lines(&client, &path).await?
            };
            print_failures(&c);
            return campaign_outcome(&c);
        }
        CampaignCmd::Pause { id } => campaign_action(&client, &id, "pause").await?,
        CampaignCmd::Resume { id } => campaign_action(&client, &id, "resume").await?,
        CampaignCmd::Cancel { id } => campaign_action(&client, &id, "cancel").await?,
        CampaignCmd::Retry { id } => campaign_action(&client, &id, "retry").await?,
    }
    Ok(())
}

/// Whether a campaign has ended.
fn ended(c: &Value) -> bool {
    matches!(c["status"].as_str(), Some("completed" | "cancelled"))
}

/// `campaign show --follow` at a terminal: a line for the campaign (with why it waits) and a
/// progress bar per wave, redrawn every second until it ends; the campaign as it ended.
async fn follow_bars(client: &Client, path: &str) -> Result<Value, CliError> {
    let multi = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {msg}")
        .expect("template")
        .progress_chars("=> ");
    let head = multi.add(indicatif::ProgressBar::new_spinner());
    let mut bars: Vec<indicatif::ProgressBar> = Vec::new();
    loop {
        let c = client.get(path, &[]).await?;
        let waves = c["waves"].as_array().cloned().unwrap_or_default();
        while bars.len() < waves.len() {
            let b = multi.add(indicatif::ProgressBar::new(0));
            b.set_style(style.clone());
            b.set_prefix(format!("wave {}", bars.len() + 1));
            bars.push(b);
        }
        for (b, w) in bars.iter().zip(&waves) {
            let n = |k: &str| w["counts"][k].as_u64().unwrap_or(0);
            b.set_length(w["devices"].as_u64().unwrap_or(0));
            b.set_position(n("completed") + n("failed") + n("skipped") + n("cancelled"));
            b.set_message(format!(
                "{}% | ok {} failed {} in flight {} queued {}",
                w["percent"],
                n("completed"),
                n("failed"),
                n("pending") + n("downloading") + n("verifying") + n("installing"),
                n("queued")
            ));
        }
        head.set_message(campaign_line(&c));
        if ended(&c) {
            for b in &bars {
                b.finish();
            }
            head.finish();
            return Ok(c);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// `campaign show --follow` into a pipe or a file: one line each time the campaign changes
/// (with why it waits, when it does), until it ends; the campaign as it ended.
async fn follow_lines(client: &Client, path: &str) -> Result<Value, CliError> {
    let mut last = String::new();
    loop {
        let c = client.get(path, &[]).await?;
        let line = campaign_line(&c);
        if line != last {
            println!(
                "{} {line}",
                chrono::Local::now().format("%Y-%m-%dT%H:%M:%S%:z")
            );
            use std::io::Write;
            let _ = std::io::stdout().flush();
            last = line;
        }
        if ended(&c) {
            return Ok(c);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// One line for a campaign: where it stands and why.
fn campaign_line(c: &Value) -> String {
    let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0);
    let in_flight = n("pending") + n("downloading") + n("verifying") + n("installing");
    let mut line = format!(
        "{} {:?} -> {}: {}, {}/{} done, {} failed, {} in flight, {} queued",
        field(c, "id"),
        field(c, "name"),
        field(c, "version"),
        field(c, "status"),
        n("completed"),
        c["total"],
        n("failed"),
        in_flight,
        n("queued") + n("offline") + n("retrying"),
    );
    if let Some(eta) = c["etaSecs"].as_u64() {
        line.push_str(&format!(", eta {eta} s"));
    }
    if let Some(why) = c["statusReason"].as_str() {
        line.push_str(&format!(" ({})", sanitize(why)));
    }
    line
}

/// The exit of `--follow`: 0 for a campaign that completed with every device upgraded, 1 when
/// devices failed, 2 when it was cancelled (the brake).
fn campaign_outcome(c: &Value) -> Result<(), CliError> {
    let failed = c["counts"]["failed"].as_u64().unwrap_or(0);
    match (c["status"].as_str(), failed) {
        (Some("completed"), 0) => Ok(()),
        (Some("completed"), n) => Err(CliError::Outcome {
            code: 1,
            message: format!(
                "campaign {} completed with {n} failed devices",
                field(c, "id")
            ),
        }),
        _ => Err(CliError::Outcome {
            code: 2,
            message: format!("campaign {} was cancelled", field(c, "id")),
        }),
    }
}

/// A percentage as people write it: "25%", "12.5%".
fn percent(v: &Value) -> String {
    let p = v.as_f64().unwrap_or(0.0);
    if p.fract() == 0.0 {
        format!("{p:.0}%")
    } else {
        format!("{p}%")
    }
}

/// Bytes in words: "1.2 MB".
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// A dry run, wave by wave.
fn print_plan(plan: &Value) {
    let waves = plan["waves"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let list = w["devices"].as_array().cloned().unwrap_or_default();
            let first: Vec<String> = list.iter().take(5).map(|d| field(d, "id")).collect();
            let more = if list.len() > first.len() {
                ", ..."
            } else {
                ""
            };
            vec![
                (i + 1).to_string(),
                percent(&w["percent"]),
                list.len().to_string(),
                field(w, "deltas"),
                bytes(w["estimatedBytes"].as_u64().unwrap_or(0)),
                format!("{}{more}", first.join(", ")),
            ]
        })
        .collect();
    print_table(
        &[
            "WAVE",
            "UP TO",
            "DEVICES",
            "DELTAS",
            "BYTES",
            "FIRST DEVICES",
        ],
        &rows,
        &[1, 2, 3, 4],
    );
    println!("{} devices in all", plan["total"]);
    for c in plan["conflicts"].as_array().into_iter().flatten() {
        println!("skipped {}: {}", field(c, "deviceId"), field(c, "reason"));
    }
    for n in plan["notes"].as_array().into_iter().flatten() {
        println!("note: {}", n.as_str().map(sanitize).unwrap_or_default());
    }
}

/// Failures by error code and devices waiting for a retry.
fn print_failures(c: &Value) {
    for f in c["failures"].as_array().into_iter().flatten() {
        let devices: Vec<String> = f["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d.as_str().map(sanitize).unwrap_or_default())
            .collect();
        println!(
            "failed {} ({}): {}",
            field(f, "code"),
            f["count"],
            devices.join(", ")
        );
    }
    for r in c["retrying"].as_array().into_iter().flatten() {
        println!(
            "retrying {} after attempt {} ({}) at {}",
            field(r, "deviceId"),
            r["attempts"],
            field(r, "lastError"),
            field(r, "nextAttemptAt")
        );
    }
}

/// The states of a campaign's counts, in order, with their short column names.
const CAMPAIGN_STATES: [(&str, &str); 11] = [
    ("queued", "QUEUED"),
    ("offline", "OFFLINE"),
    ("retrying", "RETRYING"),
    ("pending", "PENDING"),
    ("downloading", "DOWNLOAD"),
    ("verifying", "VERIFY"),
    ("installing", "INSTALL"),
    ("completed", "DONE"),
    ("failed", "FAILED"),
    ("cancelled", "CANCELLED"),
    ("skipped", "SKIPPED"),
];

/// One campaign, for people: what it is, where it stands and why, its waves, its failures.
fn print_campaign(c: &Value) {
    println!(
        "{} {:?}: {} {}, {}",
        field(c, "id"),
        field(c, "name"),
        field(c, "deviceType"),
        field(c, "version"),
        field(c, "status")
    );
    if c["statusReason"].is_string() {
        println!("  {}", field(c, "statusReason"));
    }
    let eta = c["etaSecs"]
        .as_u64()
        .map(|s| format!(", eta {s} s"))
        .unwrap_or_default();
    println!(
        "  {} devices, success {}, failure {}, {} full + {} delta downloaded{eta}",
        c["total"],
        percent(&c["successRate"]),
        percent(&c["failureRate"]),
        bytes(c["bytesFull"].as_u64().unwrap_or(0)),
        bytes(c["bytesDelta"].as_u64().unwrap_or(0)),
    );
    let rows: Vec<Vec<String>> = c["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            let mut r = vec![
                field(w, "wave"),
                percent(&w["percent"]),
                field(w, "devices"),
            ];
            r.extend(
                CAMPAIGN_STATES
                    .iter()
                    .map(|(k, _)| w["counts"][*k].as_u64().unwrap_or(0).to_string()),
            );
            r
        })
        .collect();
    let mut headers = vec!["WAVE", "UP TO", "DEVICES"];
    headers.extend(CAMPAIGN_STATES.iter().map(|(_, h)| *h));
    print_table(&headers, &rows, &(1..headers.len()).collect::<Vec<_>>());
    print_failures(c);
}

async fn campaign_action(client: &Client, id: &str, action: &str) -> Result<(), CliError> {
    let path = format!("/api/ota/campaigns/{id}/{action}");
    print_campaign(&client.post(&path, &[], &json!({})).await?);
    Ok(())
}

/// `hangar delta ...`
#[derive(Debug, Subcommand)]
pub enum DeltaCmd {
    /// Make a BSDIFF40 patch turning OLD into NEW (Debian's bspatch applies it).
    Make {
        /// The old image.
        old: PathBuf,
        /// The new image.
        new: PathBuf,
        /// Where to write the patch.
        patch: PathBuf,
        /// Search threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Apply a BSDIFF40 patch to OLD, writing OUT.
    Apply {
        /// The old image.
        old: PathBuf,
        /// The patch.
        patch: PathBuf,
        /// Where to write the result.
        out: PathBuf,
    },
}

/// Runs `hangar delta ...`.
pub fn delta(cmd: DeltaCmd) -> anyhow::Result<()> {
    match cmd {
        DeltaCmd::Make {
            old,
            new,
            patch,
            threads,
        } => {
            let t = std::time::Instant::now();
            let n = crate::bsdiff::make_files(&old, &new, &patch, threads)?;
            let full = std::fs::metadata(&new)?.len().max(1);
            eprintln!(
                "{}: {n} bytes ({:.1} % of the new image) in {:.2} s",
                patch.display(),
                n as f64 * 100.0 / full as f64,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        DeltaCmd::Apply { old, patch, out } => {
            let n = crate::bsdiff::apply_files(&old, &patch, &out)?;
            eprintln!("{}: {n} bytes", out.display());
            Ok(())
        }
    }
}

/// `hangar tasks` filters.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only this status (pending, downloading, verifying, installing, completed, failed,
    /// cancelled).
    #[arg(long)]
    pub status: Option<String>,
    /// Only tasks of this campaign.
    #[arg(long)]
    pub campaign: Option<String>,
    /// Only tasks of this device.
    #[arg(long)]
    pub device: Option<String>,
    #[command(flatten)]
    pub paging: Paging,
    /// Print the API's JSON (an array) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: Api,
}

/// How much of a list to show.
#[derive(Debug, Args, Clone, Copy)]
pub struct Paging {
    /// Show at most this many (a line at the end says how many more there are).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Show all of them.
    #[arg(long, conflicts_with = "limit")]
    pub all: bool,
}

impl Paging {
    fn limit(self) -> Option<usize> {
        (!self.all).then_some(self.limit)
    }
}

/// `hangar device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// List devices.
    List {
        /// Only devices with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only devices of this type.
        #[arg(long = "type", value_name = "DEVICE_TYPE")]
        device_type: Option<String>,
        /// Only devices of this protocol (gateway or alibaba).
        #[arg(long)]
        protocol: Option<String>,
        /// Only connected (true) or disconnected (false) devices.
        #[arg(long)]
        online: Option<bool>,
        #[command(flatten)]
        paging: Paging,
        /// Print the API's JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove tags of a registered device.
    Tag {
        /// Device id.
        id: String,
        /// Tags to add, comma-separated.
        #[arg(long, value_delimiter = ',')]
        add: Vec<String>,
        /// Tags to remove, comma-separated.
        #[arg(long, value_delimiter = ',')]
        remove: Vec<String>,
    },
    /// Show one device (JSON).
    Show {
        /// Device id.
        id: String,
        /// Print JSON (what `show` always prints; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
    },
    /// Register a device.
    Add {
        /// Device id (Alibaba devices: productKey/deviceName).
        id: String,
        /// MQTT password of the device.
        #[arg(long)]
        secret: String,
        /// gateway or alibaba.
        #[arg(long, default_value = "gateway")]
        protocol: String,
        /// Device type (Alibaba: the productKey, implied).
        #[arg(long)]
        device_type: Option<String>,
        /// Tags, comma-separated.
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Register many devices from a CSV (id,deviceType,protocol,secret,tags with tags `;`-separated)
    /// or JSON file (an array of {"id","deviceType","protocol","secret","tags"}).
    Import {
        /// The file.
        file: PathBuf,
        /// Devices that exist get the file's tags (and secret, where given) instead of
        /// being refused.
        #[arg(long)]
        update: bool,
    },
    /// Remove a device.
    Delete {
        /// Device id.
        id: String,
    },
}

/// `hangar firmware ...`
#[derive(Debug, Subcommand)]
pub enum FirmwareCmd {
    /// Upload an image (streamed, with a progress bar); it starts as `draft`.
    Upload {
        /// The image file.
        file: PathBuf,
        /// Its version, e.g. 1.0.2.
        #[arg(long)]
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
        /// Release notes.
        #[arg(long, default_value = "")]
        description: String,
        /// Devices must install it.
        #[arg(long)]
        force_upgrade: bool,
        /// Its minisign signature (`FILE.minisig`, from `hangar firmware sign` or `minisign -S`).
        #[arg(long)]
        signature: Option<PathBuf>,
    },
    /// Sign an image offline (writes FILE.minisig; its trusted comment binds device type,
    /// version and sha256).
    Sign {
        /// The image file.
        file: PathBuf,
        /// Its version.
        #[arg(long)]
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
        /// The secret key (from `hangar key generate` or `minisign -G`).
        #[arg(long)]
        key: PathBuf,
        /// Read the key's password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// List firmware, newest upload first.
    List {
        /// Only this device type.
        #[arg(long)]
        device_type: Option<String>,
        /// Only this status (draft, testing, released, deprecated).
        #[arg(long)]
        status: Option<String>,
        /// Print the API's JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one firmware (JSON).
    Show {
        /// Version.
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
        /// Print JSON (what `show` always prints; accepted for scripts that pass it).
        #[arg(long)]
        json: bool,
    },
    /// Release a firmware (status -> released).
    Release {
        /// Version.
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
    },
    /// Set a firmware's status.
    Status {
        /// Version.
        version: String,
        /// draft, testing, released or deprecated.
        status: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
    },
    /// The newest released version of a device type.
    Latest {
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
    },
    /// Delete a firmware and its image.
    Delete {
        /// Version.
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
    },
}

/// `hangar config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the documented default configuration.
    Default,
    /// Validate a config file; names the key and reason on error.
    Check {
        /// The file.
        file: PathBuf,
    },
}

pub fn endpoint(g: &Global) -> Endpoint {
    Endpoint {
        config: g.config.clone(),
        url: g.url.clone(),
        token: g.token.clone(),
        ca: g.ca.clone(),
        mqtt: g.mqtt.clone(),
    }
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints rows under headers, every column as wide as its widest cell; the columns named in
/// `right` are right-aligned (numbers). The last column is not padded.
fn print_table(headers: &[&str], rows: &[Vec<String>], right: &[usize]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right.contains(&i) {
                out.extend(std::iter::repeat_n(' ', pad));
                out.push_str(c);
            } else {
                out.push_str(c);
                if i + 1 < width.len() {
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        println!("{}", out.trim_end());
    };
    line(&mut headers.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}

/// The "N more" line under a list that was cut.
fn print_more(shown: usize, total: usize, what: &str) {
    if total > shown {
        println!(
            "... {} more {what} (of {total}): use --all, or --limit N",
            total - shown
        );
    }
}

/// A string field of a JSON object, or `-`.
fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => sanitize(s),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Text from the appliance made safe for a terminal: control characters (ESC above all)
/// become `?`.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn print_firmware_table(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let sha = field(r, "sha256");
            vec![
                field(r, "deviceType"),
                field(r, "version"),
                field(r, "status"),
                field(r, "fileSize"),
                field(r, "createdAt"),
                sha.chars().take(16).collect(),
                field(r, "description"),
            ]
        })
        .collect();
    print_table(
        &[
            "DEVICE TYPE",
            "VERSION",
            "STATUS",
            "SIZE",
            "CREATED",
            "SHA256",
            "DESCRIPTION",
        ],
        &rows,
        &[3],
    );
}

fn dt(t: &str) -> Vec<(&'static str, String)> {
    vec![("deviceType", t.to_string())]
}

/// Runs an admin verb against the API.
pub async fn firmware(g: &Global, cmd: FirmwareCmd) -> Result<(), CliError> {
    if let FirmwareCmd::Sign {
        file,
        version,
        device_type,
        key,
        password_file,
    } = &cmd
    {
        // offline: no appliance needed
        signing::sign_firmware(file, version, device_type, key, password_file.as_deref())?;
        return Ok(());
    }
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        FirmwareCmd::Sign { .. } => unreachable!("handled above"),
        FirmwareCmd::Upload {
            file,
            version,
            device_type,
            description,
            force_upgrade,
            signature,
        } => {
            let mut fields = vec![
                ("version", version),
                ("deviceType", device_type),
                ("description", description),
                ("forceUpgrade", force_upgrade.to_string()),
            ];
            if let Some(sig) = signature {
                let text = std::fs::read_to_string(&sig).map_err(|source| CliError::Io {
                    context: format!("reading {}", sig.display()),
                    source,
                })?;
                // first, so the appliance checks it while the image streams
                fields.insert(0, ("signature", text));
            }
            let len = std::fs::metadata(&file)
                .map_err(|source| CliError::Io {
                    context: format!("reading {}", file.display()),
                    source,
                })?
                .len();
            let bar = indicatif::ProgressBar::new(len);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            let b = bar.clone();
            let data = client
                .upload(&file, fields, move |n| b.set_position(n))
                .await;
            bar.finish_and_clear();
            print_json(&data?);
        }
        FirmwareCmd::List {
            device_type,
            status,
            json,
        } => {
            let mut q = Vec::new();
            if let Some(t) = device_type {
                q.push(("deviceType", t));
            }
            if let Some(s) = status {
                q.push(("status", s));
            }
            let (list, total) = client.get_list("/api/ota/firmware", &q, None).await?;
            if json {
                print_json(&Value::Array(list));
                return Ok(());
            }
            print_firmware_table(&list);
            print_more(list.len(), total, "firmware");
        }
        FirmwareCmd::Show {
            version,
            device_type,
            json: _,
        } => print_json(
            &client
                .get(&format!("/api/ota/firmware/{version}"), &dt(&device_type))
                .await?,
        ),
        FirmwareCmd::Release {
            version,
            device_type,
        } => print_json(
            &client
                .post(
                    &format!("/api/ota/firmware/{version}/release"),
                    &dt(&device_type),
                    &json!({}),
                )
                .await?,
        ),
        FirmwareCmd::Status {
            version,
            status,
            device_type,
        } => print_json(
            &client
                .post(
                    &format!("/api/ota/firmware/{version}/status"),
                    &dt(&device_type),
                    &json!({ "status": status }),
                )
                .await?,
        ),
        FirmwareCmd::Latest { device_type } => print_json(
            &client
                .get("/api/ota/firmware/latest", &dt(&device_type))
                .await?,
        ),
        FirmwareCmd::Delete {
            version,
            device_type,
        } => print_json(
            &client
                .delete(&format!("/api/ota/firmware/{version}"), &dt(&device_type))
                .await?,
        ),
    }
    Ok(())
}

/// A device id as one URL path segment.
fn path_id(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

/// Parses a device import file (CSV or JSON) into registration bodies; a CSV for new devices
/// must have a `secret` column (`require_secret`), one that only updates need not.
pub fn parse_import(text: &str, require_secret: bool) -> Result<Vec<Value>, String> {
    let t = text.trim_start();
    if t.starts_with('[') {
        return serde_json::from_str(t).map_err(|e| format!("not a JSON array: {e}"));
    }
    let mut lines = t.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .ok_or("the file is empty")?
        .split(',')
        .map(|h| h.trim().to_string())
        .collect();
    if !header.iter().any(|h| h == "id")
        || (require_secret && !header.iter().any(|h| h == "secret"))
    {
        return Err(
            "the CSV header must name at least id and secret (id,deviceType,protocol,secret,tags; an --update needs only id)"
                .into(),
        );
    }
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != header.len() {
            return Err(format!(
                "line {}: {} cells, the header has {}",
                n + 2,
                cells.len(),
                header.len()
            ));
        }
        let mut obj = serde_json::Map::new();
        for (h, c) in header.iter().zip(cells) {
            match h.as_str() {
                "tags" => {
                    let tags: Vec<&str> = c
                        .split(';')
                        .map(str::trim)
                        .filter(|x| !x.is_empty())
                        .collect();
                    obj.insert("tags".into(), json!(tags));
                }
                _ if c.is_empty() => {}
                _ => {
                    obj.insert(h.clone(), json!(c));
                }
            }
        }
        out.push(Value::Object(obj));
    }
    Ok(out)
}

/// `hangar device ...`
pub async fn device(g: &Global, cmd: DeviceCmd) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        DeviceCmd::List {
            tag,
            device_type,
            protocol,
            online,
            paging,
            json,
        } => {
            let mut q = Vec::new();
            if let Some(t) = tag {
                q.push(("tag", t));
            }
            if let Some(t) = device_type {
                q.push(("deviceType", t));
            }
            if let Some(p) = protocol {
                q.push(("protocol", p));
            }
            if let Some(o) = online {
                q.push(("online", o.to_string()));
            }
            let (list, total) = client
                .get_list("/api/ota/devices", &q, paging.limit())
                .await?;
            if json {
                print_json(&Value::Array(list));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|d| {
                    let tags: Vec<String> = d["tags"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|t| t.as_str().map(sanitize))
                        .collect();
                    vec![
                        field(d, "id"),
                        field(d, "protocol"),
                        field(d, "deviceType"),
                        field(d, "firmwareVersion"),
                        if d["online"] == true { "yes" } else { "no" }.into(),
                        field(d, "lastSeen"),
                        tags.join(","),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID",
                    "PROTOCOL",
                    "TYPE",
                    "VERSION",
                    "ONLINE",
                    "LAST SEEN",
                    "TAGS",
                ],
                &rows,
                &[],
            );
            print_more(list.len(), total, "devices");
        }
        DeviceCmd::Tag { id, add, remove } => {
            if add.is_empty() && remove.is_empty() {
                return Err(CliError::Discover(
                    "nothing to change: pass --add TAGS and/or --remove TAGS".into(),
                ));
            }
            print_json(
                &client
                    .patch(
                        &format!("/api/ota/devices/{}", path_id(&id)),
                        &json!({"addTags": add, "removeTags": remove}),
                    )
                    .await?,
            );
        }
        DeviceCmd::Show { id, json: _ } => print_json(
            &client
                .get(&format!("/api/ota/devices/{}", path_id(&id)), &[])
                .await?,
        ),
        DeviceCmd::Add {
            id,
            secret,
            protocol,
            device_type,
            tags,
        } => {
            let mut body = json!({"id": id, "secret": secret, "protocol": protocol, "tags": tags});
            if let Some(t) = device_type {
                body["deviceType"] = json!(t);
            }
            print_json(&client.post("/api/ota/devices", &[], &body).await?);
        }
        DeviceCmd::Import { file, update } => {
            let text = std::fs::read_to_string(&file).map_err(|source| CliError::Io {
                context: format!("reading {}", file.display()),
                source,
            })?;
            let list = parse_import(&text, !update)
                .map_err(|e| CliError::Discover(format!("{}: {e}", file.display())))?;
            let q = if update {
                vec![("update", "true".to_string())]
            } else {
                vec![]
            };
            let r = client
                .post("/api/ota/devices/import", &q, &Value::Array(list))
                .await?;
            for line in r["results"].as_array().cloned().unwrap_or_default() {
                if line["ok"] != true {
                    eprintln!(
                        "{}: {}",
                        line["id"].as_str().unwrap_or("?"),
                        line["error"].as_str().unwrap_or("")
                    );
                }
            }
            println!("imported {}, failed {}", r["imported"], r["failed"]);
            if r["failed"].as_u64().unwrap_or(0) > 0 {
                return Err(CliError::Discover("some devices were not imported".into()));
            }
        }
        DeviceCmd::Delete { id } => print_json(
            &client
                .delete(&format!("/api/ota/devices/{}", path_id(&id)), &[])
                .await?,
        ),
    }
    Ok(())
}

/// `hangar upgrade DEVICE --version V [--force] [--allow-downgrade]`
pub async fn upgrade(
    g: &Global,
    device: &str,
    version: &str,
    force: bool,
    allow_downgrade: bool,
) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    let t = client
        .post(
            &format!("/api/ota/upgrade/{}", path_id(device)),
            &[],
            &json!({"version": version, "force": force, "allowDowngrade": allow_downgrade}),
        )
        .await?;
    print_json(&t);
    Ok(())
}

/// `hangar tasks [--status S] [--campaign C] [--device D] [--limit N | --all]`
pub async fn tasks(g: &Global, a: TasksArgs) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(&g.with(&a.api)))?;
    let mut q = Vec::new();
    if let Some(s) = a.status {
        q.push(("status", s));
    }
    if let Some(c) = a.campaign {
        q.push(("campaignId", c));
    }
    if let Some(d) = a.device {
        q.push(("deviceId", d));
    }
    let (list, total) = client
        .get_list("/api/ota/tasks", &q, a.paging.limit())
        .await?;
    if a.json {
        print_json(&Value::Array(list));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|t| {
            let error = match (&t["errorCode"], &t["errorMessage"]) {
                (Value::String(c), Value::String(m)) => format!("{c}: {m}"),
                (Value::String(c), _) => c.clone(),
                _ => String::new(),
            };
            vec![
                field(t, "id"),
                field(t, "deviceId"),
                format!("{} -> {}", field(t, "fromVersion"), field(t, "toVersion")),
                field(t, "status"),
                format!("{}%", t["progress"]),
                field(t, "campaignId"),
                field(t, "updatedAt"),
                sanitize(&error),
            ]
        })
        .collect();
    print_table(
        &[
            "TASK", "DEVICE", "VERSION", "STATUS", "PROGRESS", "CAMPAIGN", "UPDATED", "ERROR",
        ],
        &rows,
        &[0, 4],
    );
    print_more(list.len(), total, "tasks");
    Ok(())
}

/// `hangar task DEVICE [--follow|--cancel]`
pub async fn task(g: &Global, device: &str, follow: bool, cancel: bool) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    let path = format!("/api/ota/task/{}", path_id(device));
    if cancel {
        print_json(
            &client
                .post(&format!("{path}/cancel"), &[], &json!({}))
                .await?,
        );
        return Ok(());
    }
    let mut t = client.get(&path, &[]).await?;
    if !follow {
        print_json(&t);
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:40}] {pos:>3}% {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(format!(
        "{device} -> {}",
        t["toVersion"].as_str().unwrap_or("?")
    ));
    loop {
        let status = t["status"].as_str().unwrap_or("").to_string();
        bar.set_position(t["progress"].as_u64().unwrap_or(0));
        bar.set_message(status.clone());
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        t = client.get(&path, &[]).await?;
    }
    bar.finish();
    print_json(&t);
    if t["status"] != "completed" {
        return Err(CliError::Api {
            status: 200,
            code: t["errorCode"].as_str().unwrap_or("FAILED").to_string(),
            message: format!("the task ended {}", t["status"].as_str().unwrap_or("?")),
        });
    }
    Ok(())
}

/// `hangar config default|check`.
pub fn config(cmd: ConfigCmd) -> Result<(), CliError> {
    match cmd {
        ConfigCmd::Default => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        ConfigCmd::Check { file } => {
            let c = Config::from_file(&file)?;
            if !c.trust.require_signed {
                eprintln!(
                    "warning: [trust] require_signed is off: unsigned firmware can be released"
                );
            }
            println!("{}: ok", file.display());
            Ok(())
        }
    }
}
