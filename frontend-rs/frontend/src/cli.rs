//! The command line `RustFrontendProcessManager` (shoal/runtime/frontend.py) runs:
//! `shoal-frontend frontend --listen-fd N --input-address A --output-address B
//! --engine-start-index S --engine-count C --data-parallel-size D
//! [--coordinator-address X] --args-json JSON`.
//! A bad command line is one line on stderr naming the flag, exit status 2.

use clap::{Args, Parser, Subcommand};

/// Default tokio worker threads (--worker-threads, SHOAL_FRONTEND_WORKER_THREADS). One: the
/// streaming path is bound by per-chunk socket writes, and a second worker mostly adds
/// cross-thread wake-ups and work stealing (more CPU per streamed token, not less).
pub const DEFAULT_WORKER_THREADS: usize = 1;

#[derive(Debug, Parser)]
#[command(name = "shoal-frontend", version, about = "shoal's native OpenAI frontend")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI API on an inherited listening socket, in front of the engines.
    Frontend(FrontendArgs),
}

#[derive(Debug, Args, Clone)]
pub struct FrontendArgs {
    /// The listening TCP socket's file descriptor (inherited).
    #[arg(long, value_name = "FD")]
    pub listen_fd: i32,
    /// ZMQ address to bind the ROUTER on (engines' DEALERs connect).
    #[arg(long, value_name = "ADDRESS")]
    pub input_address: String,
    /// ZMQ address to bind the PULL on (engines' outputs arrive).
    #[arg(long, value_name = "ADDRESS")]
    pub output_address: String,
    /// First engine index this frontend serves.
    #[arg(long, value_name = "N")]
    pub engine_start_index: usize,
    /// How many engines this frontend serves.
    #[arg(long, value_name = "N")]
    pub engine_count: usize,
    /// Engines in the whole deployment.
    #[arg(long, value_name = "N")]
    pub data_parallel_size: usize,
    /// The DP coordinator's stats address (M > 1).
    #[arg(long, value_name = "ADDRESS")]
    pub coordinator_address: Option<String>,
    /// The shared runtime arguments (shoal.runtime.frontend.frontend_args_json).
    #[arg(long, value_name = "JSON")]
    pub args_json: String,
    /// Tokio worker threads (default: $SHOAL_FRONTEND_WORKER_THREADS or 1).
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
}

/// Parse `argv`; `Err((message, status))`: print `message` and exit with `status`
/// (0 for --help / --version, 2 for a bad command line; the message is one line then).
pub fn parse<I, T>(argv: I) -> Result<FrontendArgs, (String, i32)>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(argv).map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => (e.to_string(), 0),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => (
                "shoal-frontend: a subcommand is required: frontend (see --help)".to_string(),
                2,
            ),
            _ => (one_line(&e.to_string()), 2),
        }
    })?;
    let Command::Frontend(args) = cli.command;
    if args.worker_threads == Some(0) {
        return Err(("shoal-frontend: --worker-threads: must be at least 1".to_string(), 2));
    }
    if args.listen_fd < 0 {
        return Err((format!("shoal-frontend: --listen-fd: must be >= 0, got {}", args.listen_fd), 2));
    }
    if args.engine_count == 0 {
        return Err(("shoal-frontend: --engine-count: must be at least 1".to_string(), 2));
    }
    if args.data_parallel_size == 0 {
        return Err(("shoal-frontend: --data-parallel-size: must be at least 1".to_string(), 2));
    }
    if args.engine_start_index + args.engine_count > args.data_parallel_size {
        return Err((
            format!(
                "shoal-frontend: --engine-start-index {} + --engine-count {} exceeds --data-parallel-size {}",
                args.engine_start_index, args.engine_count, args.data_parallel_size
            ),
            2,
        ));
    }
    Ok(args)
}

/// clap's message up to its usage block, on one line, prefixed with the program name.
fn one_line(message: &str) -> String {
    let text: Vec<&str> = message
        .lines()
        .take_while(|line| !line.trim().is_empty() && !line.starts_with("Usage:"))
        .map(str::trim)
        .collect();
    let text = text.join(" ");
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    format!("shoal-frontend: {text}")
}

impl FrontendArgs {
    /// --worker-threads, else SHOAL_FRONTEND_WORKER_THREADS, else 1; `Err` for a bad
    /// environment value.
    pub fn worker_threads(&self) -> Result<usize, String> {
        if let Some(n) = self.worker_threads {
            return Ok(n);
        }
        match std::env::var("SHOAL_FRONTEND_WORKER_THREADS") {
            Ok(text) if !text.trim().is_empty() => match text.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("SHOAL_FRONTEND_WORKER_THREADS: must be an integer >= 1, got {text:?}")),
            },
            _ => Ok(DEFAULT_WORKER_THREADS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<&'static str> {
        vec![
            "shoal-frontend", "frontend", "--listen-fd", "3", "--input-address", "ipc:///tmp/a",
            "--output-address", "ipc:///tmp/b", "--engine-start-index", "0", "--engine-count", "2",
            "--data-parallel-size", "2", "--args-json", "{}",
        ]
    }

    #[test]
    fn parses_the_managers_command_line() {
        let mut argv = base();
        argv.extend(["--coordinator-address", "ipc:///tmp/c"]);
        let args = parse(argv).unwrap();
        assert_eq!(args.listen_fd, 3);
        assert_eq!(args.engine_count, 2);
        assert_eq!(args.coordinator_address.as_deref(), Some("ipc:///tmp/c"));
        assert_eq!(args.args_json, "{}");
    }

    #[test]
    fn bad_flags_are_one_line_naming_the_flag() {
        let mut argv = base();
        argv.push("--bogus");
        let (message, status) = parse(argv).unwrap_err();
        assert_eq!(status, 2);
        assert!(message.contains("--bogus"), "{message}");
        assert!(!message.contains('\n'), "{message}");

        let mut argv = base();
        argv[3] = "three";
        let (message, status) = parse(argv).unwrap_err();
        assert_eq!(status, 2);
        assert!(message.contains("--listen-fd"), "{message}");

        let argv: Vec<&str> = base().into_iter().filter(|a| *a != "--args-json" && *a != "{}").collect();
        let (message, status) = parse(argv).unwrap_err();
        assert_eq!(status, 2);
        assert!(message.contains("--args-json"), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn engine_range_is_checked() {
        let mut argv = base();
        argv[9] = "1";
        let (message, status) = parse(argv).unwrap_err();
        assert_eq!(status, 2);
        assert!(message.contains("--engine-start-index"), "{message}");
    }
}
