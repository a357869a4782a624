//! The `hangar` binary: parses the command line, sets up logging, and calls the library.

use clap::Parser;
use hangar::cli::{Cli, Command};
use hangar::config::Config;
use tracing_subscriber::EnvFilter;

fn init_tracing(json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("hangar=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
        let msg = hangar::backup::restore(file, data_dir, *force)
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
            init_tracing(loaded.config.log.format == "json");
            match &loaded.source {
                Some(p) => tracing::info!(config = %p.display(), "configuration loaded"),
                None => tracing::info!("no config file: running on built-in defaults"),
            }
            hangar::app::serve(loaded.config).await?;
        }
        Command::Firmware(cmd) => hangar::cli::firmware(&cli.global, cmd).await?,
        Command::Config(cmd) => hangar::cli::config(cmd)?,
        Command::Device(cmd) => hangar::cli::device(&cli.global, cmd).await?,
        Command::Upgrade {
            device,
            version,
            force,
        } => hangar::cli::upgrade(&cli.global, &device, &version, force).await?,
        Command::Campaign(cmd) => hangar::cli::campaign(&cli.global, cmd).await?,
        Command::Sim(args) => {
            init_tracing(false);
            let client = hangar::client::Client::connect(&hangar::cli::endpoint(&cli.global))?;
            let code = hangar::sim::run(client, args).await?;
            std::process::exit(code);
        }
        Command::Agent => {
            init_tracing(false);
            let path = cli
                .global
                .config
                .clone()
                .unwrap_or_else(|| "/etc/hangar/agent.toml".into());
            let cfg = hangar::agent::AgentConfig::load(&path)?;
            hangar::agent::Agent::new(cfg)?.run().await?;
        }
        Command::Delta(_) | Command::Restore { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Backup { out } => hangar::cli::backup(&cli.global, &out).await?,
        Command::Task {
            device,
            follow,
            cancel,
        } => hangar::cli::task(&cli.global, &device, follow, cancel).await?,
    }
    Ok(())
}
