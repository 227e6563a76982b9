use std::io::IsTerminal as _;

use overlay_agent::{
    cli::{Cli, Command},
    daemon, docker_opts, teardown,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_args();
    match &cli.command {
        Some(Command::Teardown(args)) => return teardown::main(&cli.bpffs, args),
        Some(Command::Status(args)) => return overlay_agent::status::show::main(&cli.bpffs, args),
        Some(Command::DockerOpts(args)) => return docker_opts::main(args, &cli.subnet_file),
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(cli.log_level())),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", overlay_agent::control::etcd::error_chain(&e));
            std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
