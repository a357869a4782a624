//! The `hangar` binary: parses the command line, sets up logging, and calls the library.

use clap::Parser;
use hangar::cli::{Cli, Command};
use hangar::config::Config;
use tracing_subscriber::EnvFilter;

fn init_tracing(json: bool) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("hangar=info"));
    // colour codes only for a person at a terminal, never into journald or a log file
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// An error as one line: its causes joined by ": ", each said once (a cause whose text the
/// message already carries is not repeated). No backtrace: whatever `RUST_BACKTRACE` says, a
/// refused request or a missing file is not a crash.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Serve | Command::Sim(_) | Command::Agent
    ) {
        // A listing piped into `head` ends quietly when `head` has read enough, as `ls` does
        // (Rust ignores SIGPIPE, which makes println! panic on the closed pipe instead). The
        // long-running verbs keep ignoring it: a peer closing a socket must not kill them.
        // SAFETY: resetting a signal disposition to its default, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hangar: {}", one_line(&e));
            match e.downcast_ref::<hangar::cli::client::CliError>() {
                Some(hangar::cli::client::CliError::Outcome { code, .. }) => {
                    std::process::ExitCode::from(*code)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    hangar::server::memory::limit_arenas();
    if let Command::Delta(cmd) = cli.command {
        // offline and CPU-bound: no async runtime (keeps its memory next to Debian's bsdiff)
        return hangar::cli::delta(cmd);
    }
    if let Command::Restore {
        file,
        data_dir,
        force,
    } = &cli.command
    {
        let msg = hangar::server::backup::restore(file, data_dir, *force)
            .map_err(|e| anyhow::anyhow!("restore failed: {e}"))?;
        eprintln!("{msg}");
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            let loaded = Config::load(cli.global.config.as_deref())?;
            init_tracing(loaded.config.log.format == hangar::config::LogFormat::Json);
            match &loaded.source {
                Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
                None => tracing::info!("no config file: running on built-in defaults"),
            }
            hangar::server::app::serve(loaded.config).await?;
        }
        Command::Firmware(c) => hangar::cli::firmware(&cli.global.with(&c.api), c.cmd).await?,
        Command::Config(cmd) => hangar::cli::config(cmd)?,
        Command::Device(c) => hangar::cli::device(&cli.global.with(&c.api), c.cmd).await?,
        Command::Upgrade {
            api,
            device,
            version,
            force,
            allow_downgrade,
        } => {
            let g = cli.global.with(&api);
            hangar::cli::upgrade(&g, &device, &version, force, allow_downgrade).await?
        }
        Command::Tasks(a) => hangar::cli::tasks(&cli.global, a).await?,
        Command::Campaign(c) => hangar::cli::campaign(&cli.global.with(&c.api), c.cmd).await?,
        Command::User(c) => hangar::cli::users::user(&cli.global.with(&c.api), c.cmd).await?,
        Command::MqttUser(c) => {
            hangar::cli::users::mqtt_user(&cli.global.with(&c.api), c.cmd).await?
        }
        Command::Audit(a) => hangar::cli::users::audit(&cli.global, a).await?,
        Command::Key(cmd) => hangar::cli::signing::key(cmd)?,
        Command::Bundle(c) => hangar::cli::bundles::bundle(&cli.global.with(&c.api), c.cmd).await?,
        Command::Site(c) => hangar::cli::bundles::site(&cli.global.with(&c.api), c.cmd).await?,
        Command::Report(c) => hangar::cli::bundles::report(&cli.global.with(&c.api), c.cmd).await?,
        Command::Sim(sim) => {
            init_tracing(false);
            let mut g = cli.global.with(&sim.api);
            g.mqtt = sim.mqtt.clone();
            let args = sim.args;
            let client = hangar::cli::client::Client::connect(&hangar::cli::endpoint(&g))?;
            let appliance = hangar::device::sim::Appliance {
                http: client.http().clone(),
                base: client.base().to_string(),
                token: client.token().to_string(),
                mqtt_url: client.mqtt_url(args.tls)?.to_string(),
                ca_pem: client.ca_pem().map(<[u8]>::to_vec),
            };
            let code = hangar::device::sim::run(appliance, args).await?;
            std::process::exit(code);
        }
        Command::Agent => {
            init_tracing(false);
            let path = cli
                .global
                .config
                .clone()
                .unwrap_or_else(|| "/etc/hangar/agent.toml".into());
            let cfg = hangar::device::agent::AgentConfig::load(&path)?;
            hangar::device::agent::Agent::new(cfg)?.run().await?;
        }
        Command::Delta(_) | Command::Restore { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Backup { api, out } => hangar::cli::backup(&cli.global.with(&api), &out).await?,
        Command::Task {
            api,
            device,
            follow,
            cancel,
            json: _,
        } => hangar::cli::task(&cli.global.with(&api), &device, follow, cancel).await?,
    }
    Ok(())
}
