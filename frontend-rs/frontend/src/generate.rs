//! One generation request from submission to its last byte: each sequence's incremental
//! detokenization and stop strings (shoal/processing/output_processor.py, detokenizer.py),
//! and the OpenAI JSON of its answer (shoal/api/routes.py, formatting.py, protocol.py field
//! order), as a whole response or as SSE chunks.
//!
//! A streamed request is a `Stream` of `Bytes` that hyper's connection task polls: no task
//! of its own, one reused buffer, and per engine output only the new text is formatted.
//! Dropping it before the end (client gone) aborts its unfinished engine requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use shoal_tokenizer::{IncrementalDetokenizer, Tokenizer};
use shoal_wire::{EngineCoreOutput, FinishReason, StopReason, TokenLogprobs};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::EngineEvent;
use crate::errors::{write_error_body, ApiError};
use crate::json::{write_f64, write_i64, write_str};
use crate::state::{AdmissionGuard, AppState};

// ----------------------------------------------------------------------------- stop strings

/// The stop string that the text after byte `old_len` completes, as `(index in stop, length
/// the text is cut to)`; the earliest match wins (ties: the first in `stop`). Python's
/// `find_stop_string` on characters; on UTF-8 bytes it finds the same matches, since a
/// string's bytes can only match at character boundaries.
pub fn find_stop_string(
    text: &str,
    old_len: usize,
    stop: &[String],
    include: bool,
) -> Option<(usize, usize)> {
    if stop.is_empty() || text.len() <= old_len {
        return None;
    }
    let hay = text.as_bytes();
    let mut best: Option<(usize, usize)> = None;
    let mut best_start = hay.len();
    for (k, s) in stop.iter().enumerate() {
        let needle = s.as_bytes();
        if needle.is_empty() {
            continue;
        }
        // A match must end after the old text.
        let from = (old_len + 1).saturating_sub(needle.len());
        if let Some(pos) = find_bytes(&hay[from..], needle) {
            let start = from + pos;
            if start < best_start {
                best_start = start;
                best = Some((k, if include { start + needle.len() } else { start }));
            }
        }
    }
    best
}

/// Bytes at the end of `text` that could begin a stop string (held back while streaming;
/// Python's `stop_prefix_len`, in bytes).
pub fn stop_prefix_len(text: &str, stop: &[String]) -> usize {
    let mut longest = 0;
    for s in stop {
        let max = s.len().saturating_sub(1).min(text.len());
        for k in (longest + 1..=max).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                longest = k;
                break;
            }
        }
    }
    longest
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > hay.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

// ----------------------------------------------------------------------------- sequences

/// Stop-string settings of a request.
pub struct StopConfig {
    pub stop: Vec<String>,
    pub include: bool,
}

/// One of a request's sequences (one engine request).
pub struct Seq {
    /// The choice index in the answer.
    pub index: usize,
    pub engine_id: String,
    /// None only in tests, which feed text directly (`advance`).
    detokenizer: Option<IncrementalDetokenizer>,
    text: String,
    /// Bytes of `text` already sent (streams).
    sent_bytes: usize,
    /// Characters sent (completions logprobs' text_offset).
    sent_chars: usize,
    num_tokens: usize,
    sent_tokens: usize,
    logprobs: Vec<TokenLogprobs>,
    sent_logprobs: usize,
    pub finish: Option<&'static str>,
    stop_reason: Option<StopReason>,
    failed: bool,
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error => "error",
    }
}

impl Seq {
    pub fn new(
        index: usize,
        engine_id: String,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        skip_special: bool,
    ) -> Seq {
        let detokenizer = IncrementalDetokenizer::new(tokenizer, prompt, skip_special);
        Seq::with_detokenizer(index, engine_id, Some(detokenizer))
    }

    /// A sequence with nothing generated yet (`None`: text is fed in directly, in tests).
    fn with_detokenizer(
        index: usize,
        engine_id: String,
        detokenizer: Option<IncrementalDetokenizer>,
    ) -> Seq {
        Seq {
            index,
            engine_id,
            detokenizer,
            text: String::new(),
            sent_bytes: 0,
            sent_chars: 0,
            num_tokens: 0,
            sent_tokens: 0,
            logprobs: Vec::new(),
            sent_logprobs: 0,
            finish: None,
            stop_reason: None,
            failed: false,
        }
    }

    /// Fold one engine output in; true when a stop string ended the sequence here while
    /// the engine still runs it (the caller aborts it there).
    pub fn update(
        &mut self,
        tokenizer: &Tokenizer,
        out: EngineCoreOutput,
        stops: &StopConfig,
        wants_logprobs: bool,
    ) -> bool {
        if wants_logprobs {
            if let Some(lps) = out.new_logprobs {
                self.logprobs.extend(lps);
            }
        }
        let new_text = match &mut self.detokenizer {
            Some(d) if !out.new_token_ids.is_empty() => d.update(tokenizer, &out.new_token_ids),
            _ => String::new(),
        };
        self.advance(
            out.new_token_ids.len(),
            &new_text,
            out.finish_reason,
            out.stop_reason,
            stops,
        )
    }

    /// Fold in `num_tokens` new tokens that decode to `new_text` (output_processor.py
    /// `_update`): a stop string completed here ends the sequence, the text cut at it; true
    /// when that happened while the engine still runs the sequence.
    fn advance(
        &mut self,
        num_tokens: usize,
        new_text: &str,
        finish: Option<FinishReason>,
        stop_reason: Option<StopReason>,
        stops: &StopConfig,
    ) -> bool {
        self.num_tokens += num_tokens;
        if !new_text.is_empty() {
            let old_len = self.text.len();
            self.text.push_str(new_text);
            if let Some((k, cut)) =
                find_stop_string(&self.text, old_len, &stops.stop, stops.include)
            {
                self.text.truncate(cut);
                self.finish = Some("stop");
                self.stop_reason = Some(StopReason::Text(stops.stop[k].clone()));
                return finish.is_none();
            }
        }
        if let Some(r) = finish {
            self.finish = Some(finish_name(r));
            self.stop_reason = stop_reason;
            self.failed = r == FinishReason::Error;
        }
        false
    }

    pub fn finished(&self) -> bool {
        self.finish.is_some()
    }

    fn visible_len(&self, stops: &StopConfig) -> usize {
        if self.finish.is_some() || stops.stop.is_empty() {
            self.text.len()
        } else {
            self.text.len() - stop_prefix_len(&self.text, &stops.stop)
        }
    }

    /// The new text since the last delta, if a delta is due (`_delta`): a running sequence
    /// reports once it has `interval` new tokens (its first token at once).
    fn take_delta(&mut self, stops: &StopConfig, interval: usize) -> Option<Delta> {
        let num_new = self.num_tokens - self.sent_tokens;
        if self.finish.is_none() && (num_new == 0 || (self.sent_tokens > 0 && num_new < interval)) {
            return None;
        }
        // A stop string may have cut the text below what was sent: then nothing is new.
        let visible = self.visible_len(stops);
        let start = self.sent_bytes.min(visible);
        self.sent_bytes = self.sent_bytes.max(visible);
        self.sent_tokens = self.num_tokens;
        let logprobs_start = self.sent_logprobs;
        self.sent_logprobs = self.logprobs.len();
        Some(Delta {
            text: start..visible,
            num_tokens: num_new,
            logprobs: logprobs_start..self.logprobs.len(),
        })
    }
}

struct Delta {
    text: std::ops::Range<usize>,
    num_tokens: usize,
    logprobs: std::ops::Range<usize>,
}

// ----------------------------------------------------------------------------- JSON pieces

fn write_stop_reason(buf: &mut Vec<u8>, r: &Option<StopReason>) {
    match r {
        None => buf.extend_from_slice(b"null"),
        Some(StopReason::Token(t)) => write_i64(buf, *t),
        Some(StopReason::Text(s)) => write_str(buf, s),
    }
}

fn write_finish(buf: &mut Vec<u8>, f: Option<&str>) {
    match f {
        None => buf.extend_from_slice(b"null"),
        Some(f) => write_str(buf, f),
    }
}

fn write_usage(buf: &mut Vec<u8>, prompt: usize, completion: usize) {
    buf.extend_from_slice(b"{\"prompt_tokens\":");
    write_i64(buf, prompt as i64);
    buf.extend_from_slice(b",\"completion_tokens\":");
    write_i64(buf, completion as i64);
    buf.extend_from_slice(b",\"total_tokens\":");
    write_i64(buf, (prompt + completion) as i64);
    buf.push(b'}');
}

/// One position's alternatives as Python's `_top` ranks them: the sampled token first (its
/// own rank), then the engine's top ids ranked 1.. (a repeat of the sampled id skipped);
/// those ranked <= `num_top`, by rank, at most `num_top`.
fn top_of(e: &TokenLogprobs, num_top: usize) -> Vec<(u32, f64)> {
    let mut ranked: Vec<(u32, f64, i64)> = Vec::with_capacity(e.top_token_ids.len() + 1);
    ranked.push((e.token_id, e.logprob, e.rank));
    for (i, (&tid, &lp)) in e.top_token_ids.iter().zip(&e.top_logprobs).enumerate() {
        if !ranked.iter().any(|r| r.0 == tid) {
            ranked.push((tid, lp, i as i64 + 1));
        }
    }
    ranked.retain(|r| r.2 <= num_top as i64);
    ranked.sort_by_key(|r| r.2);
    ranked.truncate(num_top);
    ranked.into_iter().map(|(t, l, _)| (t, l)).collect()
}

/// Completions logprobs of `positions`, `text_offset` counted from `offset` characters;
/// returns the offset after them.
fn write_completion_logprobs(
    buf: &mut Vec<u8>,
    tok: &Tokenizer,
    positions: &[TokenLogprobs],
    num_top: usize,
    offset: usize,
) -> usize {
    let tokens: Vec<String> = positions
        .iter()
        .map(|e| tok.decode(&[e.token_id], false))
        .collect();
    let mut offset = offset;
    buf.extend_from_slice(b"{\"text_offset\":[");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_i64(buf, offset as i64);
        offset += t.chars().count();
    }
    buf.extend_from_slice(b"],\"token_logprobs\":[");
    for (i, e) in positions.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_f64(buf, e.logprob);
    }
    buf.extend_from_slice(b"],\"tokens\":[");
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_str(buf, t);
    }
    buf.extend_from_slice(b"],\"top_logprobs\":[");
    for (i, e) in positions.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        if num_top == 0 {
            buf.extend_from_slice(b"null");
            continue;
        }
        // A dict keyed by the decoded text: a repeated key keeps its first place, last value.
        let mut entries: Vec<(String, f64)> = Vec::new();
        for (tid, lp) in top_of(e, num_top) {
            let key = tok.decode(&[tid], false);
            match entries.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = lp,
                None => entries.push((key, lp)),
            }
        }
        buf.push(b'{');
        for (j, (k, lp)) in entries.iter().enumerate() {
            if j > 0 {
                buf.push(b',');
            }
            write_str(buf, k);
            buf.push(b':');
            write_f64(buf, *lp);
        }
        buf.push(b'}');
    }
    buf.extend_from_slice(b"]}");
    offset
}

/// The GPT-2 byte-level alphabet, reversed: a vocabulary character -> its byte.
fn unicode_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let direct = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if c < 256 && direct(c) {
        return Some(c as u8);
    }
    // The other bytes map, in order, to 256, 257, ...
    let mut n = 256;
    for b in 0u32..256 {
        if !direct(b) {
            if n == c {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

/// The exact bytes a token stands for (`Tokenizer.token_bytes`).
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    if !tok.is_special(id) {
        if let Some(piece) = tok.id_to_token(id) {
            let bytes: Option<Vec<u8>> = piece.chars().map(unicode_to_byte).collect();
            if let Some(bytes) = bytes {
                return bytes;
            }
        }
    }
    tok.decode(&[id], false).into_bytes()
}

fn write_bytes_array(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.push(b'[');
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        write_i64(buf, *b as i64);
    }
    buf.push(b']');
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn write_chat_logprobs(
    buf: &mut Vec<u8>,
    tok: &Tokenizer,
    positions: &[TokenLogprobs],
    num_top: usize,
) {
    buf.extend_from_slice(b"{\"content\":[");
    for (i, e) in positions.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"token\":");
        write_str(buf, &tok.decode(&[e.token_id], false));
        buf.extend_from_slice(b",\"logprob\":");
        write_f64(buf, e.logprob);
        buf.extend_from_slice(b",\"bytes\":");
        write_bytes_array(buf, &token_bytes(tok, e.token_id));
        buf.extend_from_slice(b",\"top_logprobs\":[");
        for (j, (tid, lp)) in top_of(e, num_top).into_iter().enumerate() {
            if j > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"token\":");
            write_str(buf, &tok.decode(&[tid], false));
            buf.extend_from_slice(b",\"logprob\":");
            write_f64(buf, lp);
            buf.extend_from_slice(b",\"bytes\":");
            write_bytes_array(buf, &token_bytes(tok, tid));
            buf.push(b'}');
        }
        buf.extend_from_slice(b"]}");
    }
    buf.extend_from_slice(b"]}");
}

// ----------------------------------------------------------------------------- the request

/// Which API, with its logprobs setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Api {
    /// `logprobs`: the number of alternatives, when asked.
    Completion { logprobs: Option<usize> },
    /// `logprobs`: top_logprobs, when logprobs is true.
    Chat { logprobs: Option<usize> },
}

/// What a finished request answers with, or its error.
pub struct Generation {
    state: Arc<AppState>,
    api: Api,
    /// `"id":"...","created":N,"model":"..."` of every body (the public id).
    head: Vec<u8>,
    seqs: Vec<Seq>,
    receivers: Vec<Option<UnboundedReceiver<EngineEvent>>>,
    stops: StopConfig,
    interval: usize,
    prompt_tokens: usize,
    include_usage: bool,
    deadline: Pin<Box<dyn Future<Output = ()> + Send>>,
    deadline_armed: bool,
    started: bool,
    ended: bool,
    buf: Vec<u8>,
    _admission: Option<AdmissionGuard>,
}

/// The parts a route hands over once its engine requests are submitted.
pub struct GenerationParts {
    pub state: Arc<AppState>,
    pub api: Api,
    pub public_id: String,
    pub created: i64,
    pub seqs: Vec<Seq>,
    pub receivers: Vec<UnboundedReceiver<EngineEvent>>,
    pub stops: StopConfig,
    pub prompt_tokens: usize,
    pub include_usage: bool,
    pub admission: Option<AdmissionGuard>,
}

impl Generation {
    pub fn new(p: GenerationParts) -> Generation {
        let mut head = Vec::with_capacity(96);
        head.extend_from_slice(b"\"id\":");
        write_str(&mut head, &p.public_id);
        head.extend_from_slice(b",\"created\":");
        write_i64(&mut head, p.created);
        head.extend_from_slice(b",\"model\":");
        write_str(&mut head, &p.state.model_name);
        let deadline = Box::pin(p.state.drain_deadline());
        let interval = p.state.args.stream_interval.max(1);
        Generation {
            api: p.api,
            head,
            seqs: p.seqs,
            receivers: p.receivers.into_iter().map(Some).collect(),
            stops: p.stops,
            interval,
            prompt_tokens: p.prompt_tokens,
            include_usage: p.include_usage,
            deadline,
            deadline_armed: false,
            started: false,
            ended: false,
            buf: Vec::with_capacity(512),
            _admission: p.admission,
            state: p.state,
        }
    }

    fn wants_logprobs(&self) -> bool {
        match self.api {
            Api::Completion { logprobs } | Api::Chat { logprobs } => logprobs.is_some(),
        }
    }

    /// Read every engine event available now; `stream`: write the chunks they make into
    /// `buf`. Ready(Ok) once every sequence finished, Ready(Err) for a failure.
    fn poll_events(&mut self, cx: &mut Context<'_>, stream: bool) -> Poll<Result<(), ApiError>> {
        // The deadline future is polled once, to register this task's waker (hyper polls a
        // body from its connection's task: the same waker every time); after that the flag
        // says it all, without re-registering per token.
        if self.state.deadline_passed() {
            return Poll::Ready(Err(self.state.shutdown_error()));
        }
        if !self.deadline_armed {
            if self.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(self.state.shutdown_error()));
            }
            self.deadline_armed = true;
        }
        let wants_logprobs = self.wants_logprobs();
        // Round robin, one event per sequence per pass: the n sequences of one engine step
        // come out in index order, as the Python server writes one step's outputs.
        let mut passes = 0;
        loop {
            let mut progressed = false;
            for i in 0..self.seqs.len() {
                if self.seqs[i].finished() {
                    continue;
                }
                let rx = match self.receivers[i].as_mut() {
                    Some(rx) => rx,
                    None => continue,
                };
                match rx.poll_recv(cx) {
                    Poll::Pending => {}
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(ApiError::engine_unavailable(
                            "the engine link closed",
                        )))
                    }
                    Poll::Ready(Some(EngineEvent::Failed(reason))) => {
                        return Poll::Ready(Err(ApiError::engine_unavailable(&reason)))
                    }
                    Poll::Ready(Some(EngineEvent::Output(out))) => {
                        progressed = true;
                        let seq = &mut self.seqs[i];
                        if seq.update(&self.state.tokenizer, out, &self.stops, wants_logprobs) {
                            self.state.link.abort_stopped(vec![seq.engine_id.clone()]);
                        }
                        if seq.failed {
                            crate::log_error!("the engine failed request {}", seq.engine_id);
                            return Poll::Ready(Err(ApiError::internal()));
                        }
                        if stream {
                            self.write_delta(i);
                        }
                    }
                }
                if self.seqs[i].finished() {
                    self.receivers[i] = None;
                }
            }
            passes += 1;
            if !progressed {
                break;
            }
            if passes == 64 {
                // Enough for one write: come back for the rest after it.
                cx.waker().wake_by_ref();
                break;
            }
        }
        if self.seqs.iter().all(Seq::finished) {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    /// The chunk of sequence `i`'s new output, if one is due (routes.py `_completion_events`
    /// / `_chat_events`: one choice per chunk).
    fn write_delta(&mut self, i: usize) {
        let seq = &mut self.seqs[i];
        let delta = match seq.take_delta(&self.stops, self.interval) {
            Some(d) => d,
            None => return,
        };
        let text = &seq.text[delta.text.clone()];
        let finish = seq.finish;
        if text.is_empty() && finish.is_none() && delta.num_tokens == 0 {
            return;
        }
        let buf = &mut self.buf;
        buf.extend_from_slice(b"data: {");
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(b",\"choices\":[{\"index\":");
        write_i64(buf, seq.index as i64);
        let tok = &self.state.tokenizer;
        match self.api {
            Api::Completion { logprobs } => {
                buf.extend_from_slice(b",\"text\":");
                write_str(buf, text);
                buf.extend_from_slice(b",\"logprobs\":");
                match logprobs {
                    Some(num_top) => {
                        let positions = &seq.logprobs[delta.logprobs.clone()];
                        seq.sent_chars =
                            write_completion_logprobs(buf, tok, positions, num_top, seq.sent_chars);
                    }
                    None => buf.extend_from_slice(b"null"),
                }
            }
            Api::Chat { logprobs } => {
                if text.is_empty() {
                    buf.extend_from_slice(b",\"delta\":{}");
                } else {
                    buf.extend_from_slice(b",\"delta\":{\"content\":");
                    write_str(buf, text);
                    buf.push(b'}');
                }
                buf.extend_from_slice(b",\"logprobs\":");
                match logprobs {
                    Some(num_top) => write_chat_logprobs(
                        buf,
                        tok,
                        &seq.logprobs[delta.logprobs.clone()],
                        num_top,
                    ),
                    None => buf.extend_from_slice(b"null"),
                }
            }
        }
        buf.extend_from_slice(b",\"finish_reason\":");
        write_finish(buf, finish);
        buf.extend_from_slice(b",\"stop_reason\":");
        write_stop_reason(buf, &seq.stop_reason);
        buf.extend_from_slice(match self.api {
            Api::Completion { .. } => {
                b"}],\"usage\":null,\"object\":\"text_completion\"}\n\n".as_slice()
            }
            Api::Chat { .. } => {
                b"}],\"usage\":null,\"object\":\"chat.completion.chunk\"}\n\n".as_slice()
            }
        });
    }

    fn object_name(&self) -> &'static [u8] {
        match self.api {
            Api::Completion { .. } => b"text_completion",
            Api::Chat { .. } => b"chat.completion.chunk",
        }
    }

    fn completion_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }

    /// The usage chunk, `[DONE]`.
    fn write_tail(&mut self) {
        if self.include_usage {
            let completion = self.completion_tokens();
            self.buf.extend_from_slice(b"data: {");
            self.buf.extend_from_slice(&self.head);
            self.buf.extend_from_slice(b",\"choices\":[],\"usage\":");
            write_usage(&mut self.buf, self.prompt_tokens, completion);
            self.buf.extend_from_slice(b",\"object\":\"");
            let name = self.object_name();
            self.buf.extend_from_slice(name);
            self.buf.extend_from_slice(b"\"}\n\n");
        }
        self.buf.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// The chat stream's first chunks: one per choice, naming the role.
    fn write_roles(&mut self) {
        for i in 0..self.seqs.len() {
            self.buf.extend_from_slice(b"data: {");
            self.buf.extend_from_slice(&self.head);
            self.buf.extend_from_slice(b",\"choices\":[{\"index\":");
            write_i64(&mut self.buf, i as i64);
            self.buf.extend_from_slice(
                b",\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null,\"stop_reason\":null}],\"usage\":null,\"object\":\"chat.completion.chunk\"}\n\n",
            );
        }
    }

    /// Abort what still runs in the engine (client gone, failure, shutdown).
    fn abort_unfinished(&mut self) {
        let ids: Vec<String> = self
            .seqs
            .iter()
            .filter(|s| !s.finished())
            .map(|s| s.engine_id.clone())
            .collect();
        for s in self.seqs.iter_mut() {
            if s.finish.is_none() {
                s.finish = Some("abort");
            }
        }
        if !ids.is_empty() {
            self.state.link.abort(ids);
        }
    }

    /// Wait for the end and answer with the whole response body (non-streaming).
    pub async fn collect(mut self) -> Result<Vec<u8>, ApiError> {
        let outcome = std::future::poll_fn(|cx| self.poll_events(cx, false)).await;
        if let Err(e) = outcome {
            self.abort_unfinished();
            self.ended = true;
            return Err(e);
        }
        self.ended = true;
        let tok = &self.state.tokenizer;
        let mut buf =
            Vec::with_capacity(256 + self.seqs.iter().map(|s| s.text.len() + 128).sum::<usize>());
        buf.push(b'{');
        buf.extend_from_slice(&self.head);
        buf.extend_from_slice(b",\"choices\":[");
        for (k, seq) in self.seqs.iter().enumerate() {
            if k > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(b"{\"index\":");
            write_i64(&mut buf, seq.index as i64);
            match self.api {
                Api::Completion { logprobs } => {
                    buf.extend_from_slice(b",\"text\":");
                    write_str(&mut buf, &seq.text);
                    buf.extend_from_slice(b",\"logprobs\":");
                    match logprobs {
                        Some(num_top) => {
                            write_completion_logprobs(&mut buf, tok, &seq.logprobs, num_top, 0);
                        }
                        None => buf.extend_from_slice(b"null"),
                    }
                }
                Api::Chat { logprobs } => {
                    buf.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
                    write_str(&mut buf, &seq.text);
                    buf.extend_from_slice(b",\"tool_calls\":[]},\"logprobs\":");
                    match logprobs {
                        Some(num_top) => write_chat_logprobs(&mut buf, tok, &seq.logprobs, num_top),
                        None => buf.extend_from_slice(b"null"),
                    }
                }
            }
            buf.extend_from_slice(b",\"finish_reason\":");
            write_finish(&mut buf, seq.finish);
            buf.extend_from_slice(b",\"stop_reason\":");
            write_stop_reason(&mut buf, &seq.stop_reason);
            buf.push(b'}');
        }
        buf.extend_from_slice(b"],\"usage\":");
        write_usage(&mut buf, self.prompt_tokens, self.completion_tokens());
        buf.extend_from_slice(match self.api {
            Api::Completion { .. } => b",\"object\":\"text_completion\"}".as_slice(),
            Api::Chat { .. } => b",\"object\":\"chat.completion\"}".as_slice(),
        });
        Ok(buf)
    }
}

impl futures_util::Stream for Generation {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.started {
            this.started = true;
            if matches!(this.api, Api::Chat { .. }) {
                this.write_roles();
            }
        }
        match this.poll_events(cx, true) {
            Poll::Ready(Ok(())) => {
                this.ended = true;
                this.write_tail();
            }
            Poll::Ready(Err(e)) => {
                this.abort_unfinished();
                this.ended = true;
                // An error after the headers went out: a final error event, then [DONE].
                this.buf.extend_from_slice(b"data: ");
                write_error_body(&mut this.buf, e.status, &e.message, e.param.as_deref());
                this.buf.extend_from_slice(b"\n\ndata: [DONE]\n\n");
            }
            Poll::Pending => {}
        }
        if this.buf.is_empty() {
            return Poll::Pending;
        }
        let chunk = Bytes::copy_from_slice(&this.buf);
        this.buf.clear();
        Poll::Ready(Some(Ok(chunk)))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Ended early (client disconnected mid-stream or mid-request): free the engine.
        self.abort_unfinished();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(x: &[&str]) -> Vec<String> {
        x.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_strings_like_python() {
        // find_stop_string("hello world", 5, ["wor"], False) -> ("wor", 6)
        assert_eq!(
            find_stop_string("hello world", 6, &v(&["wor"]), false),
            Some((0, 6))
        );
        assert_eq!(
            find_stop_string("hello world", 6, &v(&["wor"]), true),
            Some((0, 9))
        );
        // Only matches ending in the new text count.
        assert_eq!(
            find_stop_string("hello world", 11, &v(&["wor"]), false),
            None
        );
        assert_eq!(
            find_stop_string("abcXY", 3, &v(&["cX"]), false),
            Some((0, 2))
        );
        // The earliest start wins, whatever the list order.
        assert_eq!(
            find_stop_string("a STOP b END", 0, &v(&["END", "STOP"]), false),
            Some((1, 2))
        );
        // Ties: the first in the list.
        assert_eq!(
            find_stop_string("xab", 1, &v(&["ab", "a"]), false),
            Some((0, 1))
        );
        // Multi-byte text.
        assert_eq!(
            find_stop_string("héllo→wörld", "héllo".len(), &v(&["→w"]), false),
            Some((0, "héllo".len()))
        );
        assert_eq!(find_stop_string("abc", 0, &[], false), None);
    }

    #[test]
    fn stop_prefix_held_back() {
        assert_eq!(stop_prefix_len("hello wo", &v(&["world"])), 2);
        assert_eq!(stop_prefix_len("hello", &v(&["world"])), 0);
        assert_eq!(stop_prefix_len("hello w", &v(&["xyz", "wx"])), 1);
        // A whole stop string is not a prefix to hold (it would have matched).
        assert_eq!(stop_prefix_len("ab", &v(&["ab"])), 0);
        assert_eq!(stop_prefix_len("a→", &v(&["→b"])), "→".len());
        assert_eq!(stop_prefix_len("aa", &v(&["aab"])), 2);
    }

    /// Random cases checked against shoal.processing.detokenizer (generated with Python's
    /// find_stop_string / stop_prefix_len, positions converted from characters to bytes):
    /// (text, old length, stop strings, include, match (stop index, cut), held-back bytes).
    #[test]
    fn stop_strings_equal_python_on_random_cases() {
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, usize, &[&str], bool, Option<(usize, usize)>, usize)] = &[
            ("🦀bé🦀🦀aé ba→", 11, &["é", "a"], false, Some((1, 15)), 0),
            ("→bbé🦀🦀é", 7, &["→→a", "a🦀"], false, None, 0),
            ("", 0, &["a"], true, None, 0),
            (
                "éé🦀éb aaé🦀bb",
                2,
                &["🦀", "ééb", "a"],
                false,
                Some((0, 4)),
                0,
            ),
            ("🦀→b🦀é →bb", 19, &["→éb", "a🦀b"], false, None, 0),
            ("", 0, &["b", "→", "a"], true, None, 0),
            ("é🦀🦀→→ 🦀a🦀b", 27, &[" é"], true, None, 0),
            ("aaéé🦀a🦀é🦀aa", 4, &[" "], false, None, 0),
            ("a🦀", 5, &["ab", "éa", "béb"], true, None, 0),
            ("aéb", 3, &["ab", "→", "b🦀"], false, None, 1),
            ("→aéb", 7, &["éb🦀", "aaé"], false, None, 3),
            ("🦀é→→a", 0, &["→ba"], false, None, 0),
            (" ", 1, &[" a", "é", "🦀a"], false, None, 1),
            ("", 0, &["b →"], false, None, 0),
            ("é→a🦀b", 5, &["éa", " →", "a "], true, None, 0),
            ("bé→é→b aéba🦀", 17, &["b ", "a"], true, Some((1, 18)), 0),
            ("ab🦀éé bab→ ", 0, &["→", "🦀 "], false, Some((0, 14)), 0),
            (" 🦀🦀é a🦀→", 12, &["🦀🦀", "🦀b"], true, None, 0),
            ("é🦀 b🦀", 7, &["🦀🦀🦀", "a b", "a🦀é"], true, None, 4),
            (" 🦀é→🦀bbb", 10, &[" ", "abé"], true, None, 0),
            (
                "🦀éabééabéa→a",
                6,
                &["→", "→🦀", "🦀🦀a"],
                false,
                Some((0, 17)),
                0,
            ),
            ("é  →b→→🦀 →b", 14, &["b"], true, Some((0, 23)), 0),
            ("→→aé🦀 a", 9, &["b🦀é"], false, None, 0),
            ("→aé b🦀", 8, &[" éé"], true, None, 0),
            ("→bé 🦀b ab   ", 12, &["é"], false, None, 0),
            (" ", 0, &["🦀→→"], false, None, 0),
            ("", 0, &["bba", "🦀 ", "🦀🦀é"], true, None, 0),
            ("baa ", 1, &[" →→", "b ", "b a"], true, None, 1),
            ("", 0, &["é", "éé"], false, None, 0),
            ("a🦀éaa 🦀bbb", 14, &["🦀", " ", "→a"], true, None, 0),
            ("→aé→🦀🦀 é", 18, &["b", "→"], false, None, 0),
            ("b🦀bbb", 5, &["b", "a"], false, Some((0, 5)), 0),
            (" →🦀é é🦀  b", 4, &[" ", "a"], false, Some((0, 10)), 0),
            ("bb", 2, &["ab", "é→b", "bb"], true, None, 1),
            ("", 0, &["aé🦀", " ", "éé"], true, None, 0),
            ("é🦀→→é", 14, &["a"], true, None, 0),
            ("→é→ ", 9, &["🦀", "🦀a"], false, None, 0),
            ("aé🦀a🦀  a🦀aé🦀", 14, &["→a"], false, None, 0),
            ("a🦀a 🦀🦀a b→b", 21, &[" a🦀", " a"], true, None, 0),
            (" →→→", 1, &["🦀"], true, None, 0),
            ("  ", 1, &["b", " ", "  b"], true, Some((1, 2)), 2),
            (" 🦀🦀 →", 10, &["aé🦀", "→→", "é"], false, None, 3),
            (
                "b  🦀 🦀 babéb",
                18,
                &["🦀", " ", "b"],
                true,
                Some((2, 19)),
                0,
            ),
            ("éba→bééé", 12, &["→→"], false, None, 0),
            ("bb🦀", 0, &["→", "🦀é"], false, None, 4),
            ("", 0, &["b "], true, None, 0),
            ("aa →", 6, &["a"], true, None, 0),
            ("b", 0, &["é", "a é"], false, None, 0),
            ("🦀b→", 8, &["🦀 "], false, None, 0),
            ("→é→é🦀éaa →→", 0, &["ba"], true, None, 0),
            ("🦀b", 4, &["aba"], true, None, 0),
            ("bb🦀→a→é", 1, &["→→", "→a", "a"], false, Some((1, 6)), 0),
            ("🦀b 🦀🦀🦀  🦀b", 25, &["b", " "], false, None, 0),
            ("aéb🦀→éab", 8, &["é→"], true, None, 0),
            ("b", 1, &["🦀", "é", "→  "], true, None, 0),
            ("aba→→→  ", 12, &["b", " "], true, Some((1, 13)), 0),
            ("    🦀 a →b", 14, &["éa"], false, None, 0),
            ("bbaab", 0, &["a"], true, Some((0, 3)), 0),
            ("→  éb→b", 11, &["b"], false, Some((0, 11)), 0),
            ("→→é🦀a", 6, &["🦀", "→a"], false, Some((0, 8)), 0),
        ];
        for &(text, old_len, stop, include, expect, held) in cases {
            let stop = v(stop);
            assert_eq!(
                find_stop_string(text, old_len, &stop, include),
                expect,
                "{text:?} {old_len} {stop:?}"
            );
            assert_eq!(stop_prefix_len(text, &stop), held, "{text:?} {stop:?}");
        }
    }

    fn text_seq() -> Seq {
        Seq::with_detokenizer(0, "r".into(), None)
    }

    /// Feed text increments (one token each); the streamed deltas and the end state.
    fn stream(
        pieces: &[&str],
        stop: &[&str],
        include: bool,
        interval: usize,
    ) -> (Vec<String>, Seq) {
        let stops = StopConfig {
            stop: v(stop),
            include,
        };
        let mut seq = text_seq();
        let mut deltas = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            let finish = last.then_some(FinishReason::Length);
            let aborted = seq.advance(1, piece, finish, None, &stops);
            if let Some(d) = seq.take_delta(&stops, interval) {
                deltas.push(seq.text[d.text].to_string());
            }
            if aborted || seq.finished() {
                break;
            }
        }
        (deltas, seq)
    }

    #[test]
    fn streams_hold_back_a_possible_stop_string() {
        let (deltas, seq) = stream(&["Hel", "lo wo", "rld", "!"], &["world"], false, 1);
        assert_eq!(deltas, vec!["Hel", "lo ", ""]);
        assert_eq!((seq.text.as_str(), seq.finish), ("Hello ", Some("stop")));
        assert_eq!(seq.stop_reason, Some(StopReason::Text("world".into())));
        // The held-back tail goes out once it cannot be a stop string any more.
        let (deltas, seq) = stream(&["Hel", "lo wo", "nder", "!"], &["world"], false, 1);
        assert_eq!(deltas, vec!["Hel", "lo ", "wonder", "!"]);
        assert_eq!(seq.finish, Some("length"));
        // include_stop_str_in_output keeps the stop string.
        let (deltas, seq) = stream(&["a wor", "ld b"], &["world"], true, 1);
        assert_eq!(deltas, vec!["a ", "world"]);
        assert_eq!(seq.text, "a world");
    }

    #[test]
    fn stream_interval_batches_tokens() {
        let (deltas, seq) = stream(&["a", "b", "c", "d", "e", "f"], &[], false, 2);
        // The first token at once, then every 2 tokens, the rest at the end.
        assert_eq!(deltas, vec!["a", "bc", "de", "f"]);
        assert_eq!(seq.num_tokens, 6);
        // A token that decodes to nothing yet (half a character) still makes a chunk.
        let (deltas, _) = stream(&["x", "", "é"], &[], false, 1);
        assert_eq!(deltas, vec!["x", "", "é"]);
    }

    #[test]
    fn byte_level_alphabet() {
        assert_eq!(unicode_to_byte('a'), Some(b'a'));
        assert_eq!(unicode_to_byte('Ġ'), Some(b' '));
        assert_eq!(unicode_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(unicode_to_byte('Ā'), Some(0));
        assert_eq!(unicode_to_byte('中'), None);
    }

    #[test]
    fn top_logprobs_ranked_like_python() {
        let e = TokenLogprobs {
            token_id: 7,
            logprob: -2.0,
            rank: 2,
            top_token_ids: vec![3, 7, 9],
            top_logprobs: vec![-0.5, -2.0, -3.0],
        };
        assert_eq!(top_of(&e, 2), vec![(3, -0.5), (7, -2.0)]);
        assert_eq!(top_of(&e, 1), vec![(3, -0.5)]);
        assert_eq!(top_of(&e, 0), vec![]);
        let e = TokenLogprobs {
            token_id: 5,
            logprob: -4.0,
            rank: 9,
            top_token_ids: vec![3, 7],
            top_logprobs: vec![-0.5, -1.0],
        };
        assert_eq!(top_of(&e, 2), vec![(3, -0.5), (7, -1.0)]);
    }
}
