use anyhow::Context as _;
use clap::Parser;

/// Flannel-compatible overlay network agent whose dataplane runs in eBPF.
#[derive(Debug, Parser)]
#[command(name = "overlay-agent", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let dataplane = overlay_agent::dataplane::ebpf::EbpfDataplane::load()
        .context("the eBPF dataplane cannot run on this host")?;
    drop(dataplane);
    tracing::info!("eBPF object loads; the control plane arrives with the next release");
    Ok(())
}
