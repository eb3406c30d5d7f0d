//! The messages of shoal/protocol.py (msgspec Structs as msgpack), encoded byte-for-byte as
//! msgspec encodes them and decoded with msgspec's rules (docs/wire-protocol.md).
//!
//! The types below are agreed for the workspace (one Rust struct per Python Struct, same field
//! names and order). msgspec (0.23, as installed) writes EVERY field of an array-like struct,
//! `omit_defaults` or not; map structs (`SamplingParams`, `StructuredOutputsParams`) leave out
//! each field equal to its default (floats: bit-equal; see docs/wire-protocol.md for the one
//! place where this differs from msgspec's identity test).
//!
//! `SamplingParams::check` repeats the Python `__post_init__` value checks (a front end must
//! run it before sending: an engine drops a request that fails them, unanswered).
//!
//! Not here (no frontend sends or reads them): EngineAddresses, TensorHandle, Headless*.

mod codec;
mod messages;
mod sampling;

pub use sampling::POOLING_TYPES;

use std::collections::BTreeMap;

pub const REQUEST_ADD: u8 = 0x00;
pub const REQUEST_ABORT: u8 = 0x01;
pub const REQUEST_UTILITY: u8 = 0x03;
pub const ENGINE_CORE_DEAD: &[u8] = b"ENGINE_CORE_DEAD";

/// `engine_identity(k)`: the 2-byte little-endian routing id of engine k.
pub fn engine_identity(engine_index: u16) -> [u8; 2] {
    engine_index.to_le_bytes()
}

/// A frame that is not the message it should be (logged and dropped by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encode to / decode from msgpack exactly as msgspec does for the Python twin.
pub trait Wire: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop = 0,
    Length = 1,
    Abort = 2,
    Error = 3,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StructuredOutputsParams {
    pub json: Option<String>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    pub grammar: Option<String>,
    pub json_object: bool,
}

/// shoal/sampling_params.py `SamplingParams` (a msgpack map; defaults omitted).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub n: i64,                                              // 1
    pub temperature: f64,                                    // 1.0
    pub top_p: f64,                                          // 1.0
    pub top_k: i64,                                          // 0
    pub min_p: f64,                                          // 0.0
    pub seed: Option<i64>,                                   // None
    pub max_tokens: Option<i64>,                             // Some(16)
    pub min_tokens: i64,                                     // 0
    pub stop: Vec<String>,                                   // []
    pub stop_token_ids: Vec<i64>,                            // []
    pub ignore_eos: bool,                                    // false
    pub logprobs: Option<i64>,                               // None
    pub skip_special_tokens: bool,                           // true
    pub include_stop_str_in_output: bool,                    // false
    pub presence_penalty: f64,                               // 0.0
    pub frequency_penalty: f64,                              // 0.0
    pub repetition_penalty: f64,                             // 1.0
    pub logit_bias: Option<BTreeMap<i64, f64>>,              // None (Python dict order: insertion)
    pub allowed_token_ids: Option<Vec<i64>>,                 // None
    pub bad_words: Vec<String>,                              // []
    pub bad_words_token_ids: Vec<Vec<i64>>,                  // []
    pub prompt_logprobs: Option<i64>,                        // None
    pub pooling: Option<String>,                             // None
    pub normalize: bool,                                     // true
    pub structured_outputs: Option<StructuredOutputsParams>, // None
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            max_tokens: Some(16),
            min_tokens: 0,
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            logprobs: None,
            skip_special_tokens: true,
            include_stop_str_in_output: false,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: None,
            allowed_token_ids: None,
            bad_words: vec![],
            bad_words_token_ids: vec![],
            prompt_logprobs: None,
            pooling: None,
            normalize: true,
            structured_outputs: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineCoreRequest {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling_params: SamplingParams,
    pub eos_token_id: Option<u32>,
    pub arrival_time: f64,
    pub client_index: i64,       // default 0
    pub has_prompt_embeds: bool, // default false
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f64,
    pub rank: i64,
    pub top_token_ids: Vec<u32>,
    pub top_logprobs: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestPhaseTimes {
    pub queue_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// `stop_reason`: int | str | None.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    Token(i64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineCoreOutput {
    pub request_id: String,
    pub new_token_ids: Vec<u32>,
    pub new_logprobs: Option<Vec<TokenLogprobs>>,
    pub finish_reason: Option<FinishReason>,
    pub stop_reason: Option<StopReason>,
    pub num_cached_tokens: i64,
    pub phase_times: Option<RequestPhaseTimes>,
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
    pub embedding: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SchedulerStats {
    pub num_running_reqs: i64,
    pub num_waiting_reqs: i64,
    pub kv_cache_usage: f64,
    pub num_blocks_total: i64,
    pub num_blocks_free: i64,
    pub prefix_cache_queries: i64,
    pub prefix_cache_hits: i64,
    pub num_preemptions: i64,
    pub num_ctx_requests: i64,
    pub num_ctx_tokens: i64,
    pub num_generation_requests: i64,
    pub num_generation_tokens: i64,
    pub prefix_cache_queries_total: i64,
    pub prefix_cache_hits_total: i64,
    pub num_preemptions_total: i64,
    pub iteration_tokens_counts: Vec<i64>,
    pub iteration_tokens_sum: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KVCacheStatus {
    pub engine_index: i64,
    pub num_blocks: i64,
    pub num_free_blocks: i64,
    pub integrity: String, // "ok"
}

#[derive(Debug, Clone, PartialEq)]
pub struct UtilityRequest {
    pub call_id: i64,
    pub method: String,
    pub client_index: i64, // 0
}

#[derive(Debug, Clone, PartialEq)]
pub struct UtilityOutput {
    pub call_id: i64,
    pub kv_cache: Option<KVCacheStatus>,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineCoreOutputs {
    pub engine_index: i64,
    pub outputs: Vec<EngineCoreOutput>,
    pub scheduler_stats: Option<SchedulerStats>,
    pub timestamp: f64,
    pub utility_output: Option<UtilityOutput>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineDead {
    pub engine_index: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineReady {
    pub engine_index: i64,
    pub max_model_len: i64,
    pub num_blocks: i64,
    pub block_size: i64,
    pub model_name: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AbortRequest {
    pub request_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineLoad {
    pub engine_index: i64,
    pub num_waiting_reqs: i64,
    pub num_running_reqs: i64,
    pub kv_cache_usage: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DPStats {
    pub loads: Vec<(i64, i64)>,
    pub timestamp: f64,
}

/// `engine_dead_frame(k, reason)`: ENGINE_CORE_DEAD + encode(EngineDead).
pub fn engine_dead_frame(engine_index: i64, reason: &str) -> Vec<u8> {
    let body = EngineDead {
        engine_index,
        reason: reason.to_string(),
    }
    .encode();
    let mut frame = Vec::with_capacity(ENGINE_CORE_DEAD.len() + body.len());
    frame.extend_from_slice(ENGINE_CORE_DEAD);
    frame.extend_from_slice(&body);
    frame
}

/// The EngineDead of a dead-notice frame (starts with ENGINE_CORE_DEAD); Ok(None) for the
/// bare old form. A frame without the prefix is an error (Python slices it off unchecked).
pub fn decode_engine_dead(frame: &[u8]) -> Result<Option<EngineDead>, DecodeError> {
    let Some(payload) = frame.strip_prefix(ENGINE_CORE_DEAD) else {
        return Err(DecodeError(
            "not a dead notice: no ENGINE_CORE_DEAD prefix".into(),
        ));
    };
    if payload.is_empty() {
        return Ok(None);
    }
    EngineDead::decode(payload).map(Some)
}

#[cfg(test)]
mod tests;
