//! The `wasmq` binary: parse flags, set up the runtime, logs and traces,
//! hand over to [`wasmq::cli`], and flush traces before exit.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wasmq::cli::Cli::parse();
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
    use std::io::IsTerminal;
    let telemetry = wasmq::telemetry::init(
        cli.log_format == wasmq::cli::LogFormat::Json,
        // Colour codes only where a person reads them, not in a log file.
        std::io::stderr().is_terminal(),
        runtime.handle().clone(),
    );
    let code = runtime.block_on(wasmq::cli::main(cli));
    telemetry.shutdown();
    code
}
