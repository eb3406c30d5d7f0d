//! `/metrics`: the same families, names and labels as the Python API server
//! (shoal/api/metric_families.py, shoal/api/metrics.py), in Prometheus text format 0.0.4.
//!
//! NOTE FOR THE HTTP LAYER: the only recording call you make is `Metrics::request_arrived()`
//! (once per accepted API request, n > 1 counting once, before it is submitted). Everything
//! else (TTFT, inter-token latency, generated/prompt tokens, finish reasons, e2e / queue /
//! prefill / decode times, length histograms) is recorded by the `EngineLink` itself from the
//! engine outputs it routes, because it sees every output first, knows each request's engine
//! and groups the n > 1 children of one `submit()` into one request, exactly as
//! shoal/api/request_metrics.py does. Serve `/metrics` with `Metrics::render(&link)`, or
//! `render_prefixes(&link, &["vllm:"])` for `?prefix=vllm` (`parse_prefix_query` checks it).
//!
//! Every hot-path update is a relaxed atomic: per token it is one counter add plus one
//! histogram observation (a bucket add, a CAS on the f64 sum, a count add).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::EngineLink;

/// The finish reasons in label order (`finished_reason`), by increasing severity.
pub const FINISH_REASONS: [&str; 4] = ["stop", "length", "abort", "error"];
pub const PREFIXES: [&str; 2] = ["vllm:", "shoal:"];

const LATENCY_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const E2E_S: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 320.0,
];
const REQUEST_S: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0,
];
/// 1, 2, 5, 10, ... up to 131072 (metric_families._series(1, 2, 5, upto=131072)).
const TOKENS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    20000.0, 50000.0, 100000.0,
];
const PARAMS_N: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0];
/// shoal.engine.stats.ITERATION_TOKENS_BUCKETS (+Inf follows).
const ITERATION_TOKENS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// One histogram family's description.
struct HistSpec {
    name: &'static str,
    help: &'static str,
    buckets: &'static [f64],
}

// Request histograms, in the order metric_families.REQUEST_METRICS lists them.
const H_TTFT: usize = 0;
const H_ITL: usize = 1;
const H_TPOT: usize = 2;
const H_E2E: usize = 3;
const H_QUEUE: usize = 4;
const H_INFERENCE: usize = 5;
const H_PREFILL: usize = 6;
const H_DECODE: usize = 7;
const H_PROMPT_LEN: usize = 8;
const H_GENERATION_LEN: usize = 9;
const H_MAX_GENERATION_LEN: usize = 10;
const H_PARAMS_N: usize = 11;
const H_PARAMS_MAX_TOKENS: usize = 12;

const HISTOGRAMS: [HistSpec; 13] = [
    HistSpec { name: "time_to_first_token_seconds", help: "Time to first token.", buckets: LATENCY_S },
    HistSpec {
        name: "inter_token_latency_seconds",
        help: "Time between consecutive outputs of a sequence.",
        buckets: LATENCY_S,
    },
    HistSpec {
        name: "time_per_output_token_seconds",
        help: "Mean time per output token after the first, per request.",
        buckets: LATENCY_S,
    },
    HistSpec {
        name: "e2e_request_latency_seconds",
        help: "Time from arrival to finish of a request.",
        buckets: E2E_S,
    },
    HistSpec {
        name: "request_queue_time_seconds",
        help: "Time a request waited in the engine.",
        buckets: REQUEST_S,
    },
    HistSpec {
        name: "request_inference_time_seconds",
        help: "Time from first scheduled to last token in the engine.",
        buckets: REQUEST_S,
    },
    HistSpec {
        name: "request_prefill_time_seconds",
        help: "Time from first scheduled to first token in the engine.",
        buckets: REQUEST_S,
    },
    HistSpec {
        name: "request_decode_time_seconds",
        help: "Time from first to last token in the engine.",
        buckets: REQUEST_S,
    },
    HistSpec { name: "request_prompt_tokens", help: "Prompt tokens per request.", buckets: TOKENS },
    HistSpec {
        name: "request_generation_tokens",
        help: "Generated tokens per request (every sequence).",
        buckets: TOKENS,
    },
    HistSpec {
        name: "request_max_num_generation_tokens",
        help: "Generated tokens of a request's longest sequence.",
        buckets: TOKENS,
    },
    HistSpec { name: "request_params_n", help: "The n parameter of requests.", buckets: PARAMS_N },
    HistSpec {
        name: "request_params_max_tokens",
        help: "The max_tokens of requests.",
        buckets: TOKENS,
    },
];

/// A histogram of plain (non-cumulative) bucket counts, +Inf last; exposition accumulates.
struct Histogram {
    counts: Vec<AtomicU64>,
    sum_bits: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(num_buckets: usize) -> Self {
        Histogram {
            counts: (0..=num_buckets).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, buckets: &[f64], value: f64) {
        // The first bucket whose bound is >= value (bisect_left), else +Inf.
        let i = buckets.partition_point(|&bound| bound < value);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        add_f64(&self.sum_bits, value);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

fn add_f64(cell: &AtomicU64, value: f64) {
    let mut current = cell.load(Ordering::Relaxed);
    loop {
        let new = (f64::from_bits(current) + value).to_bits();
        match cell.compare_exchange_weak(current, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => current = actual,
        }
    }
}

/// One engine's request-level figures (this frontend's requests on that engine).
struct EngineFigures {
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: [AtomicU64; 4],
    histograms: Vec<Histogram>,
}

impl EngineFigures {
    fn new() -> Self {
        EngineFigures {
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            histograms: HISTOGRAMS.iter().map(|h| Histogram::new(h.buckets.len())).collect(),
        }
    }
}

/// What the link knows of a request when its last sequence ends (request_metrics._Request).
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRecord {
    /// Position of the engine in this frontend's engine list (0-based, see `EngineLink`).
    pub engine: usize,
    /// Index into `FINISH_REASONS`: the worst reason among the request's sequences.
    pub reason: usize,
    pub e2e_s: f64,
    pub num_prompt_tokens: u64,
    /// Generated tokens over every sequence, and of the longest one.
    pub num_generated: u64,
    pub max_generated: u64,
    pub n: u64,
    /// The request's max_tokens (0: none).
    pub max_tokens: u64,
    /// Mean time per output token after the first, of the last finished sequence with > 1.
    pub tpot_s: Option<f64>,
    /// Engine phase times of the sequence that finished last (queue, prefill, decode).
    pub phase_times: Option<(f64, f64, f64)>,
}

/// The frontend's metrics (share it as `Arc<Metrics>`).
pub struct Metrics {
    model_name: String,
    /// Global engine index of each engine position (the `engine` label).
    engine_labels: Vec<usize>,
    received: AtomicU64,
    engines: Vec<EngineFigures>,
}

impl Metrics {
    /// `engine_labels[k]`: the global index (label `engine`) of link engine position `k`.
    pub fn new(model_name: &str, engine_labels: Vec<usize>) -> Self {
        let engines = engine_labels.iter().map(|_| EngineFigures::new()).collect();
        Metrics { model_name: model_name.to_string(), engine_labels, received: AtomicU64::new(0), engines }
    }

    /// One API request accepted (HTTP layer, before `submit`; n > 1 counts once).
    pub fn request_arrived(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests accepted so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    fn figures(&self, engine: usize) -> Option<&EngineFigures> {
        self.engines.get(engine)
    }

    /// The request's first token (link): TTFT and its prompt tokens.
    pub(crate) fn first_token(&self, engine: usize, ttft_s: f64, num_prompt_tokens: u64) {
        if let Some(f) = self.figures(engine) {
            f.histograms[H_TTFT].observe(HISTOGRAMS[H_TTFT].buckets, ttft_s);
            f.prompt_tokens.fetch_add(num_prompt_tokens, Ordering::Relaxed);
        }
    }

    /// `n` tokens generated on `engine` (link, once per engine message).
    pub(crate) fn tokens(&self, engine: usize, n: u64) {
        if let Some(f) = self.figures(engine) {
            f.generation_tokens.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// One inter-token gap of a sequence (link).
    pub(crate) fn inter_token(&self, engine: usize, itl_s: f64) {
        if let Some(f) = self.figures(engine) {
            f.histograms[H_ITL].observe(HISTOGRAMS[H_ITL].buckets, itl_s);
        }
    }

    /// A request's last sequence ended (link).
    pub(crate) fn request_finished(&self, r: &FinishedRecord) {
        let Some(f) = self.figures(r.engine) else { return };
        f.finished[r.reason.min(3)].fetch_add(1, Ordering::Relaxed);
        let observe = |h: usize, v: f64| f.histograms[h].observe(HISTOGRAMS[h].buckets, v);
        observe(H_E2E, r.e2e_s);
        observe(H_PROMPT_LEN, r.num_prompt_tokens as f64);
        observe(H_GENERATION_LEN, r.num_generated as f64);
        observe(H_MAX_GENERATION_LEN, r.max_generated as f64);
        observe(H_PARAMS_N, r.n as f64);
        if r.max_tokens > 0 {
            observe(H_PARAMS_MAX_TOKENS, r.max_tokens as f64);
        }
        if let Some(tpot) = r.tpot_s {
            observe(H_TPOT, tpot);
        }
        if let Some((queue, prefill, decode)) = r.phase_times {
            observe(H_QUEUE, queue);
            observe(H_PREFILL, prefill);
            observe(H_DECODE, decode);
            observe(H_INFERENCE, prefill + decode);
        }
    }

    /// The exposition with both name sets (`vllm:` and `shoal:`).
    #[allow(dead_code)] // the HTTP layer calls render_prefixes; kept as the plain entry point
    pub fn render(&self, link: &EngineLink) -> String {
        self.render_prefixes(link, &PREFIXES)
    }

    /// The exposition with the name sets `prefixes` (each "vllm:" or "shoal:").
    pub fn render_prefixes(&self, link: &EngineLink, prefixes: &[&str]) -> String {
        let snapshot = link.snapshot();
        let ready = link.engines();
        let model = format!("model_name=\"{}\"", escape(&self.model_name));
        let mut out = String::with_capacity(64 * 1024);
        for prefix in prefixes {
            let is_vllm = *prefix == "vllm:";
            self.render_requests(&mut out, prefix, &model);
            render_engine_figures(&mut out, prefix, is_vllm, &model, &self.engine_labels, &snapshot);
            let full = format!("{prefix}cache_config_info");
            let _ = writeln!(out, "# HELP {full} The engines' KV-cache configuration (labels; the value is 1).");
            let _ = writeln!(out, "# TYPE {full} gauge");
            for (k, e) in ready.iter().enumerate() {
                let label = self.engine_labels.get(k).copied().unwrap_or(k);
                let _ = writeln!(
                    out,
                    "{full}{{{model},engine=\"{label}\",block_size=\"{}\",num_gpu_blocks=\"{}\"}} 1",
                    e.block_size, e.num_blocks
                );
            }
            if !is_vllm {
                let full = format!("{prefix}requests_received_total");
                let _ = writeln!(out, "# HELP {full} Requests accepted by the API servers (n > 1 counts once).");
                let _ = writeln!(out, "# TYPE {full} counter");
                let _ = writeln!(out, "{full}{{{model}}} {}", self.received());
            }
        }
        out.push_str(&render_process_metrics());
        out
    }

    fn render_requests(&self, out: &mut String, prefix: &str, model: &str) {
        // Order of metric_families.REQUEST_METRICS: the two token counters, the finish
        // counter, then the histograms.
        let counters: [(&str, &str, fn(&EngineFigures) -> u64); 2] = [
            ("prompt_tokens_total", "Prompt tokens of requests served.", |f| {
                f.prompt_tokens.load(Ordering::Relaxed)
            }),
            ("generation_tokens_total", "Generated tokens.", |f| {
                f.generation_tokens.load(Ordering::Relaxed)
            }),
        ];
        for (name, help, get) in counters {
            header(out, prefix, name, help, "counter");
            for (k, f) in self.engines.iter().enumerate() {
                let _ = writeln!(out, "{prefix}{name}{{{model},engine=\"{}\"}} {}", self.engine_labels[k], get(f));
            }
        }
        let name = "request_success_total";
        let help = "Finished requests by finish reason (a request with n > 1 sequences counts once).";
        header(out, prefix, name, help, "counter");
        for (k, f) in self.engines.iter().enumerate() {
            for (i, reason) in FINISH_REASONS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{prefix}{name}{{{model},engine=\"{}\",finished_reason=\"{reason}\"}} {}",
                    self.engine_labels[k],
                    f.finished[i].load(Ordering::Relaxed)
                );
            }
        }
        for (h, spec) in HISTOGRAMS.iter().enumerate() {
            header(out, prefix, spec.name, spec.help, "histogram");
            for (k, f) in self.engines.iter().enumerate() {
                let hist = &f.histograms[h];
                let counts: Vec<f64> = hist.counts.iter().map(|c| c.load(Ordering::Relaxed) as f64).collect();
                let sum = f64::from_bits(hist.sum_bits.load(Ordering::Relaxed));
                let count = hist.count.load(Ordering::Relaxed) as f64;
                let labels = format!("{model},engine=\"{}\"", self.engine_labels[k]);
                histogram_lines(out, &format!("{prefix}{}", spec.name), &labels, spec.buckets, &counts, sum, count);
            }
        }
    }
}

/// The engines' own figures (their last SchedulerStats), as metric_families.ENGINE_FIGURES.
fn render_engine_figures(
    out: &mut String,
    prefix: &str,
    is_vllm: bool,
    model: &str,
    labels: &[usize],
    snapshot: &crate::engine::EngineSnapshot,
) {
    use shoal_wire::SchedulerStats as S;
    type Get = fn(&S) -> f64;
    let figures: [(&str, &str, &str, bool, Get); 13] = [
        ("num_requests_running", "gauge", "Requests running in the engine.", true, |s| s.num_running_reqs as f64),
        ("num_requests_waiting", "gauge", "Requests waiting in the engine.", true, |s| s.num_waiting_reqs as f64),
        ("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).", true, |s| s.kv_cache_usage),
        ("kv_cache_blocks_total", "gauge", "KV-cache blocks of the engine.", false, |s| s.num_blocks_total as f64),
        ("kv_cache_blocks_free", "gauge", "Free KV-cache blocks of the engine.", false, |s| s.num_blocks_free as f64),
        ("iteration_context_requests", "gauge", "Prefill requests in the engine's last step.", false, |s| {
            s.num_ctx_requests as f64
        }),
        ("iteration_context_tokens", "gauge", "Prefill tokens in the engine's last step.", false, |s| {
            s.num_ctx_tokens as f64
        }),
        ("iteration_generation_requests", "gauge", "Generation requests in the engine's last step.", false, |s| {
            s.num_generation_requests as f64
        }),
        ("iteration_generation_tokens", "gauge", "Generation tokens in the engine's last step.", false, |s| {
            s.num_generation_tokens as f64
        }),
        ("preemptions_last_step", "gauge", "Requests preempted in the engine's last step.", false, |s| {
            s.num_preemptions as f64
        }),
        ("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", true, |s| {
            s.prefix_cache_queries_total as f64
        }),
        ("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", true, |s| {
            s.prefix_cache_hits_total as f64
        }),
        ("num_preemptions_total", "counter", "Requests preempted by the engine.", true, |s| {
            s.num_preemptions_total as f64
        }),
    ];
    let empty = S::default();
    let stats_of = |k: usize| snapshot.engines.get(k).and_then(|e| e.stats.as_ref()).unwrap_or(&empty);
    for (name, kind, help, in_vllm, get) in figures {
        if is_vllm && !in_vllm {
            continue;
        }
        header(out, prefix, name, help, kind);
        for (k, label) in labels.iter().enumerate() {
            let _ = writeln!(out, "{prefix}{name}{{{model},engine=\"{label}\"}} {}", fmt(get(stats_of(k))));
        }
    }
    let name = "iteration_tokens_total";
    header(out, prefix, name, "Tokens scheduled per engine step.", "histogram");
    for (k, label) in labels.iter().enumerate() {
        let s = stats_of(k);
        let n = ITERATION_TOKENS.len();
        let counts: Vec<f64> =
            (0..=n).map(|i| s.iteration_tokens_counts.get(i).copied().unwrap_or(0) as f64).collect();
        let count: f64 = s.iteration_tokens_counts.iter().map(|&c| c as f64).sum();
        let labels = format!("{model},engine=\"{label}\"");
        histogram_lines(
            out,
            &format!("{prefix}{name}"),
            &labels,
            ITERATION_TOKENS,
            &counts,
            s.iteration_tokens_sum as f64,
            count,
        );
    }
}

fn header(out: &mut String, prefix: &str, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {prefix}{name} {help}");
    let _ = writeln!(out, "# TYPE {prefix}{name} {kind}");
}

fn histogram_lines(out: &mut String, full: &str, labels: &str, bounds: &[f64], counts: &[f64], sum: f64, count: f64) {
    let mut cumulative = 0.0;
    for (i, value) in counts.iter().enumerate() {
        cumulative += value;
        let le = match bounds.get(i) {
            Some(bound) => python_float_repr(*bound),
            None => "+Inf".to_string(),
        };
        let _ = writeln!(out, "{full}_bucket{{{labels},le=\"{le}\"}} {}", fmt(cumulative));
    }
    let _ = writeln!(out, "{full}_sum{{{labels}}} {}", fmt(sum));
    let _ = writeln!(out, "{full}_count{{{labels}}} {}", fmt(count));
}

/// Python's `repr(float(x))` for the bucket bounds used here ("1.0", "0.005", "131072.0").
fn python_float_repr(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// metrics._fmt: an integer without a fraction, else the shortest repr.
fn fmt(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `process_*` families of shoal/api/process_metrics.py, one sample per shoal process
/// (label `process`): the launcher (our parent) and its children titled `shoal::<role>`,
/// this process as `RustFrontend`; this process alone when the parent is no shoal launcher.
/// Read from /proc (Linux).
pub fn render_process_metrics() -> String {
    const FAMILIES: [(&str, &str, &str); 6] = [
        ("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds."),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
        ("process_start_time_seconds", "gauge", "Start time of the process since the epoch."),
        ("process_open_fds", "gauge", "Number of open file descriptors."),
        ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
    ];
    let rows: Vec<(String, [f64; 6])> =
        shoal_processes().into_iter().filter_map(|(role, pid)| Some((role, proc_figures(pid)?))).collect();
    let mut out = String::new();
    for (j, (name, kind, help)) in FAMILIES.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (role, figures) in &rows {
            if figures[j].is_finite() {
                let _ = writeln!(out, "{name}{{process=\"{}\"}} {}", escape(role), fmt(figures[j]));
            }
        }
    }
    out
}

/// (role, pid) of the launcher and its shoal children (see `render_process_metrics`).
fn shoal_processes() -> Vec<(String, u32)> {
    let me = std::process::id();
    let own = ("RustFrontend".to_string(), me);
    // SAFETY: plain syscall.
    let parent = unsafe { libc::getppid() } as u32;
    let mut found: Vec<(String, u32)> = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![own] };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == me || proc_stat(pid).map(|f| f.ppid) != Some(parent) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if let Some(rest) = title.strip_prefix("shoal::") {
            let role = rest.split_whitespace().next().unwrap_or("").to_string();
            found.push((role, pid));
        }
    }
    if found.is_empty() {
        return vec![own];
    }
    found.push(own);
    found.sort();
    let mut rows = vec![("launcher".to_string(), parent)];
    rows.extend(found);
    rows
}

struct ProcStat {
    ppid: u32,
    cpu_ticks: f64,
    start_ticks: f64,
    vsize: f64,
    rss_pages: f64,
}

/// The fields of /proc/<pid>/stat used here (after the command name, which may hold spaces).
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    Some(ProcStat {
        ppid: fields.get(1)?.parse().ok()?,
        cpu_ticks: num(11)? + num(12)?,
        start_ticks: num(19)?,
        vsize: num(20)?,
        rss_pages: num(21)?,
    })
}

/// cpu seconds, rss bytes, vms bytes, start time (epoch s), open fds, max fds.
fn proc_figures(pid: u32) -> Option<[f64; 6]> {
    let stat = proc_stat(pid)?;
    // SAFETY: sysconf only reads configuration values.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok())))
        .unwrap_or(f64::NAN);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as f64).unwrap_or(f64::NAN);
    let max_fds = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l["Max open files".len()..].split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        })
        .unwrap_or(f64::NAN);
    Some([
        stat.cpu_ticks / ticks,
        stat.rss_pages * page,
        stat.vsize,
        boot_time + stat.start_ticks / ticks,
        fds,
        max_fds,
    ])
}

/// The prefixes a `/metrics` query string asks for (`prefix=vllm` / `prefix=shoal`, none:
/// both); `Err` naming `prefix` for anything else (metrics.metric_prefixes).
pub fn parse_prefix_query(query: Option<&str>) -> Result<Vec<&'static str>, String> {
    let mut wanted: Vec<String> = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        if let Some(value) = pair.strip_prefix("prefix=") {
            wanted.push(value.to_string());
        }
    }
    if wanted.is_empty() {
        return Ok(PREFIXES.to_vec());
    }
    if let Some(bad) = wanted.iter().find(|v| *v != "vllm" && *v != "shoal") {
        return Err(format!("prefix: must be 'vllm' or 'shoal', got '{bad}'"));
    }
    Ok(PREFIXES.iter().copied().filter(|p| wanted.iter().any(|w| p.starts_with(w.as_str()))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_follow_bisect_left() {
        let h = Histogram::new(3);
        let bounds = [1.0, 2.0, 5.0];
        for v in [0.5, 1.0, 1.5, 5.0, 9.0] {
            h.observe(&bounds, v);
        }
        let counts: Vec<u64> = h.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, vec![2, 1, 1, 1]);
        assert_eq!(f64::from_bits(h.sum_bits.load(Ordering::Relaxed)), 17.0);
        assert_eq!(h.count.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn formats_like_python() {
        assert_eq!(fmt(3.0), "3");
        assert_eq!(fmt(0.25), "0.25");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.005), "0.005");
        assert_eq!(python_float_repr(100000.0), "100000.0");
        assert_eq!(escape("a\"b"), "a\\\"b");
    }

    #[test]
    fn process_metrics_of_this_process() {
        let text = render_process_metrics();
        let fds = text
            .lines()
            .find_map(|l| l.strip_prefix("process_open_fds{process=\"RustFrontend\"} "))
            .or_else(|| text.lines().find(|l| l.starts_with("process_open_fds{")).and_then(|l| l.split(' ').nth(1)))
            .expect(&text);
        assert!(fds.parse::<f64>().unwrap() > 0.0, "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter"));
        let figures = proc_figures(std::process::id()).unwrap();
        assert!(figures[1] > 0.0 && figures[3] > 1e9, "{figures:?}");
    }

    #[test]
    fn prefix_query() {
        assert_eq!(parse_prefix_query(None).unwrap(), vec!["vllm:", "shoal:"]);
        assert_eq!(parse_prefix_query(Some("prefix=vllm")).unwrap(), vec!["vllm:"]);
        assert!(parse_prefix_query(Some("prefix=nope")).unwrap_err().contains("prefix"));
    }

    #[test]
    fn token_buckets_match_python_series() {
        // metric_families._series(1, 2, 5, upto=131072)
        let mut expect = vec![];
        let mut scale = 1.0;
        'outer: loop {
            for base in [1.0, 2.0, 5.0] {
                if base * scale > 131072.0 {
                    break 'outer;
                }
                expect.push(base * scale);
            }
            scale *= 10.0;
        }
        assert_eq!(TOKENS, expect.as_slice());
    }
}
