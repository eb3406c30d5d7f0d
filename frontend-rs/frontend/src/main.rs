//! `shoal-frontend`: shoal's native OpenAI frontend, run by `RustFrontendProcessManager`
//! (shoal/runtime/frontend.py) in place of the Python API servers (issue #20).
//!
//! Start-up: parse the command line (cli.rs; a bad one exits 2), install logging, arm
//! parent-death detection, build the tokio runtime, bind the engine link (engine.rs), wait
//! for every engine's EngineReady (`engine_ready_timeout_secs`; exit 1 naming the missing
//! ones), then serve HTTP on the inherited listening socket (http.rs) until SIGTERM / SIGINT
//! (lifecycle.rs): drain for `shutdown_timeout` seconds, fail what is left, exit 0.
//! Fatal errors are logged and exit 1.

#[macro_use]
mod logging;

mod chat;
mod cli;
mod engine;
mod errors;
mod generate;
mod http;
mod json;
mod lifecycle;
mod metrics;
mod openai;
mod state;

use std::os::unix::io::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use engine::{EngineLink, LinkConfig};
use metrics::Metrics;

/// The process role in log lines (FRONTEND_PROCESS_NAME of shoal/runtime/frontend.py).
const ROLE: &str = "RustFrontend";
const DEFAULT_READY_TIMEOUT_S: f64 = 600.0;
const DEFAULT_SHUTDOWN_TIMEOUT_S: f64 = 5.0;
/// After the drain deadline: how long failed requests get to send their error (a stream's
/// final event; server.py's _FINAL_EVENTS_S). Part of the backstop behind http::serve.
const FINAL_EVENTS: Duration = Duration::from_millis(500);

fn main() {
    let args = match cli::parse(std::env::args_os()) {
        Ok(args) => args,
        Err((message, status)) => {
            if status == 0 {
                print!("{message}");
            } else {
                eprintln!("{message}");
            }
            std::process::exit(status);
        }
    };
    logging::init(ROLE);
    if let Err(e) = lifecycle::arm_parent_death() {
        log_error!("{e}: exiting");
        std::process::exit(1);
    }
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(args.listen_fd, libc::F_GETFD) } < 0 {
        eprintln!("shoal-frontend: --listen-fd {}: not an open file descriptor", args.listen_fd);
        std::process::exit(2);
    }
    let settings = match Settings::from_json(&args.args_json) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("shoal-frontend: --args-json: {e}");
            std::process::exit(2);
        }
    };
    let threads = match args.worker_threads() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("shoal-frontend: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("frontend-worker")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            log_error!("could not start the tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let status = runtime.block_on(run(args, settings));
    // Tasks still running (idle keep-alive connections) are dropped, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(status);
}

/// What this binary reads from --args-json itself (the HTTP layer parses the rest).
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    ready_timeout: Duration,
    shutdown_timeout: Duration,
    served_model_name: Option<String>,
    model: Option<String>,
    restart_dead_engines: bool,
}

impl Settings {
    /// `engine_ready_timeout` (--engine-ready-timeout) else `engine_ready_timeout_secs`
    /// (the environment's default the manager adds) else 600 s; `shutdown_timeout` else 5 s.
    fn from_json(text: &str) -> Result<Settings, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let object = value.as_object().ok_or("must be a JSON object")?;
        let seconds = |key: &str| -> Result<Option<f64>, String> {
            match object.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_f64() {
                    Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(s)),
                    _ => Err(format!("{key}: must be a non-negative number of seconds, got {v}")),
                },
            }
        };
        let ready = seconds("engine_ready_timeout")?
            .or(seconds("engine_ready_timeout_secs")?)
            .unwrap_or(DEFAULT_READY_TIMEOUT_S);
        let shutdown = seconds("shutdown_timeout")?.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_S);
        let text_of = |key: &str| match object.get(key) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(serde_json::Value::Array(items)) => items.first().and_then(|v| v.as_str()).map(str::to_string),
            _ => None,
        };
        Ok(Settings {
            ready_timeout: Duration::from_secs_f64(ready),
            shutdown_timeout: Duration::from_secs_f64(shutdown),
            served_model_name: text_of("served_model_name"),
            model: text_of("model"),
            restart_dead_engines: object.get("restart_dead_engines").and_then(|v| v.as_bool()).unwrap_or(false),
        })
    }

    /// server._served_model_name: --served-model-name, else the engines' model name, else
    /// the model argument's last path component (without .gguf).
    fn model_name(&self, link: &EngineLink) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        if let Some(name) = link.engines().first().map(|e| e.model_name.clone()).filter(|n| !n.is_empty()) {
            return name;
        }
        let model = self.model.clone().unwrap_or_default();
        let base = model.trim_end_matches('/').rsplit('/').next().unwrap_or("").to_string();
        base.strip_suffix(".gguf").map(str::to_string).unwrap_or(base)
    }
}

/// Start-up, serving and shutdown; returns the exit status.
async fn run(args: cli::FrontendArgs, settings: Settings) -> i32 {
    let frontend_args = match state::FrontendArgs::from_json(&args.args_json) {
        Ok(frontend_args) => frontend_args,
        Err(e) => {
            log_error!("--args-json: {e}");
            return 2;
        }
    };
    if settings.restart_dead_engines {
        log_warn!(
            "--restart-dead-engines is not supported by the native frontend yet: an engine's \
             death stops serving (its requests fail with 503)"
        );
    }
    let lifecycle = match lifecycle::Lifecycle::install() {
        Ok(lifecycle) => lifecycle,
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    let link = match EngineLink::start(LinkConfig {
        input_address: args.input_address.clone(),
        output_address: args.output_address.clone(),
        coordinator_address: args.coordinator_address.clone(),
        engine_start_index: args.engine_start_index,
        engine_count: args.engine_count,
        data_parallel_size: args.data_parallel_size,
    }) {
        Ok(link) => link,
        Err(e) => {
            log_error!("cannot start the engine link: {e}");
            return 1;
        }
    };
    for address in [&args.input_address, &args.output_address] {
        if let Some(path) = address.strip_prefix("ipc://") {
            lifecycle::remove_at_exit(path);
        }
    }
    let status = serve(&args, &settings, frontend_args, &lifecycle, &link).await;
    link.shutdown();
    log_info!("shut down");
    status
}

async fn serve(
    args: &cli::FrontendArgs,
    settings: &Settings,
    frontend_args: state::FrontendArgs,
    lifecycle: &lifecycle::Lifecycle,
    link: &Arc<EngineLink>,
) -> i32 {
    tokio::select! {
        ready = link.wait_ready(settings.ready_timeout) => {
            if let Err(e) = ready {
                log_error!("{e}");
                return 1;
            }
        }
        _ = lifecycle.draining() => {
            log_info!("shutdown requested during start-up");
            return 0;
        }
    }
    let model_name = settings.model_name(link);
    let labels = (args.engine_start_index..args.engine_start_index + args.engine_count).collect();
    let metrics = Arc::new(Metrics::new(&model_name, labels));
    link.set_metrics(metrics.clone());
    let app = match state::AppState::new(frontend_args, link.clone(), metrics) {
        Ok(app) => app,
        Err(e) => {
            log_error!("{e}");
            return 1;
        }
    };
    // SAFETY: the manager passed this fd to us (pass_fds) and nothing else in this process
    // owns it; checked open in main().
    let listener = unsafe { std::net::TcpListener::from_raw_fd(args.listen_fd) };
    if let Err(e) = listener.set_nonblocking(true) {
        log_error!("--listen-fd {}: {e}", args.listen_fd);
        return 1;
    }
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".to_string());
    log_info!("serving {model_name} at http://{address}");
    // http::serve drains by itself on the signal (stop accepting, --shutdown-timeout for open
    // requests, then EngineLink::fail_all and a short window for final events).
    let server = http::serve(listener, Arc::new(app), lifecycle.subscribe());
    tokio::pin!(server);
    let ended = tokio::select! {
        ended = &mut server => ended,
        _ = lifecycle.draining() => {
            // A backstop behind the HTTP layer's own deadline.
            let backstop = settings.shutdown_timeout + FINAL_EVENTS + Duration::from_secs(1);
            match tokio::time::timeout(backstop, &mut server).await {
                Ok(ended) => ended,
                Err(_) => {
                    log_warn!("the HTTP server did not stop within {} s of the signal", backstop.as_secs_f64());
                    return 0;
                }
            }
        }
    };
    match ended {
        Ok(()) if lifecycle.is_draining() => 0,
        Ok(()) => {
            log_error!("the HTTP server stopped unexpectedly");
            1
        }
        Err(e) => {
            log_error!("{e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_args_json() {
        let s = Settings::from_json(r#"{"engine_ready_timeout_secs": 30, "shutdown_timeout": 2.5, "model": "/m/tiny.gguf"}"#)
            .unwrap();
        assert_eq!(s.ready_timeout, Duration::from_secs(30));
        assert_eq!(s.shutdown_timeout, Duration::from_millis(2500));
        assert_eq!(s.model.as_deref(), Some("/m/tiny.gguf"));
        let s = Settings::from_json(r#"{"engine_ready_timeout": 7, "engine_ready_timeout_secs": 30}"#).unwrap();
        assert_eq!(s.ready_timeout, Duration::from_secs(7));
        assert_eq!(s.shutdown_timeout, Duration::from_secs(5));
        assert!(Settings::from_json(r#"{"shutdown_timeout": -1}"#).unwrap_err().contains("shutdown_timeout"));
        assert!(Settings::from_json("[1]").is_err());
    }
}
