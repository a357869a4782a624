//! Command line (clap derive): `serve`, the admin verbs that talk to the API, and `config`.
//! Admin verbs print the API's `data` as JSON (lists as a table) and fail with the API's message.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::client::{CliError, Client, Endpoint};
use crate::config::{Config, DEFAULT_TOML};

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
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Config file; default /etc/hangar/hangar.toml if present, else built-in defaults.
    #[arg(long, global = true, env = "HANGAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL (admin verbs); default from the config's ports.json.
    #[arg(long, global = true, env = "HANGAR_URL")]
    pub url: Option<String>,
    /// Admin token (admin verbs); default from the config's data dir.
    #[arg(long, global = true, env = "HANGAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to trust (admin verbs); default the generated <data_dir>/certs/ca.pem.
    #[arg(long, global = true, env = "HANGAR_CA")]
    pub ca: Option<PathBuf>,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the appliance (HTTPS API + downloads).
    Serve,
    /// Manage firmware images.
    #[command(subcommand)]
    Firmware(FirmwareCmd),
    /// Print or check configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
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
    },
    /// List firmware, newest upload first.
    List {
        /// Only this device type.
        #[arg(long)]
        device_type: Option<String>,
        /// Only this status (draft, testing, released, deprecated).
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one firmware.
    Show {
        /// Version.
        version: String,
        /// Device type.
        #[arg(long, default_value = "gateway")]
        device_type: String,
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

fn endpoint(g: &Global) -> Endpoint {
    Endpoint {
        config: g.config.clone(),
        url: g.url.clone(),
        token: g.token.clone(),
        ca: g.ca.clone(),
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_firmware_table(list: &Value) {
    let rows = list.as_array().cloned().unwrap_or_default();
    println!(
        "{:<16} {:<20} {:<11} {:>12}  {:<24}  SHA256",
        "DEVICE TYPE", "VERSION", "STATUS", "SIZE", "CREATED"
    );
    for r in rows {
        println!(
            "{:<16} {:<20} {:<11} {:>12}  {:<24}  {}",
            r["deviceType"].as_str().unwrap_or(""),
            r["version"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["fileSize"].as_u64().unwrap_or(0),
            r["createdAt"].as_str().unwrap_or(""),
            &r["sha256"].as_str().unwrap_or("")[..16.min(r["sha256"].as_str().unwrap_or("").len())],
        );
    }
}

fn dt(t: &str) -> Vec<(&'static str, String)> {
    vec![("deviceType", t.to_string())]
}

/// Runs an admin verb against the API.
pub async fn firmware(g: &Global, cmd: FirmwareCmd) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        FirmwareCmd::Upload {
            file,
            version,
            device_type,
            description,
            force_upgrade,
        } => {
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
                .upload(
                    &file,
                    vec![
                        ("version", version),
                        ("deviceType", device_type),
                        ("description", description),
                        ("forceUpgrade", force_upgrade.to_string()),
                    ],
                    move |n| b.set_position(n),
                )
                .await;
            bar.finish_and_clear();
            print_json(&data?);
        }
        FirmwareCmd::List {
            device_type,
            status,
        } => {
            let mut q = Vec::new();
            if let Some(t) = device_type {
                q.push(("deviceType", t));
            }
            if let Some(s) = status {
                q.push(("status", s));
            }
            print_firmware_table(&client.get("/api/ota/firmware", &q).await?);
        }
        FirmwareCmd::Show {
            version,
            device_type,
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

/// `hangar config default|check`.
pub fn config(cmd: ConfigCmd) -> Result<(), CliError> {
    match cmd {
        ConfigCmd::Default => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        ConfigCmd::Check { file } => {
            Config::from_file(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
    }
}
