//! What every route shares: the `--args-json` settings the HTTP layer uses, the tokenizer,
//! the compiled chat template, the engine link, metrics, admission control and the drain
//! deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;
use shoal_template::ChatTemplate;
use shoal_tokenizer::Tokenizer;
use tokio::sync::watch;

use crate::engine::EngineLink;
use crate::errors::ApiError;
use crate::metrics::Metrics;

/// Default request body limit (shoal/api/asgi.py `MAX_BODY_BYTES`).
pub const MAX_BODY_BYTES: u64 = 4 << 20;
/// Seconds a refused client is told to wait (shoal/api/admission.py `RETRY_AFTER_S`).
pub const RETRY_AFTER_S: u32 = 1;

/// The HTTP layer's part of `--args-json` (shoal/runtime/frontend.py `frontend_args_json`:
/// the `shoal serve` namespace; unknown keys are ignored).
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendArgs {
    /// `--model` as given (a directory or a .gguf file).
    pub model: Option<String>,
    /// The resolved model file or directory (the launcher adds it).
    pub model_path: Option<String>,
    pub tokenizer: Option<String>,
    /// The resolved tokenizer file or directory (the launcher adds it).
    pub tokenizer_path: Option<String>,
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    pub max_request_body_bytes: u64,
    pub max_num_queued_requests: Option<u64>,
    pub shutdown_timeout_s: f64,
    /// `--chat-template`: a file or the template itself.
    pub chat_template: Option<String>,
    pub stream_interval: usize,
    /// shoal's version (GET /version); the launcher sends it.
    pub version: Option<String>,
    /// Seconds a client may take to send a request's headers (SHOAL_HTTP_TIMEOUT_KEEP_ALIVE_S).
    pub http_timeout_keep_alive_s: f64,
    /// CORS: --allowed-origins / --allowed-methods / --allowed-headers ("*": any) and
    /// --allow-credentials.
    pub allowed_origins: Vec<String>,
    pub allowed_methods: Vec<String>,
    pub allowed_headers: Vec<String>,
    pub allow_credentials: bool,
    /// --enable-access-log: one INFO line per request.
    pub access_log: bool,
}

impl Default for FrontendArgs {
    fn default() -> Self {
        FrontendArgs {
            model: None,
            model_path: None,
            tokenizer: None,
            tokenizer_path: None,
            served_model_name: None,
            api_key: None,
            max_request_body_bytes: MAX_BODY_BYTES,
            max_num_queued_requests: None,
            shutdown_timeout_s: 5.0,
            chat_template: None,
            stream_interval: 1,
            version: None,
            http_timeout_keep_alive_s: 5.0,
            allowed_origins: vec!["*".into()],
            allowed_methods: vec!["*".into()],
            allowed_headers: vec!["*".into()],
            allow_credentials: false,
            access_log: false,
        }
    }
}

impl FrontendArgs {
    /// Parse the `--args-json` object; `Err` names the key of a wrongly typed value.
    pub fn from_json(text: &str) -> Result<FrontendArgs, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("--args-json: not valid JSON: {e}"))?;
        let map = match value {
            Value::Object(m) => m,
            _ => return Err("--args-json: expected a JSON object".into()),
        };
        let string = |key: &str| -> Result<Option<String>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // vLLM's --served-model-name may be a list: the first name is the one served.
                Some(Value::Array(a)) if key == "served_model_name" => {
                    Ok(a.first().and_then(Value::as_str).map(str::to_string))
                }
                Some(v) => Err(format!("--args-json: {key}: expected a string, got {v}")),
            }
        };
        let uint = |key: &str| -> Result<Option<u64>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    format!("--args-json: {key}: expected a non-negative integer, got {v}")
                }),
            }
        };
        let float = |key: &str| -> Result<Option<f64>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("--args-json: {key}: expected a number, got {v}")),
            }
        };
        let list = |key: &str| -> Result<Option<Vec<String>>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .map(Some)
                    .ok_or_else(|| format!("--args-json: {key}: expected a list of strings")),
                Some(v) => Err(format!(
                    "--args-json: {key}: expected a list of strings, got {v}"
                )),
            }
        };
        let d = FrontendArgs::default();
        let args = FrontendArgs {
            model: string("model")?,
            model_path: string("model_path")?,
            tokenizer: string("tokenizer")?,
            tokenizer_path: string("tokenizer_path")?,
            served_model_name: string("served_model_name")?,
            api_key: string("api_key")?.filter(|k| !k.is_empty()),
            max_request_body_bytes: uint("max_request_body_bytes")?
                .unwrap_or(d.max_request_body_bytes),
            max_num_queued_requests: uint("max_num_queued_requests")?,
            // ServerConfig's name, or the seed namespace's.
            shutdown_timeout_s: match float("shutdown_timeout")? {
                Some(t) => t,
                None => float("shutdown_timeout_s")?.unwrap_or(d.shutdown_timeout_s),
            },
            chat_template: string("chat_template")?,
            stream_interval: uint("stream_interval")?.unwrap_or(1).max(1) as usize,
            version: string("version")?,
            http_timeout_keep_alive_s: float("http_timeout_keep_alive")?
                .unwrap_or(d.http_timeout_keep_alive_s),
            allowed_origins: list("allowed_origins")?.unwrap_or(d.allowed_origins),
            allowed_methods: list("allowed_methods")?.unwrap_or(d.allowed_methods),
            allowed_headers: list("allowed_headers")?.unwrap_or(d.allowed_headers),
            access_log: map
                .get("access_log")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            allow_credentials: match map.get("allow_credentials") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(format!(
                        "--args-json: allow_credentials: expected a boolean, got {v}"
                    ))
                }
            },
        };
        if args.max_request_body_bytes == 0 {
            return Err("--max-request-body-bytes: must be at least 1, got 0".into());
        }
        if args.max_num_queued_requests == Some(0) {
            return Err("--max-num-queued-requests: must be at least 1, got 0".into());
        }
        if !(args.shutdown_timeout_s >= 0.0 && args.shutdown_timeout_s < 1e9) {
            return Err(format!(
                "--shutdown-timeout: must be non-negative, got {}",
                args.shutdown_timeout_s
            ));
        }
        if !(args.http_timeout_keep_alive_s > 0.0 && args.http_timeout_keep_alive_s < 1e9) {
            return Err(format!(
                "http_timeout_keep_alive: must be a positive number of seconds, got {}",
                args.http_timeout_keep_alive_s
            ));
        }
        Ok(args)
    }

    /// Where the tokenizer is read: the resolved tokenizer, --tokenizer, the resolved
    /// model, else --model.
    fn tokenizer_path(&self) -> Result<PathBuf, String> {
        let path = self
            .tokenizer_path
            .as_ref()
            .or(self.tokenizer.as_ref())
            .or(self.model_path.as_ref())
            .or(self.model.as_ref())
            .ok_or("--args-json: no model_path, tokenizer or model to load the tokenizer from")?;
        Ok(PathBuf::from(path))
    }

    /// `--chat-template`'s text: a file's contents (the namespace's flag value), else the
    /// value itself (ServerConfig carries the text `load_chat_template` read).
    fn chat_template_text(&self) -> Result<Option<String>, String> {
        let value = match &self.chat_template {
            None => return Ok(None),
            Some(v) => v,
        };
        if Path::new(value).is_file() {
            return std::fs::read_to_string(value)
                .map(Some)
                .map_err(|e| format!("--chat-template: cannot read {value:?}: {e}"));
        }
        Ok(Some(value.clone()))
    }

    /// The name clients give as `model` when neither --served-model-name nor the engines
    /// name it (`resolve_model(...).name`): a .gguf file's stem, or the directory as given.
    fn default_model_name(&self) -> String {
        let model = self
            .model
            .as_deref()
            .or(self.model_path.as_deref())
            .unwrap_or("model");
        let trimmed = model.trim_end_matches('/');
        if trimmed.ends_with(".gguf") && Path::new(model).is_file() {
            let base = Path::new(trimmed)
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or(trimmed);
            return base[..base.len() - ".gguf".len()].to_string();
        }
        trimmed.to_string()
    }
}

/// Generation requests admitted and not finished (`--max-num-queued-requests`): one
/// process serves the whole run, so the count is in memory.
pub struct Admission {
    limit: Option<u64>,
    in_flight: AtomicU64,
    rejected: AtomicU64,
    closed: AtomicBool,
}

impl Admission {
    fn new(limit: Option<u64>) -> Admission {
        Admission {
            limit,
            in_flight: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Refuse new requests (the server is shutting down).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }

    fn refusal(&self) -> ApiError {
        let message = if self.closed.load(Ordering::Relaxed) {
            format!("the server is shutting down; retry after {RETRY_AFTER_S} s")
        } else {
            format!(
                "the server is at its limit of {} queued requests (--max-num-queued-requests); retry after {RETRY_AFTER_S} s",
                self.limit.unwrap_or(0)
            )
        };
        ApiError::new(503, message).with_retry_after(RETRY_AFTER_S)
    }
}

/// An admitted request's place; dropping it frees the place.
pub struct AdmissionGuard(Arc<AppState>);

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        self.0.admission.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct AppState {
    pub args: FrontendArgs,
    pub link: Arc<EngineLink>,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Tokenizer,
    /// --chat-template, else the tokenizer's; None: the model has none.
    pub chat_template: Option<ChatTemplate>,
    /// Whether that template reads `tool_calls` (else they are written into the content).
    pub chat_template_reads_tool_calls: bool,
    pub model_name: String,
    /// The model's root shown in /v1/models (`tokenizer.name_or_path`).
    pub model_root: String,
    pub admission: Admission,
    /// Set to true when the drain deadline passed: open requests end with a 503.
    deadline: watch::Sender<bool>,
    /// The same, as a flag a stream reads per poll without a lock.
    deadline_passed: AtomicBool,
}

impl AppState {
    /// Load the tokenizer and compile the chat template; `Err` is a start-up error (an
    /// unsupported template included: better no server than wrong prompts).
    pub fn new(
        args: FrontendArgs,
        link: Arc<EngineLink>,
        metrics: Arc<Metrics>,
    ) -> Result<AppState, String> {
        let path = args.tokenizer_path()?;
        let tokenizer = Tokenizer::from_path(&path)
            .map_err(|e| format!("cannot load the tokenizer from {}: {e}", path.display()))?;
        let source = match args.chat_template_text()? {
            Some(text) => Some(text),
            None => tokenizer.chat_template().map(str::to_string),
        };
        let chat_template_reads_tool_calls =
            source.as_deref().is_some_and(|s| s.contains("tool_calls"));
        let chat_template = match source {
            None => None,
            Some(text) => Some(ChatTemplate::compile(&text).map_err(|e| {
                format!("the chat template is not supported by the native frontend: {e} (use --frontend python)")
            })?),
        };
        // server.py `_served_model_name` (main.rs names /metrics' label the same way).
        let model_name = match &args.served_model_name {
            Some(name) => name.clone(),
            None => link
                .engines()
                .first()
                .map(|e| e.model_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| args.default_model_name()),
        };
        let model_root = path.to_string_lossy().into_owned();
        let admission = Admission::new(args.max_num_queued_requests);
        let (deadline, _) = watch::channel(false);
        Ok(AppState {
            args,
            link,
            metrics,
            tokenizer,
            chat_template,
            chat_template_reads_tool_calls,
            model_name,
            model_root,
            admission,
            deadline,
            deadline_passed: AtomicBool::new(false),
        })
    }

    /// Take an admission place for a generation request, or the 503 refusing it.
    pub fn admit(self: &Arc<Self>) -> Result<AdmissionGuard, ApiError> {
        let a = &self.admission;
        if a.closed.load(Ordering::Relaxed) {
            return Err(a.refusal());
        }
        let admitted = match a.limit {
            None => {
                a.in_flight.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(limit) => a
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        };
        if !admitted {
            a.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(a.refusal());
        }
        Ok(AdmissionGuard(Arc::clone(self)))
    }

    /// Resolves once the drain deadline passed (never before a shutdown).
    pub fn drain_deadline(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.deadline.subscribe();
        async move {
            loop {
                if *rx.borrow_and_update() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Fail every open request with the shutdown error (the drain deadline passed).
    pub fn pass_drain_deadline(&self) {
        self.deadline_passed.store(true, Ordering::Release);
        self.deadline.send_replace(true);
    }

    pub fn deadline_passed(&self) -> bool {
        self.deadline_passed.load(Ordering::Acquire)
    }

    /// The error of a request still open at the drain deadline (server.py `_drain_deadline`,
    /// `ServerShuttingDownError`).
    pub fn shutdown_error(&self) -> ApiError {
        ApiError::new(503, self.shutdown_message())
    }

    pub fn shutdown_message(&self) -> String {
        format!(
            "the server is shutting down: the request did not finish within the drain window (--shutdown-timeout {} s); retry it",
            format_g(self.args.shutdown_timeout_s)
        )
    }

    /// The tokens ids may use: the tokenizer's vocabulary, or the model's when smaller.
    pub fn vocab_limit(&self) -> (usize, bool) {
        let tokenizer_vocab = self.tokenizer.vocab_size();
        match self.link.vocab_size() {
            Some(model) if model < tokenizer_vocab => (model, true),
            _ => (tokenizer_vocab, false),
        }
    }
}

/// Python's `{x:g}` for the values a timeout takes (5 -> "5", 0.5 -> "0.5").
fn format_g(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_from_launcher_json() {
        let a = FrontendArgs::from_json(
            r#"{"model":"/m/tiny/","model_path":"/m/tiny","api_key":"k","max_request_body_bytes":100,
                "max_num_queued_requests":3,"shutdown_timeout":2.5,"stream_interval":2,
                "served_model_name":null,"unknown":[1]}"#,
        )
        .unwrap();
        assert_eq!(a.model.as_deref(), Some("/m/tiny/"));
        assert_eq!(a.api_key.as_deref(), Some("k"));
        assert_eq!(
            (a.max_request_body_bytes, a.max_num_queued_requests),
            (100, Some(3))
        );
        assert_eq!((a.shutdown_timeout_s, a.stream_interval), (2.5, 2));
        let d = FrontendArgs::from_json("{}").unwrap();
        assert_eq!(d, FrontendArgs::default());
        assert!(FrontendArgs::from_json(r#"{"api_key":3}"#)
            .unwrap_err()
            .contains("api_key"));
        assert!(FrontendArgs::from_json("[]").is_err());
    }

    #[test]
    fn timeouts_print_like_python_g() {
        assert_eq!(format_g(5.0), "5");
        assert_eq!(format_g(0.5), "0.5");
    }
}
