//! The OpenAI HTTP server: hyper 0.14 (HTTP/1.1, keep-alive) on the listening socket the
//! launcher passed, with the Python server's routes, guards and error bodies
//! (shoal/api/app.py, asgi.py, routes.py) and its drain (server.py).
//!
//! Per request: route (404 / 405), the API-key guard on /v1/* (401), the body read up to
//! the limit (413), an admission place for generation routes (503 + Retry-After), then the
//! handler. Streams are `generate::Generation` bodies polled by hyper's connection task.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::HttpBody;
use hyper::header::{
    HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use hyper::server::conn::AddrStream;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, Server, StatusCode};
use serde_json::{Map, Value};
use shoal_wire::{EngineCoreRequest, SamplingParams};
use tokio::sync::watch;

use crate::chat;
use crate::errors::ApiError;
use crate::generate::{Api, Generation, GenerationParts, Seq, StopConfig};
use crate::json::{write_i64, write_str};
use crate::openai::{ChatRequest, CompletionRequest, Fields, Prompt};
use crate::state::{AdmissionGuard, AppState, FrontendArgs};

/// After the drain deadline: how long failed streams get to send their final error event
/// before `serve` returns anyway (server.py `_FINAL_EVENTS_S`).
const FINAL_EVENTS: Duration = Duration::from_millis(500);

/// Serve until `draining` turns true, then drain (see the module docs of server.py): stop
/// accepting, let open requests run for --shutdown-timeout, fail the rest with a 503 (a
/// stream: a final error event and `[DONE]`) and return.
pub async fn serve(
    listener: std::net::TcpListener,
    state: Arc<AppState>,
    mut draining: watch::Receiver<bool>,
) -> Result<(), String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("the listening socket: {e}"))?;
    let conn_state = Arc::clone(&state);
    let make = make_service_fn(move |conn: &AddrStream| {
        let state = Arc::clone(&conn_state);
        let peer = conn.remote_addr();
        async move {
            Ok::<_, Infallible>(service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    if !state.args.access_log {
                        return handle(state, req).await;
                    }
                    let start = Instant::now();
                    let line = format!(
                        "{peer} \"{} {} {:?}\"",
                        req.method(),
                        req.uri(),
                        req.version()
                    );
                    let response = handle(state, req).await;
                    if let Ok(r) = &response {
                        // Python logs when the response ended; a stream here when it started.
                        crate::log_info!(
                            "{line} {} {:.1}ms",
                            r.status().as_u16(),
                            start.elapsed().as_secs_f64() * 1e3
                        );
                    }
                    response
                }
            }))
        }
    });
    let builder = Server::from_tcp(listener).map_err(|e| format!("the listening socket: {e}"))?;
    let mut drain_signal = draining.clone();
    let server = builder
        .http1_only(true)
        .http1_keepalive(true)
        // One buffer per write (chunk-size line, data and CRLF copied together) instead of a
        // three-piece writev: the same bytes and syscalls, less CPU per streamed chunk
        // (16.4 vs 17.8 us/token in benchmarks/run_serving.py rust-tiny-1, 2026-12-07).
        .http1_writev(false)
        .tcp_nodelay(true)
        // uvicorn's timeout_keep_alive, as near as hyper 0.14 has it: a connection that does
        // not send a whole request head in time is closed.
        .http1_header_read_timeout(Duration::from_secs_f64(
            state.args.http_timeout_keep_alive_s,
        ))
        .serve(make)
        .with_graceful_shutdown(async move { wait_true(&mut drain_signal).await });
    let mut server = tokio::spawn(server);
    tokio::select! {
        result = &mut server => return finished(result),
        _ = wait_true(&mut draining) => {}
    }
    // Draining: hyper stopped accepting and closes idle connections; open requests go on.
    state.admission.close();
    let grace = Duration::from_secs_f64(state.args.shutdown_timeout_s);
    crate::log_info!(
        "draining: open requests get {} s (--shutdown-timeout)",
        state.args.shutdown_timeout_s
    );
    if let Ok(result) = tokio::time::timeout(grace, &mut server).await {
        return finished(result);
    }
    let open = state.admission.in_flight();
    crate::log_warn!(
        "drain deadline (--shutdown-timeout {} s) passed: failing {} request(s) still in flight",
        state.args.shutdown_timeout_s,
        open
    );
    state.pass_drain_deadline();
    state.link.fail_all(&state.shutdown_message());
    match tokio::time::timeout(FINAL_EVENTS, &mut server).await {
        Ok(result) => finished(result),
        Err(_) => {
            server.abort();
            Ok(())
        }
    }
}

fn finished(
    result: Result<Result<(), hyper::Error>, tokio::task::JoinError>,
) -> Result<(), String> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("the HTTP server failed: {e}")),
        Err(e) => Err(format!("the HTTP server task failed: {e}")),
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            // The sender is gone without a drain: serve until the process ends.
            std::future::pending::<()>().await;
        }
    }
}

// ----------------------------------------------------------------------------- routing

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Completions,
    Chat,
    Unsupported(&'static str),
    Models,
    Model,
    Health,
    Metrics,
    Version,
    Tokenize,
    Detokenize,
}

const ROUTES: &[(&str, &str, Route)] = &[
    ("POST", "/v1/completions", Route::Completions),
    ("POST", "/v1/chat/completions", Route::Chat),
    ("POST", "/v1/responses", Route::Unsupported("/v1/responses")),
    (
        "POST",
        "/v1/embeddings",
        Route::Unsupported("/v1/embeddings"),
    ),
    ("GET", "/v1/models", Route::Models),
    ("GET", "/health", Route::Health),
    ("GET", "/metrics", Route::Metrics),
    ("GET", "/version", Route::Version),
    ("POST", "/tokenize", Route::Tokenize),
    ("POST", "/detokenize", Route::Detokenize),
];
const MODEL_PREFIX: &str = "/v1/models/";

fn lookup(method: &Method, path: &str) -> Result<Route, ApiError> {
    let mut known = false;
    for &(m, p, route) in ROUTES {
        if p == path {
            if m == method.as_str() {
                return Ok(route);
            }
            known = true;
        }
    }
    if path.starts_with(MODEL_PREFIX) && path.len() > MODEL_PREFIX.len() {
        if method == Method::GET {
            return Ok(Route::Model);
        }
        known = true;
    }
    Err(if known {
        ApiError::new(405, format!("method {method} is not allowed on {path}"))
    } else {
        ApiError::new(404, format!("no route {path}"))
    })
}

async fn handle(state: Arc<AppState>, req: Request<Body>) -> Result<Response<Body>, Infallible> {
    let origin = req.headers().get(hyper::header::ORIGIN).cloned();
    let origin = match origin {
        None => {
            return Ok(match route(state, req).await {
                Ok(response) => response,
                Err(e) => error_response(&e),
            })
        }
        Some(origin) => origin,
    };
    // Cross-origin (app.py `_http`, cors.py): a preflight is answered here; other responses
    // of an allowed origin carry its headers.
    if req.method() == Method::OPTIONS
        && req.headers().contains_key("access-control-request-method")
    {
        return Ok(cors_preflight(&state.args, &origin, req.headers()));
    }
    let mut response = match route(Arc::clone(&state), req).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    };
    if origin_allowed(&state.args, &origin) {
        add_origin_headers(&state.args, &origin, response.headers_mut());
    }
    Ok(response)
}

// ----------------------------------------------------------------------------- CORS

/// Methods "*" allows (cors.py `ALL_METHODS`).
const ALL_METHODS: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT";
/// Request headers a browser never asks permission for.
const SAFELISTED_HEADERS: [&str; 4] = [
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];

fn origin_allowed(args: &FrontendArgs, origin: &HeaderValue) -> bool {
    args.allowed_origins
        .iter()
        .any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
}

fn add_origin_headers(args: &FrontendArgs, origin: &HeaderValue, headers: &mut HeaderMap) {
    // "*" cannot be combined with credentials: the origin is echoed instead.
    if args.allowed_origins.iter().any(|o| o == "*") && !args.allow_credentials {
        headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    } else {
        headers.insert("access-control-allow-origin", origin.clone());
        headers.append("vary", HeaderValue::from_static("Origin"));
    }
    if args.allow_credentials {
        headers.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
    }
}

/// The answer to an OPTIONS preflight: 200 when the origin, the method and every requested
/// header are allowed, else 400 (cors.py `CorsPolicy.preflight`, Starlette's semantics).
fn cors_preflight(
    args: &FrontendArgs,
    origin: &HeaderValue,
    request: &HeaderMap,
) -> Response<Body> {
    let any_method = args.allowed_methods.iter().any(|m| m == "*");
    let methods = if any_method {
        ALL_METHODS.to_string()
    } else {
        args.allowed_methods
            .iter()
            .map(|m| m.to_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let any_header = args.allowed_headers.iter().any(|h| h == "*");
    let allowed_origin = origin_allowed(args, origin);
    let mut headers = HeaderMap::new();
    if allowed_origin {
        add_origin_headers(args, origin, &mut headers);
    }
    if let Ok(v) = HeaderValue::from_str(&methods) {
        headers.insert("access-control-allow-methods", v);
    }
    headers.insert("access-control-max-age", HeaderValue::from_static("600"));
    let requested = request.get("access-control-request-headers").cloned();
    let requested_text: String = requested
        .as_ref()
        .map(|v| v.as_bytes().iter().map(|&b| b as char).collect())
        .unwrap_or_default();
    if any_header {
        if let Some(v) = requested.filter(|v| !v.is_empty()) {
            headers.insert("access-control-allow-headers", v);
        }
    } else {
        let mut names: Vec<String> = args
            .allowed_headers
            .iter()
            .map(|h| h.to_lowercase())
            .collect();
        names.sort();
        names.dedup();
        if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
            headers.insert("access-control-allow-headers", v);
        }
    }
    let method = request
        .get("access-control-request-method")
        .map(|v| {
            v.as_bytes()
                .iter()
                .map(|&b| (b as char).to_ascii_uppercase())
                .collect::<String>()
        })
        .unwrap_or_default();
    let method_ok = methods.split(", ").any(|m| m == method);
    let headers_ok = any_header
        || requested_text
            .split(',')
            .map(|h| h.trim().to_lowercase())
            .filter(|h| !h.is_empty())
            .all(|h| {
                SAFELISTED_HEADERS.contains(&h.as_str())
                    || args.allowed_headers.iter().any(|a| a.to_lowercase() == h)
            });
    let ok = allowed_origin && method_ok && headers_ok;
    let body: &'static [u8] = if ok {
        b"OK"
    } else {
        b"Disallowed CORS request"
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(
        e.body(),
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    );
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

fn json_response(body: Vec<u8>, status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn route(state: Arc<AppState>, req: Request<Body>) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let route = lookup(&parts.method, parts.uri.path())?;
    let guarded = matches!(
        route,
        Route::Completions | Route::Chat | Route::Unsupported(_) | Route::Models | Route::Model
    );
    if guarded {
        if let Some(key) = &state.args.api_key {
            check_api_key(&parts.headers, key)?;
        }
    }
    let body = read_body(&parts.headers, body, state.args.max_request_body_bytes).await?;
    match route {
        Route::Completions | Route::Chat => {
            let admission = state.admit()?;
            generation(state, route, &parts.headers, &body, admission).await
        }
        Route::Unsupported(path) => Err(ApiError::bad(
            path,
            format!("{path} is not supported by the native frontend (--frontend rust); use --frontend python"),
        )),
        Route::Models => {
            let mut buf = b"{\"data\":[".to_vec();
            write_model_card(&mut buf, &state);
            buf.extend_from_slice(b"],\"object\":\"list\"}");
            Ok(json_response(buf, StatusCode::OK))
        }
        Route::Model => {
            let id = percent_decode(&parts.uri.path()[MODEL_PREFIX.len()..]);
            if id != state.model_name {
                return Err(not_found_model(&id));
            }
            let mut buf = Vec::new();
            write_model_card(&mut buf, &state);
            Ok(json_response(buf, StatusCode::OK))
        }
        Route::Health => Ok(match state.link.unavailable_reason() {
            Some(reason) => error_response(&ApiError::engine_unavailable(&reason)),
            None => Response::new(Body::empty()),
        }),
        Route::Metrics => metrics(&state, parts.uri.query()),
        Route::Version => {
            let mut buf = b"{\"version\":".to_vec();
            write_str(&mut buf, state.args.version.as_deref().unwrap_or(env!("CARGO_PKG_VERSION")));
            buf.push(b'}');
            Ok(json_response(buf, StatusCode::OK))
        }
        Route::Tokenize => tokenize(&state, &body),
        Route::Detokenize => detokenize(&state, &body),
    }
}

/// 401 unless `Authorization: Bearer <key>` or `x-api-key: <key>`; both are compared in
/// constant time, always (app.py `_api_key_guard`).
fn check_api_key(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    let expected = format!("Bearer {key}");
    let given = headers
        .get(hyper::header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or(b"");
    let given_key = headers
        .get("x-api-key")
        .map(HeaderValue::as_bytes)
        .unwrap_or(b"");
    let bearer_ok = constant_time_eq(given, expected.as_bytes());
    let key_ok = constant_time_eq(given_key, key.as_bytes());
    if bearer_ok | key_ok {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "invalid or missing API key (Authorization: Bearer <key>, or x-api-key)",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, &y) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ y;
    }
    diff == 0
}

/// The whole body; 413 as soon as the declared or received size exceeds `limit`.
async fn read_body(headers: &HeaderMap, mut body: Body, limit: u64) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            format!("the request body exceeds {limit} bytes (--max-request-body-bytes)"),
        )
    };
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        match len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if n > limit => return Err(too_large()),
            Some(_) => {}
            None => {
                return Err(ApiError::new(
                    400,
                    "the Content-Length header is not a number",
                ))
            }
        }
    }
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(400, format!("reading the request body failed: {e}")))?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn not_found_model(model: &str) -> ApiError {
    ApiError {
        status: 404,
        ..ApiError::bad("model", format!("The model `{model}` does not exist."))
    }
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model_name => Err(not_found_model(m)),
        _ => Ok(()),
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn write_model_card(buf: &mut Vec<u8>, state: &AppState) {
    buf.extend_from_slice(b"{\"id\":");
    write_str(buf, &state.model_name);
    buf.extend_from_slice(b",\"created\":");
    write_i64(buf, now_s());
    buf.extend_from_slice(b",\"max_model_len\":");
    write_i64(buf, state.link.max_model_len() as i64);
    buf.extend_from_slice(b",\"object\":\"model\",\"owned_by\":\"shoal\",\"root\":");
    write_str(buf, &state.model_root);
    buf.push(b'}');
}

fn metrics(state: &AppState, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let prefixes = crate::metrics::parse_prefix_query(query).map_err(ApiError::invalid)?;
    let mut text = state.metrics.render_prefixes(&state.link, &prefixes);
    if prefixes.contains(&"shoal:") {
        let mut label = Vec::new();
        write_str(&mut label, &state.model_name);
        let label = format!("{{model_name={}}}", String::from_utf8_lossy(&label));
        text.push_str(&format!(
            "# HELP shoal:api_requests_in_flight Generation requests admitted and not finished.\n\
             # TYPE shoal:api_requests_in_flight gauge\n\
             shoal:api_requests_in_flight{label} {}\n\
             # HELP shoal:api_requests_rejected_total Requests refused by --max-num-queued-requests.\n\
             # TYPE shoal:api_requests_rejected_total counter\n\
             shoal:api_requests_rejected_total{label} {}\n",
            state.admission.in_flight(),
            state.admission.rejected()
        ));
    }
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r.headers_mut()
        .insert("x-shoal-server", HeaderValue::from_static("RustFrontend"));
    Ok(r)
}

// ----------------------------------------------------------------------------- ids

/// A fast generator for request ids (not for secrets): splitmix64 over a shared counter,
/// seeded once from the kernel.
fn random_u64() -> u64 {
    static SEED: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut seed = SEED.load(Ordering::Relaxed);
    if seed == 0 {
        let mut bytes = [0u8; 8];
        // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        seed = if n == 8 {
            u64::from_ne_bytes(bytes)
        } else {
            now_f64().to_bits() ^ std::process::id() as u64
        };
        seed |= 1;
        // Two threads seeding at once both use their own seed once: harmless for ids.
        SEED.store(seed, Ordering::Relaxed);
    }
    let step = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut z = seed.wrapping_add(step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `uuid.uuid4().hex`: 32 hex digits, version 4, RFC 4122 variant.
fn uuid4_hex() -> String {
    let mut hi = random_u64();
    let mut lo = random_u64();
    hi = (hi & !0xF000) | 0x4000; // version nibble (digit 13)
    lo = (lo & !(0xC << 60)) | (0x8 << 60); // variant bits (digit 17)
    format!("{hi:016x}{lo:016x}")
}

struct Ids {
    public: String,
    internal: String,
    header: Option<HeaderValue>,
}

/// routes.py `_request_ids`: `<prefix>-<uuid4 hex>`, or with `x-request-id` the client's
/// id (public) plus 8 hex digits (internal: unique even when a client repeats an id).
fn request_ids(headers: &HeaderMap, prefix: &str) -> Ids {
    match headers.get("x-request-id").filter(|v| !v.is_empty()) {
        None => {
            let id = format!("{prefix}-{}", uuid4_hex());
            Ids {
                internal: id.clone(),
                public: id,
                header: None,
            }
        }
        Some(v) => {
            let client: String = v.as_bytes().iter().map(|&b| b as char).collect();
            let public = format!("{prefix}-{client}");
            let internal = format!("{public}-{:08x}", random_u64() as u32);
            Ids {
                public,
                internal,
                header: Some(v.clone()),
            }
        }
    }
}

// ----------------------------------------------------------------------------- generation

/// Prompt token ids, checked as processor.py `tokenize` / `_check_ids` checks them.
fn prompt_ids(
    state: &AppState,
    prompt: &Prompt,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let (vocab, check_text) = state.vocab_limit();
    let (ids, field): (Vec<i64>, &str) = match prompt {
        Prompt::Text(text) => {
            if text.is_empty() {
                return Err(ApiError::invalid("prompt: must not be empty"));
            }
            let ids = state.tokenizer.encode(text, add_special_tokens);
            if !check_text {
                return check_len(state, ids, "prompt");
            }
            (ids.into_iter().map(i64::from).collect(), "prompt")
        }
        Prompt::Ids(ids) => (ids.clone(), "prompt_token_ids"),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    for (i, &t) in ids.iter().enumerate() {
        if t < 0 || t as u64 >= vocab as u64 {
            return Err(ApiError::invalid(format!(
                "{field}: token id {t} at position {i} is not in the vocabulary [0, {vocab})"
            )));
        }
    }
    check_len(state, ids.into_iter().map(|t| t as u32).collect(), field)
}

fn check_len(state: &AppState, ids: Vec<u32>, field: &str) -> Result<Vec<u32>, ApiError> {
    let max_model_len = state.link.max_model_len();
    if ids.is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    if ids.len() >= max_model_len {
        return Err(ApiError::invalid(format!(
            "{field}: the prompt has {} tokens; this model's maximum context length is {max_model_len} tokens, \
             which must leave room for at least one generated token",
            ids.len()
        )));
    }
    Ok(ids)
}

/// processor.py `_resolve_max_tokens`: None -> the room the prompt leaves.
fn resolve_max_tokens(
    state: &AppState,
    mut params: SamplingParams,
    num_prompt: usize,
) -> Result<SamplingParams, ApiError> {
    let max_model_len = state.link.max_model_len() as i64;
    let room = max_model_len - num_prompt as i64;
    match params.max_tokens {
        None => params.max_tokens = Some(room),
        Some(m) if m > room => {
            return Err(ApiError::invalid(format!(
                "max_tokens: this model's maximum context length is {max_model_len} tokens; you requested {} tokens \
                 ({num_prompt} in the prompt, {m} for max_tokens). Reduce the prompt or max_tokens.",
                num_prompt as i128 + m as i128
            )))
        }
        Some(_) => {}
    }
    Ok(params)
}

/// One prompt's engine requests: one, or for n > 1 a child `<id>-<i>` per sequence with
/// n = 1 and seed + i (processor.py).
fn engine_requests(
    state: &AppState,
    request_id: &str,
    prompt: Vec<u32>,
    params: &SamplingParams,
) -> Vec<EngineCoreRequest> {
    let eos = state.tokenizer.eos_token_ids().first().copied();
    let arrival = now_f64();
    let n = params.n.max(1);
    let make = |id: String, p: SamplingParams| EngineCoreRequest {
        request_id: id,
        prompt_token_ids: prompt.clone(),
        sampling_params: p,
        eos_token_id: eos,
        arrival_time: arrival,
        client_index: 0,
        has_prompt_embeds: false,
    };
    if n == 1 {
        return vec![make(request_id.to_string(), params.clone())];
    }
    (0..n)
        .map(|i| {
            let mut p = params.clone();
            p.n = 1;
            // Python's ints do not overflow; a seed this close to i64::MAX wraps here.
            p.seed = p.seed.map(|s| s.wrapping_add(i));
            make(format!("{request_id}-{i}"), p)
        })
        .collect()
}

/// A validated request, ready to submit: per prompt its token ids and engine requests.
struct Prepared {
    prompts: Vec<(Vec<u32>, Vec<EngineCoreRequest>)>,
    params: SamplingParams,
}

async fn generation(
    state: Arc<AppState>,
    route: Route,
    headers: &HeaderMap,
    body: &[u8],
    admission: AdmissionGuard,
) -> Result<Response<Body>, ApiError> {
    let (api, stream, include_usage, ids, prepared) = if route == Route::Completions {
        let req = CompletionRequest::parse(body)?;
        check_model(&state, req.common.model.as_deref())?;
        let params = req.sampling_params()?;
        let prompts = req.prompts()?;
        check_serving(&state)?;
        let ids = request_ids(headers, "cmpl");
        let mut prepared = Prepared {
            prompts: Vec::with_capacity(prompts.len()),
            params: params.clone(),
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let tokens = prompt_ids(&state, prompt, req.add_special_tokens)?;
            let p = resolve_max_tokens(&state, params.clone(), tokens.len())?;
            let reqs =
                engine_requests(&state, &format!("{}-{i}", ids.internal), tokens.clone(), &p);
            prepared.prompts.push((tokens, reqs));
        }
        let api = Api::Completion {
            logprobs: req.logprobs.map(|l| l as usize),
        };
        (
            api,
            req.common.stream,
            req.common.include_usage,
            ids,
            prepared,
        )
    } else {
        let req = ChatRequest::parse(body)?;
        check_model(&state, req.common.model.as_deref())?;
        let params = req.sampling_params()?;
        let text = chat::render(
            &state,
            &req.messages,
            req.add_generation_prompt,
            req.chat_template.as_deref(),
            &req.chat_template_kwargs,
        )?;
        check_serving(&state)?;
        let ids = request_ids(headers, "chatcmpl");
        let tokens = prompt_ids(&state, &Prompt::Text(text), req.add_special_tokens)?;
        let p = resolve_max_tokens(&state, params.clone(), tokens.len())?;
        let reqs = engine_requests(&state, &ids.internal, tokens.clone(), &p);
        let prepared = Prepared {
            prompts: vec![(tokens, reqs)],
            params,
        };
        let api = Api::Chat {
            logprobs: req.logprobs.then(|| req.top_logprobs.unwrap_or(0) as usize),
        };
        (
            api,
            req.common.stream,
            req.common.include_usage,
            ids,
            prepared,
        )
    };
    let n = prepared.params.n.max(1) as usize;
    let skip_special = prepared.params.skip_special_tokens;
    let mut seqs = Vec::new();
    let mut receivers = Vec::new();
    let mut prompt_tokens = 0;
    for (i, (tokens, reqs)) in prepared.prompts.into_iter().enumerate() {
        prompt_tokens += tokens.len();
        for (j, r) in reqs.iter().enumerate() {
            seqs.push(Seq::new(
                i * n + j,
                r.request_id.clone(),
                &state.tokenizer,
                &tokens,
                skip_special,
            ));
        }
        state.metrics.request_arrived();
        match state.link.submit(reqs) {
            Ok(rx) => receivers.extend(rx),
            Err(reason) => {
                // Abort what an earlier prompt of this request already started.
                let started: Vec<String> = seqs
                    .iter()
                    .take(receivers.len())
                    .map(|s| s.engine_id.clone())
                    .collect();
                if !started.is_empty() {
                    state.link.abort(started);
                }
                return Err(ApiError::engine_unavailable(&reason));
            }
        }
    }
    let stops = StopConfig {
        stop: prepared.params.stop.clone(),
        include: prepared.params.include_stop_str_in_output,
    };
    let gen = Generation::new(GenerationParts {
        state: Arc::clone(&state),
        api,
        public_id: ids.public,
        created: now_s(),
        seqs,
        receivers,
        stops,
        prompt_tokens,
        include_usage,
        admission: Some(admission),
    });
    let mut response = if stream {
        let mut r = Response::new(Body::wrap_stream(gen));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        json_response(gen.collect().await?, StatusCode::OK)
    };
    if let Some(h) = ids.header {
        response.headers_mut().insert("x-request-id", h);
    }
    Ok(response)
}

/// 503 while no engine can serve (an engine died, or the drain deadline passed).
fn check_serving(state: &AppState) -> Result<(), ApiError> {
    if state.deadline_passed() {
        return Err(state.shutdown_error());
    }
    match state.link.unavailable_reason() {
        Some(reason) => Err(ApiError::engine_unavailable(&reason)),
        None => Ok(()),
    }
}

// ----------------------------------------------------------------------------- tokenize

/// `{prompt | messages, add_special_tokens}` -> `{tokens, count, max_model_len}`.
fn tokenize(state: &AppState, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let map = crate::openai::parse_object(body)?;
    let f = Fields(&map);
    let model = f.opt_str("model")?;
    let prompt = f.opt_str("prompt")?;
    let messages = match map.get("messages") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Array(_)) => Some(v),
        Some(v) => {
            let got = match v {
                Value::String(_) => "str",
                Value::Object(_) => "object",
                Value::Bool(_) => "bool",
                Value::Number(n) if n.is_f64() => "float",
                _ => "int",
            };
            return Err(ApiError::invalid(format!(
                "Expected `array | null`, got `{got}` - at `$.messages`"
            )));
        }
    };
    let add_special_tokens = f.bool("add_special_tokens", true)?;
    let add_generation_prompt = f.bool("add_generation_prompt", true)?;
    let chat_template = f.opt_str("chat_template")?;
    check_model(state, model)?;
    if prompt.is_none() == messages.is_none() {
        return Err(ApiError::invalid(
            "prompt: give exactly one of prompt and messages",
        ));
    }
    let tokens = match messages {
        Some(m) => {
            let text = chat::render(state, m, add_generation_prompt, chat_template, &Map::new())?;
            state.tokenizer.encode(&text, false)
        }
        None => state
            .tokenizer
            .encode(prompt.unwrap_or_default(), add_special_tokens),
    };
    let mut buf = b"{\"tokens\":[".to_vec();
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_i64(&mut buf, *t as i64);
    }
    buf.extend_from_slice(b"],\"count\":");
    write_i64(&mut buf, tokens.len() as i64);
    buf.extend_from_slice(b",\"max_model_len\":");
    write_i64(&mut buf, state.link.max_model_len() as i64);
    buf.push(b'}');
    Ok(json_response(buf, StatusCode::OK))
}

/// `{tokens}` -> `{prompt}`; 400 naming `tokens` for ids outside the vocabulary.
fn detokenize(state: &AppState, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let map = crate::openai::parse_object(body)?;
    let f = Fields(&map);
    let model = f.opt_str("model")?;
    let tokens = match map.get("tokens") {
        None => return Err(ApiError::invalid("Object missing required field `tokens`")),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                match v {
                    Value::Number(n) if !n.is_f64() => n.as_i64().ok_or(()),
                    _ => Err(()),
                }
                .map_err(|_| {
                    let got = match v {
                        Value::Number(_) => "float",
                        Value::String(_) => "str",
                        Value::Bool(_) => "bool",
                        Value::Null => "null",
                        Value::Array(_) => "array",
                        Value::Object(_) => "object",
                    };
                    ApiError::invalid(format!("Expected `int`, got `{got}` - at `$.tokens[{i}]`"))
                })
            })
            .collect::<Result<Vec<i64>, ApiError>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "Expected `array`, got `str` - at `$.tokens`".to_string(),
            ))
        }
    };
    check_model(state, model)?;
    let vocab = state.tokenizer.vocab_size();
    let mut ids = Vec::with_capacity(tokens.len());
    for (i, &t) in tokens.iter().enumerate() {
        if t < 0 || t as u64 >= vocab as u64 {
            return Err(ApiError::bad(
                "tokens",
                format!("tokens: id {t} at position {i} is not in the vocabulary [0, {vocab})"),
            ));
        }
        ids.push(t as u32);
    }
    let mut buf = b"{\"prompt\":".to_vec();
    write_str(&mut buf, &state.tokenizer.decode(&ids, false));
    buf.push(b'}');
    Ok(json_response(buf, StatusCode::OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_404_405() {
        assert!(lookup(&Method::POST, "/v1/completions").is_ok());
        assert!(lookup(&Method::GET, "/v1/models/a/b").is_ok());
        let e = lookup(&Method::GET, "/v1/completions").err().unwrap();
        assert_eq!(
            (e.status, e.message.as_str()),
            (405, "method GET is not allowed on /v1/completions")
        );
        let e = lookup(&Method::GET, "/nope").err().unwrap();
        assert_eq!((e.status, e.message.as_str()), (404, "no route /nope"));
        let e = lookup(&Method::GET, "/v1/models/").err().unwrap();
        assert_eq!(e.status, 404);
    }

    #[test]
    fn api_key_guard() {
        let mut h = HeaderMap::new();
        assert_eq!(check_api_key(&h, "k").unwrap_err().status, 401);
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        assert!(check_api_key(&h, "k").is_ok());
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("k"));
        assert!(check_api_key(&h, "k").is_ok());
        h.insert("x-api-key", HeaderValue::from_static("kk"));
        assert!(check_api_key(&h, "k").is_err());
    }

    #[test]
    fn ids_have_python_shapes() {
        let h = HeaderMap::new();
        let ids = request_ids(&h, "cmpl");
        assert_eq!(ids.public, ids.internal);
        assert_eq!(ids.public.len(), "cmpl-".len() + 32);
        assert_eq!(&ids.public[5 + 12..5 + 13], "4");
        assert_ne!(request_ids(&h, "cmpl").public, ids.public);
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let ids = request_ids(&h, "chatcmpl");
        assert_eq!(ids.public, "chatcmpl-abc");
        assert!(
            ids.internal.starts_with("chatcmpl-abc-")
                && ids.internal.len() == "chatcmpl-abc-".len() + 8
        );
    }

    #[test]
    fn cors_like_starlette() {
        let args = FrontendArgs::default();
        let origin = HeaderValue::from_static("http://x.example");
        let mut req = HeaderMap::new();
        req.insert(
            "access-control-request-method",
            HeaderValue::from_static("post"),
        );
        req.insert(
            "access-control-request-headers",
            HeaderValue::from_static("Authorization, X-Y"),
        );
        let r = cors_preflight(&args, &origin, &req);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
        assert_eq!(
            r.headers()["access-control-allow-headers"],
            "Authorization, X-Y"
        );
        let args = FrontendArgs {
            allowed_origins: vec!["http://ok.example".into()],
            allowed_methods: vec!["get".into()],
            allowed_headers: vec!["authorization".into()],
            allow_credentials: true,
            ..FrontendArgs::default()
        };
        assert_eq!(
            cors_preflight(&args, &origin, &req).status(),
            StatusCode::BAD_REQUEST
        );
        let ok = HeaderValue::from_static("http://ok.example");
        let mut req = HeaderMap::new();
        req.insert(
            "access-control-request-method",
            HeaderValue::from_static("GET"),
        );
        req.insert(
            "access-control-request-headers",
            HeaderValue::from_static("authorization, content-type"),
        );
        let r = cors_preflight(&args, &ok, &req);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "http://ok.example"
        );
        assert_eq!(r.headers()["access-control-allow-credentials"], "true");
        assert_eq!(r.headers()["access-control-allow-methods"], "GET");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("org%2Fmodel"), "org/model");
        assert_eq!(percent_decode("a%zz%"), "a%zz%");
    }
}
