//! `EngineLink`: this frontend's ZMQ link to its engines, the Rust twin of
//! shoal/engine/client.py's `EngineClient` (see the topology block of shoal/protocol.py).
//!
//! Sockets, all owned by one dedicated OS thread (zmq sockets are not thread-safe):
//!
//! ```text
//!   ROUTER  bound on input_address    engines' DEALERs connect; first message from each is
//!                                     EngineReady; we send [identity, ADD|ABORT, payload]
//!   PULL    bound on output_address   EngineCoreOutputs, or a dead notice (ENGINE_CORE_DEAD)
//!   SUB     connected to the coordinator (M > 1): DPStats, one frame, subscribed to b""
//!   PAIR    inproc monitor of the ROUTER: ACCEPTED / DISCONNECTED (engine death)
//! ```
//!
//! Tokio tasks reach the thread through an mpsc channel plus an eventfd that the thread polls
//! beside its sockets (a write only when the thread is not already woken: one syscall per
//! burst of commands, a few microseconds of latency). Request bookkeeping (who waits for which
//! request id, in-flight counts, loads, health) lives in one mutex shared by both sides: the
//! thread takes it once per engine message, `submit` once per API request.
//!
//! v1 has no engine restarts (`--restart-dead-engines` is not honoured): the first engine
//! failure (a dead notice, a lost connection, an unreachable engine) is fatal to the link as
//! in EngineClient without a restart policy: every pending request gets
//! `EngineEvent::Failed(reason)` and `unavailable_reason()` stays `Some` for good.
//!
//! Engines: this frontend serves engines `engine_start_index .. + engine_count` (global
//! indices, the identity and `engine_index` on the wire, and the `engine` metric label);
//! positions 0.. in `engines()` / `snapshot()` follow that order.

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_wire::{
    AbortRequest, DPStats, EngineCoreOutputs, EngineCoreRequest, EngineReady, FinishReason,
    SchedulerStats, Wire,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;

use crate::metrics::{FinishedRecord, Metrics};

/// A waiting request's news: an output of its engine, or why it cannot finish.
#[derive(Debug)]
pub enum EngineEvent {
    Output(shoal_wire::EngineCoreOutput),
    Failed(String),
}

/// Where the link binds and connects, and which engines it serves.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub input_address: String,
    pub output_address: String,
    /// The DP coordinator's stats PUB (M > 1); None: no load stats.
    pub coordinator_address: Option<String>,
    pub engine_start_index: usize,
    pub engine_count: usize,
    pub data_parallel_size: usize,
}

/// One engine's state for /metrics and /health.
#[allow(dead_code)] // /metrics reads `stats`; the rest is there for /health and tests
#[derive(Debug, Clone)]
pub struct EngineState {
    /// Global engine index.
    pub index: usize,
    pub ready: bool,
    pub alive: bool,
    /// This frontend's requests (sequences) in flight on it.
    pub in_flight: usize,
    /// Its last SchedulerStats (None: none received yet).
    pub stats: Option<SchedulerStats>,
}

#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct EngineSnapshot {
    pub engines: Vec<EngineState>,
    pub unavailable_reason: Option<String>,
}

// A waiting request costs more than a running one when picking the least loaded engine
// (client_state._WAITING_WEIGHT).
const WAITING_WEIGHT: i64 = 4;
// Output frames handled per poll round before the other sockets get a look.
const MAX_BATCH: usize = 256;
const FINISH_SEVERITY_ABORT: usize = 2;
const FINISH_SEVERITY_ERROR: usize = 3;

enum Command {
    /// ADD frames (request payloads) for engine position `engine`.
    Add { engine: usize, requests: Vec<(String, Vec<u8>)> },
    Abort { engine: usize, payload: Vec<u8> },
    Shutdown,
}

/// One API request while any of its sequences runs (request_metrics._Request).
struct Parent {
    engine: usize,
    arrival_wall: f64,
    num_prompt_tokens: u64,
    n: u64,
    max_tokens: u64,
    num_left: u64,
    has_first_token: bool,
    num_generated: u64,
    max_generated: u64,
    reason: usize,
    tpot_s: Option<f64>,
    phase_times: Option<(f64, f64, f64)>,
}

/// One engine request (sequence).
struct Seq {
    engine: usize,
    tx: UnboundedSender<EngineEvent>,
    parent: u64,
    first_output: Option<Instant>,
    last_output: Option<Instant>,
    num_generated: u64,
    /// The frontend ended it on a stop string and aborted it in the engine
    /// (`abort_stopped`): the engine's final ABORT counts as finished_reason "stop".
    stopped: bool,
}

struct State {
    ready: Vec<Option<EngineReady>>,
    num_ready: usize,
    dead_reason: Option<String>,
    shutting_down: bool,
    in_flight: Vec<usize>,
    stats: Vec<Option<SchedulerStats>>,
    /// The coordinator's last (waiting, running) per engine position.
    dp_loads: Vec<(i64, i64)>,
    next_engine: usize,
    seqs: HashMap<String, Seq>,
    parents: HashMap<u64, Parent>,
    next_parent: u64,
}

struct Shared {
    cfg: LinkConfig,
    state: Mutex<State>,
    metrics: OnceLock<Arc<Metrics>>,
    ready_tx: watch::Sender<usize>,
}

pub struct EngineLink {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    wake_fd: RawFd,
    wake_pending: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shut_down: AtomicBool,
}

fn wall_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn finish_severity(reason: FinishReason) -> usize {
    match reason {
        FinishReason::Stop => 0,
        FinishReason::Length => 1,
        FinishReason::Abort => FINISH_SEVERITY_ABORT,
        FinishReason::Error => FINISH_SEVERITY_ERROR,
    }
}

/// `decode()`, with a panic in the decoder (a bug) turned into a decode error: a malformed
/// frame is logged and dropped, never the end of the link.
fn decode_guarded<T>(decode: impl FnOnce() -> Result<T, shoal_wire::DecodeError>) -> Result<T, shoal_wire::DecodeError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
        .unwrap_or_else(|_| Err(shoal_wire::DecodeError("the decoder panicked".to_string())))
}

/// The file of an `ipc://` address (None: another transport or an abstract socket).
fn ipc_path(address: &str) -> Option<&str> {
    address.strip_prefix("ipc://").filter(|p| !p.is_empty() && !p.starts_with('@'))
}

impl State {
    fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take the whole link down with it.
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unavailable_reason(&self) -> Option<String> {
        if let Some(reason) = &self.dead_reason {
            return Some(reason.clone());
        }
        if self.shutting_down {
            return Some("the server is shutting down".to_string());
        }
        None
    }

    /// The least loaded engine position: coordinator counts + own in-flight; ties round-robin.
    fn pick(&mut self) -> usize {
        let n = self.in_flight.len();
        let (mut best, mut best_score) = (0, i64::MAX);
        for offset in 0..n {
            let k = (self.next_engine + offset) % n;
            let (waiting, running) = self.dp_loads[k];
            let score = WAITING_WEIGHT * waiting + running + self.in_flight[k] as i64;
            if score < best_score {
                best = k;
                best_score = score;
            }
        }
        self.next_engine = (best + 1) % n;
        best
    }

    /// Drop sequence `id`; when it was its request's last, the request's record (if any).
    fn end_seq(&mut self, id: &str, severity: usize, wall: f64) -> Option<FinishedRecord> {
        let seq = self.seqs.remove(id)?;
        self.in_flight[seq.engine] = self.in_flight[seq.engine].saturating_sub(1);
        let parent = self.parents.get_mut(&seq.parent)?;
        parent.num_left = parent.num_left.saturating_sub(1);
        parent.reason = parent.reason.max(severity);
        parent.num_generated += seq.num_generated;
        parent.max_generated = parent.max_generated.max(seq.num_generated);
        if seq.num_generated > 1 {
            if let (Some(first), Some(last)) = (seq.first_output, seq.last_output) {
                parent.tpot_s = Some(last.duration_since(first).as_secs_f64() / (seq.num_generated - 1) as f64);
            }
        }
        if parent.num_left > 0 {
            return None;
        }
        let p = self.parents.remove(&seq.parent)?;
        Some(FinishedRecord {
            engine: p.engine,
            reason: p.reason,
            e2e_s: (wall - p.arrival_wall).max(0.0),
            num_prompt_tokens: p.num_prompt_tokens,
            num_generated: p.num_generated,
            max_generated: p.max_generated,
            n: p.n,
            max_tokens: p.max_tokens,
            tpot_s: p.tpot_s,
            phase_times: p.phase_times,
        })
    }

    /// Fail every pending sequence with `reason` (counted as finish reason `severity`).
    fn fail_all(&mut self, reason: &str, severity: usize) -> Vec<FinishedRecord> {
        let wall = wall_now();
        let ids: Vec<String> = self.seqs.keys().cloned().collect();
        let mut records = Vec::new();
        for id in ids {
            if let Some(seq) = self.seqs.get(&id) {
                let _ = seq.tx.send(EngineEvent::Failed(reason.to_string()));
            }
            records.extend(self.end_seq(&id, severity, wall));
        }
        records
    }
}

impl Shared {
    fn record(&self, records: Vec<FinishedRecord>) {
        if let Some(metrics) = self.metrics.get() {
            for r in &records {
                metrics.request_finished(r);
            }
        }
    }

    /// The link is dead for good (no restarts in v1): fail everything pending.
    fn mark_dead(&self, reason: String) {
        let records = {
            let mut st = State::lock(&self.state);
            if st.dead_reason.is_some() || st.shutting_down {
                return;
            }
            log_error!("{}: failing {} in-flight request(s)", reason, st.seqs.len());
            st.dead_reason = Some(reason.clone());
            st.fail_all(&reason, FINISH_SEVERITY_ERROR)
        };
        self.record(records);
        // Wake `wait_ready` so that start-up fails now rather than at its deadline.
        self.ready_tx.send_modify(|_| {});
    }
}

impl EngineLink {
    /// Bind ROUTER + PULL, connect the stats SUB, start the socket thread.
    pub fn start(cfg: LinkConfig) -> Result<Arc<EngineLink>, String> {
        if cfg.engine_count == 0 {
            return Err("--engine-count: must be at least 1".to_string());
        }
        if cfg.engine_start_index + cfg.engine_count > cfg.data_parallel_size {
            return Err(format!(
                "--engine-start-index {} + --engine-count {} exceeds --data-parallel-size {}",
                cfg.engine_start_index, cfg.engine_count, cfg.data_parallel_size
            ));
        }
        let secret = std::env::var("SHOAL_ENGINE_SECRET").unwrap_or_default();
        let tcp = [&cfg.input_address, &cfg.output_address].iter().any(|a| a.starts_with("tcp://"))
            || cfg.coordinator_address.as_deref().map_or(false, |a| a.starts_with("tcp://"));
        if !secret.is_empty() && tcp {
            return Err("SHOAL_ENGINE_SECRET (CURVE on tcp:// engine links) is not supported by the \
                        native frontend yet; use ipc:// addresses or unset it"
                .to_string());
        }
        let sockets = Sockets::open(&cfg)?;
        // SAFETY: plain syscall; the fd is owned by the link and closed in Drop.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
        }
        let n = cfg.engine_count;
        let (ready_tx, _) = watch::channel(0usize);
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(State {
                ready: vec![None; n],
                num_ready: 0,
                dead_reason: None,
                shutting_down: false,
                in_flight: vec![0; n],
                stats: vec![None; n],
                dp_loads: vec![(0, 0); n],
                next_engine: 0,
                seqs: HashMap::new(),
                parents: HashMap::new(),
                next_parent: 0,
            }),
            metrics: OnceLock::new(),
            ready_tx,
        });
        let (tx, rx) = mpsc::channel();
        let wake_pending = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            shared: shared.clone(),
            sockets,
            commands: rx,
            wake_fd,
            wake_pending: wake_pending.clone(),
            live_fds: Vec::new(),
        };
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("engine-link".to_string())
            .spawn(move || {
                // A bug here must fail the requests, not leave them waiting forever.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())).is_err() {
                    thread_shared.mark_dead("the engine link thread failed (a bug: see the log)".to_string());
                }
            })
            .map_err(|e| format!("could not start the engine-link thread: {e}"))?;
        Ok(Arc::new(EngineLink {
            shared,
            commands: tx,
            wake_fd,
            wake_pending,
            thread: Mutex::new(Some(thread)),
            shut_down: AtomicBool::new(false),
        }))
    }

    /// Record request metrics into `metrics` from now on (set once, after the engines are
    /// ready and the model name is known).
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.shared.metrics.set(metrics);
    }

    fn global(&self, position: usize) -> usize {
        self.shared.cfg.engine_start_index + position
    }

    /// Wait until every engine sent EngineReady; `Err` names the missing engines after
    /// `timeout`, or says why the link died meanwhile.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let n = self.shared.cfg.engine_count;
        let mut rx = self.shared.ready_tx.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if *rx.borrow_and_update() >= n {
                    return Ok(());
                }
                if let Some(reason) = self.unavailable_reason() {
                    return Err(reason);
                }
                if rx.changed().await.is_err() {
                    return Err("the engine link stopped".to_string());
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => {
                let st = State::lock(&self.shared.state);
                let missing: Vec<String> = (0..n)
                    .filter(|&k| st.ready[k].is_none())
                    .map(|k| self.global(k).to_string())
                    .collect();
                Err(format!(
                    "timed out after {:.1}s waiting for engine(s) [{}] to report ready (raise \
                     --engine-ready-timeout or SHOAL_ENGINE_READY_TIMEOUT_S)",
                    timeout.as_secs_f64(),
                    missing.join(", ")
                ))
            }
        }
    }

    /// The engines' EngineReady, by position (only those that reported so far).
    pub fn engines(&self) -> Vec<EngineReady> {
        State::lock(&self.shared.state).ready.iter().flatten().cloned().collect()
    }

    /// The smallest context length among the engines (0 before any is ready).
    pub fn max_model_len(&self) -> usize {
        self.engines().iter().map(|e| e.max_model_len.max(0) as usize).min().unwrap_or(0)
    }

    /// The model's vocabulary size as the engines reported it (None: none did).
    pub fn vocab_size(&self) -> Option<usize> {
        self.engines().iter().filter(|e| e.vocab_size > 0).map(|e| e.vocab_size as usize).min()
    }

    /// Why no request can be served now (an engine died, or shutting down); None: serving.
    pub fn unavailable_reason(&self) -> Option<String> {
        State::lock(&self.shared.state).unavailable_reason()
    }

    /// Send the sequences of one API request (n > 1: its children) to the least-loaded live
    /// engine; one receiver per request, in order. `Err` (nothing sent) when no engine can
    /// serve or an id is already in flight.
    pub fn submit(
        &self,
        reqs: Vec<EngineCoreRequest>,
    ) -> Result<Vec<UnboundedReceiver<EngineEvent>>, String> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        // Encode outside the lock (the costly part).
        let payloads: Vec<(String, Vec<u8>)> = reqs.iter().map(|r| (r.request_id.clone(), r.encode())).collect();
        let first = &reqs[0];
        let wall = wall_now();
        // TTFT / e2e count from the request's arrival_time when it is a plausible wall-clock
        // time (as the Python server's), else from now.
        let arrival_wall =
            if first.arrival_time > 0.0 && first.arrival_time <= wall && wall - first.arrival_time < 3600.0 {
                first.arrival_time
            } else {
                wall
            };
        let mut receivers = Vec::with_capacity(reqs.len());
        let engine = {
            let mut st = State::lock(&self.shared.state);
            if let Some(reason) = st.unavailable_reason() {
                return Err(reason);
            }
            if let Some((id, _)) = payloads.iter().find(|(id, _)| st.seqs.contains_key(id)) {
                return Err(format!("request id {id:?} is already in flight"));
            }
            let engine = st.pick();
            let parent_id = st.next_parent;
            st.next_parent += 1;
            st.parents.insert(
                parent_id,
                Parent {
                    engine,
                    arrival_wall,
                    num_prompt_tokens: first.prompt_token_ids.len() as u64,
                    n: reqs.len() as u64,
                    max_tokens: first.sampling_params.max_tokens.unwrap_or(0).max(0) as u64,
                    num_left: reqs.len() as u64,
                    has_first_token: false,
                    num_generated: 0,
                    max_generated: 0,
                    reason: 0,
                    tpot_s: None,
                    phase_times: None,
                },
            );
            for (id, _) in &payloads {
                let (tx, rx) = unbounded_channel();
                st.seqs.insert(
                    id.clone(),
                    Seq {
                        engine,
                        tx,
                        parent: parent_id,
                        first_output: None,
                        last_output: None,
                        num_generated: 0,
                        stopped: false,
                    },
                );
                st.in_flight[engine] += 1;
                receivers.push(rx);
            }
            engine
        };
        self.send(Command::Add { engine, requests: payloads });
        Ok(receivers)
    }

    /// Abort engine requests (ids not in flight are ignored); never fails. Their
    /// registrations end when the engine's final (ABORT) output arrives.
    pub fn abort(&self, request_ids: Vec<String>) {
        self.abort_ids(request_ids, false);
    }

    /// Abort engine requests that the frontend ended on a stop string: as `abort`, but the
    /// engine's final ABORT output counts them as finished_reason "stop" in the metrics
    /// (as the Python server counts them).
    pub fn abort_stopped(&self, request_ids: Vec<String>) {
        self.abort_ids(request_ids, true);
    }

    fn abort_ids(&self, request_ids: Vec<String>, stopped: bool) {
        let mut by_engine: HashMap<usize, Vec<String>> = HashMap::new();
        {
            let mut st = State::lock(&self.shared.state);
            if st.dead_reason.is_some() {
                return;
            }
            for id in request_ids {
                if let Some(seq) = st.seqs.get_mut(&id) {
                    seq.stopped |= stopped;
                    by_engine.entry(seq.engine).or_default().push(id);
                }
            }
        }
        for (engine, ids) in by_engine {
            let payload = AbortRequest { request_ids: ids }.encode();
            self.send(Command::Abort { engine, payload });
        }
    }

    /// Abort every request in flight in its engine and fail its waiter with `reason`
    /// (the drain deadline); counted as aborted.
    pub fn fail_all(&self, reason: &str) {
        self.abort_everything(reason, false);
    }

    fn abort_everything(&self, reason: &str, shutting_down: bool) {
        let (by_engine, records) = {
            let mut st = State::lock(&self.shared.state);
            st.shutting_down |= shutting_down;
            let mut by_engine: HashMap<usize, Vec<String>> = HashMap::new();
            if st.dead_reason.is_none() {
                for (id, seq) in &st.seqs {
                    by_engine.entry(seq.engine).or_default().push(id.clone());
                }
            }
            (by_engine, st.fail_all(reason, FINISH_SEVERITY_ABORT))
        };
        self.shared.record(records);
        for (engine, ids) in by_engine {
            log_info!("aborting {} request(s) in engine {}", ids.len(), self.global(engine));
            self.send(Command::Abort { engine, payload: AbortRequest { request_ids: ids }.encode() });
        }
    }

    /// Per engine: last SchedulerStats, requests in flight, readiness and health.
    pub fn snapshot(&self) -> EngineSnapshot {
        let st = State::lock(&self.shared.state);
        let alive = st.dead_reason.is_none();
        EngineSnapshot {
            engines: (0..self.shared.cfg.engine_count)
                .map(|k| EngineState {
                    index: self.global(k),
                    ready: st.ready[k].is_some(),
                    alive,
                    in_flight: st.in_flight[k],
                    stats: st.stats[k].clone(),
                })
                .collect(),
            unavailable_reason: st.unavailable_reason(),
        }
    }

    /// Fail what is pending, close the sockets (thread joined) and unlink the IPC socket
    /// files of both bound addresses. Idempotent.
    pub fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Aborts go out before the thread closes the sockets (commands run in order).
        self.abort_everything("the server is shutting down", true);
        self.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        for address in [&self.shared.cfg.input_address, &self.shared.cfg.output_address] {
            if let Some(path) = ipc_path(address) {
                let _ = std::fs::remove_file(path);
            }
        }
        log_debug!("engine link closed");
    }

    fn send(&self, command: Command) {
        if self.commands.send(command).is_err() {
            return; // the thread is gone (shut down): nothing to deliver to
        }
        // Wake the thread unless a wake-up is already pending (it clears the flag before
        // draining the channel, so a command queued after that writes again).
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.wake_fd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

impl Drop for EngineLink {
    fn drop(&mut self) {
        self.shutdown();
        // SAFETY: the fd is ours and the thread that polled it has been joined.
        unsafe { libc::close(self.wake_fd) };
    }
}

struct Sockets {
    _ctx: zmq::Context,
    router: zmq::Socket,
    pull: zmq::Socket,
    sub: Option<zmq::Socket>,
    monitor: zmq::Socket,
}

impl Sockets {
    fn open(cfg: &LinkConfig) -> Result<Sockets, String> {
        let ctx = zmq::Context::new();
        let err = |what: &str, e: zmq::Error| format!("{what}: {e}");
        let router = ctx.socket(zmq::ROUTER).map_err(|e| err("ROUTER socket", e))?;
        // Unroutable sends fail (EHOSTUNREACH) instead of vanishing.
        router.set_router_mandatory(true).map_err(|e| err("ROUTER_MANDATORY", e))?;
        router.set_sndhwm(0).map_err(|e| err("SNDHWM", e))?;
        router.set_linger(0).map_err(|e| err("LINGER", e))?;
        let monitor_endpoint = format!("inproc://shoal-frontend-monitor-{}", std::process::id());
        let events = (zmq::SocketEvent::ACCEPTED as u16 | zmq::SocketEvent::DISCONNECTED as u16) as i32;
        router.monitor(&monitor_endpoint, events).map_err(|e| err("ROUTER monitor", e))?;
        let monitor = ctx.socket(zmq::PAIR).map_err(|e| err("monitor socket", e))?;
        monitor.set_linger(0).map_err(|e| err("LINGER", e))?;
        monitor.connect(&monitor_endpoint).map_err(|e| err("monitor connect", e))?;
        if cfg.input_address.starts_with("tcp://[") {
            router.set_ipv6(true).map_err(|e| err("IPV6", e))?;
        }
        router
            .bind(&cfg.input_address)
            .map_err(|e| format!("--input-address {}: cannot bind: {e}", cfg.input_address))?;
        let pull = ctx.socket(zmq::PULL).map_err(|e| err("PULL socket", e))?;
        pull.set_rcvhwm(0).map_err(|e| err("RCVHWM", e))?;
        pull.set_linger(0).map_err(|e| err("LINGER", e))?;
        if cfg.output_address.starts_with("tcp://[") {
            pull.set_ipv6(true).map_err(|e| err("IPV6", e))?;
        }
        pull.bind(&cfg.output_address)
            .map_err(|e| format!("--output-address {}: cannot bind: {e}", cfg.output_address))?;
        let sub = match &cfg.coordinator_address {
            Some(address) if !address.is_empty() => {
                let sub = ctx.socket(zmq::SUB).map_err(|e| err("SUB socket", e))?;
                sub.set_subscribe(b"").map_err(|e| err("SUBSCRIBE", e))?;
                sub.set_linger(0).map_err(|e| err("LINGER", e))?;
                if address.starts_with("tcp://[") {
                    sub.set_ipv6(true).map_err(|e| err("IPV6", e))?;
                }
                sub.connect(address)
                    .map_err(|e| format!("--coordinator-address {address}: cannot connect: {e}"))?;
                Some(sub)
            }
            _ => None,
        };
        Ok(Sockets { _ctx: ctx, router, pull, sub, monitor })
    }
}

/// The socket thread.
struct Worker {
    shared: Arc<Shared>,
    sockets: Sockets,
    commands: mpsc::Receiver<Command>,
    wake_fd: RawFd,
    wake_pending: Arc<AtomicBool>,
    /// Connection fds the monitor saw accepted and not yet disconnected.
    live_fds: Vec<u32>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let (wake, router, pull, monitor, sub) = {
                let s = &self.sockets;
                // Without a coordinator the last slot repeats the eventfd (never read as SUB).
                let mut items = [
                    zmq::PollItem::from_fd(self.wake_fd, zmq::POLLIN),
                    s.router.as_poll_item(zmq::POLLIN),
                    s.pull.as_poll_item(zmq::POLLIN),
                    s.monitor.as_poll_item(zmq::POLLIN),
                    match &s.sub {
                        Some(sub) => sub.as_poll_item(zmq::POLLIN),
                        None => zmq::PollItem::from_fd(self.wake_fd, zmq::POLLIN),
                    },
                ];
                let has_sub = s.sub.is_some();
                if let Err(e) = zmq::poll(&mut items, -1) {
                    if e == zmq::Error::EINTR {
                        continue;
                    }
                    log_error!("engine link poll failed: {e}");
                    self.shared.mark_dead(format!("the engine link failed: {e}"));
                    return;
                }
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                    items[3].is_readable(),
                    has_sub && items[4].is_readable(),
                )
            };
            if pull {
                self.drain_outputs();
            }
            if wake && !self.drain_commands() {
                return; // shutdown
            }
            if router {
                self.drain_router();
            }
            if monitor {
                self.drain_monitor();
            }
            if sub {
                self.drain_stats();
            }
        }
    }

    /// Handle queued commands; false on shutdown.
    fn drain_commands(&mut self) -> bool {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf` from our non-blocking eventfd.
        unsafe { libc::read(self.wake_fd, buf.as_mut_ptr() as *mut libc::c_void, 8) };
        // An RMW (not a plain store): it acquires from every producer's swap, so each command
        // queued before a producer saw the flag set is visible to the drain below.
        self.wake_pending.swap(false, Ordering::AcqRel);
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Add { engine, requests } => self.send_adds(engine, requests),
                Command::Abort { engine, payload } => {
                    let identity = self.identity(engine);
                    if let Err(e) = self.sockets.router.send_multipart(
                        [&identity[..], &[shoal_wire::REQUEST_ABORT][..], &payload[..]],
                        0,
                    ) {
                        log_debug!("abort for engine {} not sent: {e}", self.global(engine));
                    }
                }
                Command::Shutdown => {
                    // Let the aborts just queued reach the engines.
                    let _ = self.sockets.router.set_linger(200);
                    return false;
                }
            }
        }
        true
    }

    fn global(&self, position: usize) -> usize {
        self.shared.cfg.engine_start_index + position
    }

    fn identity(&self, position: usize) -> [u8; 2] {
        shoal_wire::engine_identity(self.global(position) as u16)
    }

    fn send_adds(&mut self, engine: usize, requests: Vec<(String, Vec<u8>)>) {
        let identity = self.identity(engine);
        for (id, payload) in &requests {
            let sent = self
                .sockets
                .router
                .send_multipart([&identity[..], &[shoal_wire::REQUEST_ADD][..], &payload[..]], 0);
            if let Err(e) = sent {
                // ROUTER_MANDATORY: the engine's connection is gone.
                let reason = format!("engine {} is unreachable: {e} (request {id})", self.global(engine));
                self.shared.mark_dead(reason);
                return;
            }
        }
    }

    fn drain_outputs(&mut self) {
        // Received into a zmq message (no copy into a fresh Vec per frame; a frame of a
        // 64-request step is a few KiB, and such allocations were a visible cost here).
        let mut frame = zmq::Message::new();
        for _ in 0..MAX_BATCH {
            match self.sockets.pull.recv(&mut frame, zmq::DONTWAIT) {
                Ok(()) => self.handle_output_frame(&frame),
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    log_error!("output socket receive failed: {e}");
                    return;
                }
            }
        }
    }

    fn handle_output_frame(&mut self, frame: &[u8]) {
        if frame.starts_with(shoal_wire::ENGINE_CORE_DEAD) {
            self.dead_notice(frame);
            return;
        }
        let outputs = match decode_guarded(|| EngineCoreOutputs::decode(frame)) {
            Ok(outputs) => outputs,
            Err(e) => {
                log_error!("dropped a malformed engine output frame: {e}");
                return;
            }
        };
        let start = self.shared.cfg.engine_start_index as i64;
        let position = outputs.engine_index - start;
        let position = if position >= 0 && (position as usize) < self.shared.cfg.engine_count {
            Some(position as usize)
        } else {
            None
        };
        let metrics = self.shared.metrics.get();
        let now = Instant::now();
        let wall = wall_now();
        let mut st = State::lock(&self.shared.state);
        if let (Some(k), Some(stats)) = (position, outputs.scheduler_stats) {
            st.stats[k] = Some(stats);
        }
        // Metrics are recorded before the output is handed over, so that a client that has
        // its last token sees it counted in /metrics.
        for output in outputs.outputs {
            let finish = output.finish_reason;
            let num_new = output.new_token_ids.len() as u64;
            let Some(seq) = st.seqs.get_mut(output.request_id.as_str()) else {
                continue; // not ours (any more): dropped
            };
            let engine = seq.engine;
            let parent_id = seq.parent;
            let mut first_of_seq = false;
            if num_new > 0 {
                first_of_seq = seq.first_output.is_none();
                if let Some(m) = &metrics {
                    m.tokens(engine, num_new);
                    if let (false, Some(last)) = (first_of_seq, seq.last_output) {
                        m.inter_token(engine, now.duration_since(last).as_secs_f64());
                    }
                }
                if first_of_seq {
                    seq.first_output = Some(now);
                }
                seq.last_output = Some(now);
                seq.num_generated += num_new;
            }
            if finish.is_none() && !first_of_seq {
                // The common case (one more token of a running sequence): hand it over.
                // The waiter may be gone (client disconnected): its abort is on the way.
                let _ = seq.tx.send(EngineEvent::Output(output));
                continue;
            }
            // Ended by the frontend on a stop string: the engine's ABORT is that stop.
            let stopped = seq.stopped;
            if first_of_seq {
                if let Some(parent) = st.parents.get_mut(&parent_id) {
                    if !parent.has_first_token {
                        parent.has_first_token = true;
                        if let Some(m) = &metrics {
                            m.first_token(engine, (wall - parent.arrival_wall).max(0.0), parent.num_prompt_tokens);
                        }
                    }
                }
            }
            let Some(reason) = finish else {
                if let Some(seq) = st.seqs.get(output.request_id.as_str()) {
                    let _ = seq.tx.send(EngineEvent::Output(output));
                }
                continue;
            };
            if reason == FinishReason::Error {
                log_warn!("request {} failed in engine {}", output.request_id, self.global(engine));
            }
            if let (Some(t), Some(parent)) = (&output.phase_times, st.parents.get_mut(&parent_id)) {
                parent.phase_times = Some((t.queue_s, t.prefill_s, t.decode_s));
            }
            let severity = if stopped && reason != FinishReason::Error {
                finish_severity(FinishReason::Stop)
            } else {
                finish_severity(reason)
            };
            let tx = st.seqs.get(output.request_id.as_str()).map(|seq| seq.tx.clone());
            if let (Some(record), Some(m)) = (st.end_seq(&output.request_id, severity, wall), &metrics) {
                m.request_finished(&record);
            }
            if let Some(tx) = tx {
                let _ = tx.send(EngineEvent::Output(output));
            }
        }
    }

    fn dead_notice(&mut self, frame: &[u8]) {
        let count = self.shared.cfg.engine_count as i64;
        let start = self.shared.cfg.engine_start_index as i64;
        let reason = match decode_guarded(|| shoal_wire::decode_engine_dead(frame)) {
            Ok(Some(notice)) if notice.engine_index >= start && notice.engine_index < start + count => {
                let mut reason = format!("engine {} died", notice.engine_index);
                if !notice.reason.is_empty() {
                    reason.push_str(&format!(" ({})", notice.reason));
                }
                reason
            }
            Ok(_) => "an engine core died (ENGINE_CORE_DEAD)".to_string(),
            Err(e) => {
                log_error!("malformed dead notice ({e}): treating it as an unknown engine's");
                "an engine core died (ENGINE_CORE_DEAD)".to_string()
            }
        };
        self.shared.mark_dead(reason);
    }

    fn drain_router(&mut self) {
        loop {
            let frames = match self.sockets.router.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(e) => {
                    log_error!("input socket receive failed: {e}");
                    return;
                }
            };
            if frames.len() != 2 {
                log_warn!("ignored a {}-frame message on the input socket", frames.len());
                continue;
            }
            let ready = match decode_guarded(|| EngineReady::decode(&frames[1])) {
                Ok(ready) => ready,
                Err(e) => {
                    log_warn!("ignored a malformed message on the input socket: {e}");
                    continue;
                }
            };
            self.engine_ready(&frames[0], ready);
        }
    }

    fn engine_ready(&mut self, identity: &[u8], ready: EngineReady) {
        let start = self.shared.cfg.engine_start_index as i64;
        let k = ready.engine_index - start;
        if k < 0 || k as usize >= self.shared.cfg.engine_count {
            log_warn!("ignored EngineReady of engine {} (not one of ours)", ready.engine_index);
            return;
        }
        if identity != shoal_wire::engine_identity(ready.engine_index as u16) {
            log_warn!("ignored EngineReady of engine {} sent from another engine's identity", ready.engine_index);
            return;
        }
        let k = k as usize;
        let num_ready = {
            let mut st = State::lock(&self.shared.state);
            if st.ready[k].is_some() {
                // v1 has no engine restarts: a second EngineReady changes nothing.
                log_warn!("engine {} reported ready again (engine restarts are not supported)", ready.engine_index);
                return;
            }
            log_debug!("engine {} ready (max_model_len {})", ready.engine_index, ready.max_model_len);
            st.ready[k] = Some(ready);
            st.num_ready += 1;
            st.num_ready
        };
        if num_ready == self.shared.cfg.engine_count {
            log_info!("all {} engine(s) ready", num_ready);
        }
        self.shared.ready_tx.send_replace(num_ready);
    }

    fn drain_monitor(&mut self) {
        loop {
            let frames = match self.sockets.monitor.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(_) => return,
            };
            // libzmq's monitor event: [u16 event, u32 value (the connection's fd)], endpoint.
            let Some(head) = frames.first().filter(|f| f.len() >= 6) else { continue };
            let event = u16::from_ne_bytes([head[0], head[1]]);
            let fd = u32::from_ne_bytes([head[2], head[3], head[4], head[5]]);
            if event == zmq::SocketEvent::ACCEPTED as u16 {
                self.live_fds.push(fd);
            } else if event == zmq::SocketEvent::DISCONNECTED as u16 {
                let Some(i) = self.live_fds.iter().position(|&f| f == fd) else { continue };
                self.live_fds.swap_remove(i);
                let count = self.shared.cfg.engine_count;
                let all_ready = State::lock(&self.shared.state).num_ready == count;
                // An engine holds one connection here; fewer live connections than engines
                // once all are ready: one went away.
                if all_ready && self.live_fds.len() < count {
                    self.shared.mark_dead("lost the connection to an engine core (process died?)".to_string());
                }
            }
        }
    }

    fn drain_stats(&mut self) {
        let Some(sub) = &self.sockets.sub else { return };
        loop {
            let frame = match sub.recv_bytes(zmq::DONTWAIT) {
                Ok(frame) => frame,
                Err(_) => return,
            };
            let stats = match decode_guarded(|| DPStats::decode(&frame)) {
                Ok(stats) => stats,
                Err(e) => {
                    log_warn!("dropped a malformed DPStats frame: {e}");
                    continue;
                }
            };
            if stats.loads.len() != self.shared.cfg.data_parallel_size {
                continue;
            }
            let start = self.shared.cfg.engine_start_index;
            let mut st = State::lock(&self.shared.state);
            for k in 0..self.shared.cfg.engine_count {
                if let Some(&(waiting, running)) = stats.loads.get(start + k) {
                    st.dp_loads[k] = (waiting, running);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The link against fake engines: DEALERs that send EngineReady and PUSH outputs.
    use super::*;
    use shoal_wire::{EngineCoreOutput, RequestPhaseTimes, SamplingParams};

    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Fresh IPC addresses under a temporary directory (removed by `Dir::drop`).
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(engines: usize, coordinator: bool) -> (LinkConfig, Dir) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("shoal-link-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let address = |name: &str| format!("ipc://{}", dir.join(name).display());
        let cfg = LinkConfig {
            input_address: address("in"),
            output_address: address("out"),
            coordinator_address: if coordinator { Some(address("stats")) } else { None },
            engine_start_index: 0,
            engine_count: engines,
            data_parallel_size: engines,
        };
        (cfg, Dir(dir))
    }

    struct FakeEngine {
        dealer: zmq::Socket,
        push: zmq::Socket,
        index: i64,
    }

    impl FakeEngine {
        fn connect(ctx: &zmq::Context, cfg: &LinkConfig, index: i64) -> FakeEngine {
            let dealer = ctx.socket(zmq::DEALER).unwrap();
            dealer.set_identity(&shoal_wire::engine_identity(index as u16)).unwrap();
            dealer.set_linger(0).unwrap();
            dealer.connect(&cfg.input_address).unwrap();
            let push = ctx.socket(zmq::PUSH).unwrap();
            push.set_linger(0).unwrap();
            push.connect(&cfg.output_address).unwrap();
            let ready = EngineReady {
                engine_index: index,
                max_model_len: 256 + index,
                num_blocks: 64,
                block_size: 16,
                model_name: "tiny".to_string(),
                vocab_size: 1000,
                hidden_size: 64,
            };
            dealer.send(ready.encode(), 0).unwrap();
            FakeEngine { dealer, push, index }
        }

        /// The next [type, payload] the frontend sent (2 s at most).
        fn recv(&self) -> (u8, Vec<u8>) {
            assert!(self.dealer.poll(zmq::POLLIN, 2000).unwrap() > 0, "engine {} got nothing", self.index);
            let frames = self.dealer.recv_multipart(0).unwrap();
            assert_eq!(frames.len(), 2, "{frames:?}");
            (frames[0][0], frames[1].clone())
        }

        fn quiet(&self, ms: i64) -> bool {
            self.dealer.poll(zmq::POLLIN, ms).unwrap() == 0
        }

        fn send_outputs(&self, outputs: Vec<EngineCoreOutput>, stats: Option<SchedulerStats>) {
            let message = EngineCoreOutputs {
                engine_index: self.index,
                outputs,
                scheduler_stats: stats,
                timestamp: 1.0,
                utility_output: None,
            };
            self.push.send(message.encode(), 0).unwrap();
        }
    }

    fn output(id: &str, tokens: Vec<u32>, finish: Option<FinishReason>) -> EngineCoreOutput {
        EngineCoreOutput {
            request_id: id.to_string(),
            new_token_ids: tokens,
            new_logprobs: None,
            finish_reason: finish,
            stop_reason: None,
            num_cached_tokens: 0,
            phase_times: finish.map(|_| RequestPhaseTimes { queue_s: 0.01, prefill_s: 0.02, decode_s: 0.03 }),
            prompt_logprobs: None,
            embedding: vec![],
        }
    }

    fn request(id: &str) -> EngineCoreRequest {
        EngineCoreRequest {
            request_id: id.to_string(),
            prompt_token_ids: vec![1, 2, 3],
            sampling_params: SamplingParams::default(),
            eos_token_id: Some(2),
            arrival_time: wall_now(),
            client_index: 0,
            has_prompt_embeds: false,
        }
    }

    async fn next(rx: &mut UnboundedReceiver<EngineEvent>) -> EngineEvent {
        tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("no event in 2 s").expect("closed")
    }

    async fn started(engines: usize) -> (Arc<EngineLink>, Vec<FakeEngine>, zmq::Context, Dir) {
        let (cfg, dir) = config(engines, false);
        let link = EngineLink::start(cfg.clone()).unwrap();
        let ctx = zmq::Context::new();
        let fakes: Vec<FakeEngine> = (0..engines as i64).map(|k| FakeEngine::connect(&ctx, &cfg, k)).collect();
        link.wait_ready(Duration::from_secs(5)).await.unwrap();
        (link, fakes, ctx, dir)
    }

    #[tokio::test]
    async fn ready_submit_outputs_finish_and_metrics() {
        let (link, fakes, _ctx, dir) = started(1).await;
        assert_eq!(link.max_model_len(), 256);
        assert_eq!(link.vocab_size(), Some(1000));
        assert_eq!(link.engines().len(), 1);
        let metrics = Arc::new(Metrics::new("tiny", vec![0]));
        link.set_metrics(metrics.clone());
        let mut rxs = link.submit(vec![request("r1")]).unwrap();
        let (kind, payload) = fakes[0].recv();
        assert_eq!(kind, shoal_wire::REQUEST_ADD);
        assert_eq!(EngineCoreRequest::decode(&payload).unwrap(), request_with_time("r1", &payload));
        assert_eq!(link.snapshot().engines[0].in_flight, 1);
        let stats = SchedulerStats { num_running_reqs: 1, kv_cache_usage: 0.5, ..Default::default() };
        fakes[0].send_outputs(vec![output("r1", vec![7], None), output("other", vec![9], None)], Some(stats));
        match next(&mut rxs[0]).await {
            EngineEvent::Output(o) => assert_eq!(o.new_token_ids, vec![7]),
            e => panic!("{e:?}"),
        }
        fakes[0].send_outputs(vec![output("r1", vec![8, 9], Some(FinishReason::Length))], None);
        match next(&mut rxs[0]).await {
            EngineEvent::Output(o) => assert_eq!(o.finish_reason, Some(FinishReason::Length)),
            e => panic!("{e:?}"),
        }
        // Finished: the registration is gone and the sender with it.
        assert!(rxs[0].recv().await.is_none());
        let snapshot = link.snapshot();
        assert_eq!(snapshot.engines[0].in_flight, 0);
        assert_eq!(snapshot.engines[0].stats.as_ref().unwrap().kv_cache_usage, 0.5);
        let text = metrics.render(&link);
        assert!(text.contains("vllm:generation_tokens_total{model_name=\"tiny\",engine=\"0\"} 3\n"), "{text}");
        assert!(text.contains("vllm:prompt_tokens_total{model_name=\"tiny\",engine=\"0\"} 3\n"));
        assert!(text.contains("vllm:request_success_total{model_name=\"tiny\",engine=\"0\",finished_reason=\"length\"} 1\n"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"tiny\",engine=\"0\"} 0.5\n"));
        assert!(text.contains("vllm:time_to_first_token_seconds_count{model_name=\"tiny\",engine=\"0\"} 1\n"));
        assert!(text.contains("vllm:inter_token_latency_seconds_count{model_name=\"tiny\",engine=\"0\"} 1\n"));
        assert!(text.contains("vllm:request_queue_time_seconds_sum{model_name=\"tiny\",engine=\"0\"} 0.01\n"));
        assert!(text.contains("shoal:cache_config_info{model_name=\"tiny\",engine=\"0\",block_size=\"16\",num_gpu_blocks=\"64\"} 1\n"));
        assert!(!text.contains("vllm:kv_cache_blocks_total"), "shoal-only family under vllm:");
        assert!(text.contains("vllm:iteration_tokens_total_count"));
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"tiny\",engine=\"0\"} 0\n"));
        assert!(text.contains("process_open_fds{process=\"RustFrontend\"} "), "{text}");
        link.shutdown();
        assert!(!dir.0.join("in").exists() && !dir.0.join("out").exists(), "IPC files left behind");
        assert!(link.submit(vec![request("late")]).unwrap_err().contains("shutting down"));
    }

    /// `request("r1")` with the arrival time the frontend actually sent.
    fn request_with_time(id: &str, payload: &[u8]) -> EngineCoreRequest {
        let mut r = request(id);
        r.arrival_time = EngineCoreRequest::decode(payload).unwrap().arrival_time;
        r
    }

    #[tokio::test]
    async fn abort_reaches_the_engine_and_malformed_frames_are_dropped() {
        let (link, fakes, _ctx, _dir) = started(1).await;
        let mut rxs = link.submit(vec![request("a"), request("b")]).unwrap();
        assert_eq!(rxs.len(), 2);
        fakes[0].recv();
        fakes[0].recv();
        fakes[0].push.send(&b"\xc1garbage"[..], 0).unwrap();
        link.abort(vec!["a".to_string(), "unknown".to_string()]);
        let (kind, payload) = fakes[0].recv();
        assert_eq!(kind, shoal_wire::REQUEST_ABORT);
        assert_eq!(AbortRequest::decode(&payload).unwrap().request_ids, vec!["a".to_string()]);
        // Still serving after the garbage frame.
        fakes[0].send_outputs(vec![output("a", vec![], Some(FinishReason::Abort))], None);
        match next(&mut rxs[0]).await {
            EngineEvent::Output(o) => assert_eq!(o.finish_reason, Some(FinishReason::Abort)),
            e => panic!("{e:?}"),
        }
        assert!(link.unavailable_reason().is_none());
        assert_eq!(link.snapshot().engines[0].in_flight, 1);
        link.shutdown();
        // Shutdown fails the rest and aborts them in the engine.
        assert!(matches!(next(&mut rxs[1]).await, EngineEvent::Failed(r) if r.contains("shutting down")));
        let (kind, payload) = fakes[0].recv();
        assert_eq!(kind, shoal_wire::REQUEST_ABORT);
        assert_eq!(AbortRequest::decode(&payload).unwrap().request_ids, vec!["b".to_string()]);
    }

    #[tokio::test]
    async fn a_request_ended_on_a_stop_string_counts_as_stop() {
        let (link, fakes, _ctx, _dir) = started(1).await;
        let metrics = Arc::new(Metrics::new("tiny", vec![0]));
        link.set_metrics(metrics.clone());
        // Two API requests (one sequence each).
        let mut rxs = link.submit(vec![request("s")]).unwrap();
        rxs.extend(link.submit(vec![request("a")]).unwrap());
        fakes[0].recv();
        fakes[0].recv();
        fakes[0].send_outputs(vec![output("s", vec![7], None), output("a", vec![8], None)], None);
        next(&mut rxs[0]).await;
        next(&mut rxs[1]).await;
        // "s" ended on a stop string in the frontend; "a" lost its client.
        link.abort_stopped(vec!["s".to_string()]);
        link.abort(vec!["a".to_string()]);
        for id in ["s", "a"] {
            let (kind, payload) = fakes[0].recv();
            assert_eq!(kind, shoal_wire::REQUEST_ABORT);
            assert_eq!(AbortRequest::decode(&payload).unwrap().request_ids, vec![id.to_string()]);
        }
        fakes[0].send_outputs(
            vec![output("s", vec![], Some(FinishReason::Abort)), output("a", vec![], Some(FinishReason::Abort))],
            None,
        );
        next(&mut rxs[0]).await;
        next(&mut rxs[1]).await;
        let text = metrics.render(&link);
        let line = |reason: &str| {
            format!("vllm:request_success_total{{model_name=\"tiny\",engine=\"0\",finished_reason=\"{reason}\"}} 1\n")
        };
        assert!(text.contains(&line("stop")), "{text}");
        assert!(text.contains(&line("abort")), "{text}");
        assert_eq!(link.snapshot().engines[0].in_flight, 0);
    }

    #[tokio::test]
    async fn dead_notice_fails_pending_requests() {
        let (link, fakes, _ctx, _dir) = started(2).await;
        let mut rxs = link.submit(vec![request("x")]).unwrap();
        fakes[0].push.send(shoal_wire::engine_dead_frame(1, "killed"), 0).unwrap();
        match next(&mut rxs[0]).await {
            EngineEvent::Failed(reason) => assert_eq!(reason, "engine 1 died (killed)"),
            e => panic!("{e:?}"),
        }
        assert_eq!(link.unavailable_reason().as_deref(), Some("engine 1 died (killed)"));
        assert!(link.submit(vec![request("y")]).is_err());
    }

    #[tokio::test]
    async fn lost_connection_fails_pending_requests() {
        let (link, mut fakes, _ctx, _dir) = started(1).await;
        let mut rxs = link.submit(vec![request("x")]).unwrap();
        fakes[0].recv();
        drop(fakes.remove(0)); // the engine's sockets close: its connection goes away
        match next(&mut rxs[0]).await {
            EngineEvent::Failed(reason) => assert!(reason.contains("lost the connection"), "{reason}"),
            e => panic!("{e:?}"),
        }
        assert!(link.unavailable_reason().is_some());
    }

    #[tokio::test]
    async fn a_death_during_start_up_ends_the_wait() {
        let (cfg, _dir) = config(2, false);
        let link = EngineLink::start(cfg.clone()).unwrap();
        let ctx = zmq::Context::new();
        let engine = FakeEngine::connect(&ctx, &cfg, 0);
        engine.push.send(shoal_wire::engine_dead_frame(1, "no memory"), 0).unwrap();
        let started = Instant::now();
        let err = link.wait_ready(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(err, "engine 1 died (no memory)");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn ready_timeout_names_the_missing_engines() {
        let (cfg, _dir) = config(2, false);
        let link = EngineLink::start(cfg.clone()).unwrap();
        let ctx = zmq::Context::new();
        let _engine = FakeEngine::connect(&ctx, &cfg, 1);
        let err = link.wait_ready(Duration::from_millis(300)).await.unwrap_err();
        assert!(err.contains("engine(s) [0]"), "{err}");
    }

    #[tokio::test]
    async fn routes_to_the_least_loaded_engine() {
        let (cfg, _dir) = config(2, true);
        let ctx = zmq::Context::new();
        let publisher = ctx.socket(zmq::PUB).unwrap();
        publisher.set_linger(0).unwrap();
        publisher.bind(cfg.coordinator_address.as_deref().unwrap()).unwrap();
        let link = EngineLink::start(cfg.clone()).unwrap();
        let fakes: Vec<FakeEngine> = (0..2).map(|k| FakeEngine::connect(&ctx, &cfg, k)).collect();
        link.wait_ready(Duration::from_secs(5)).await.unwrap();
        // Own in-flight counts, ties round-robin: one each.
        let _a = link.submit(vec![request("a")]).unwrap();
        let _b = link.submit(vec![request("b")]).unwrap();
        assert_eq!(EngineCoreRequest::decode(&fakes[0].recv().1).unwrap().request_id, "a");
        assert_eq!(EngineCoreRequest::decode(&fakes[1].recv().1).unwrap().request_id, "b");
        // The coordinator says engine 0 has a queue: the next two go to engine 1... until
        // the in-flight count evens the score (4 * 1 waiting + 1 = 5 vs 1 + k).
        let stats = DPStats { loads: vec![(1, 0), (0, 0)], timestamp: 1.0 };
        let deadline = Instant::now() + Duration::from_secs(2);
        while link.shared.state.lock().unwrap().dp_loads[0] != (1, 0) {
            // PUB/SUB joins late: publish until the link has it.
            publisher.send(stats.encode(), 0).unwrap();
            assert!(Instant::now() < deadline, "DPStats never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _c = link.submit(vec![request("c")]).unwrap();
        assert_eq!(EngineCoreRequest::decode(&fakes[1].recv().1).unwrap().request_id, "c");
        assert!(fakes[0].quiet(100));
    }
}
