//! The `wasmq` binary: parse flags, set up logging and the runtime, hand
//! over to [`wasmq::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wasmq::cli::Cli::parse();
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASMQ_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,wasmq::launcher=info,wasmq::worker::presence=info,wasmq::worker::exporter=info",
        )
    });
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        wasmq::cli::LogFormat::Json => logs.json().init(),
        // Colour codes only where a person reads them, not in a log file.
        wasmq::cli::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(wasmq::cli::main(cli))
}
