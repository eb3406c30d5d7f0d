//! `Wire` for every message: each field type knows how to put itself and get itself with
//! msgspec's typed-decoding rules; the structs are spelled out once in the macros below.

use std::collections::BTreeMap;

use crate::codec::{fail, Enc, Reader, Res, Seg};
use crate::*;

/// One value of a field's type, msgspec-style.
pub(crate) trait Field: Sized + PartialEq {
    fn put(&self, e: &mut Enc);
    fn get(r: &mut Reader<'_>) -> Res<Self>;

    /// Whether a map struct leaves this value out as its default. msgspec tests identity; for
    /// everything but floats that is equality here (ints, bools and None are singletons,
    /// empty containers are checked by content).
    fn same(&self, default: &Self) -> bool {
        self == default
    }
}

impl Field for i64 {
    fn put(&self, e: &mut Enc) {
        e.int(*self)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        r.i64()
    }
}

impl Field for u32 {
    fn put(&self, e: &mut Enc) {
        e.uint(*self as u64)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        r.u32()
    }
}

impl Field for f64 {
    fn put(&self, e: &mut Enc) {
        e.float(*self)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        r.float()
    }
    /// Bit-equality: -0.0 is not the default 0.0, and NaN never is a default.
    fn same(&self, default: &Self) -> bool {
        self.to_bits() == default.to_bits()
    }
}

impl Field for bool {
    fn put(&self, e: &mut Enc) {
        e.boolean(*self)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        r.boolean()
    }
}

impl Field for String {
    fn put(&self, e: &mut Enc) {
        e.str(self)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        Ok(r.str()?.to_owned())
    }
}

impl<T: Field> Field for Option<T> {
    fn put(&self, e: &mut Enc) {
        match self {
            Some(v) => v.put(e),
            None => e.nil(),
        }
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        if r.nil()? {
            return Ok(None);
        }
        T::get(r).map(Some)
    }
}

/// `list[T]` for the element types the messages use. (Not generic over `Vec<T>`, because
/// `bytes` is `Vec<u8>` and goes as msgpack bin.)
macro_rules! list_field {
    ($($t:ty),*) => {$(
        impl Field for Vec<$t> {
            fn put(&self, e: &mut Enc) {
                e.array(self.len());
                for item in self {
                    item.put(e);
                }
            }
            fn get(r: &mut Reader<'_>) -> Res<Self> {
                let n = r.array()?;
                let mut out = Vec::with_capacity(r.capacity::<$t>(n));
                for i in 0..n {
                    out.push(<$t>::get(r).map_err(|f| f.at(Seg::Index(i)))?);
                }
                Ok(out)
            }
        }
    )*};
}

list_field!(
    u32,
    i64,
    f64,
    String,
    Vec<i64>,
    (i64, i64),
    TokenLogprobs,
    EngineCoreOutput
);

/// `bytes`: msgpack bin only (msgspec rejects a str here).
impl Field for Vec<u8> {
    fn put(&self, e: &mut Enc) {
        e.bin(self)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        Ok(r.bin()?.to_vec())
    }
}

/// `tuple[int, int]`: an array of exactly two.
impl Field for (i64, i64) {
    fn put(&self, e: &mut Enc) {
        e.array(2);
        e.int(self.0);
        e.int(self.1);
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        let n = r.array()?;
        if n != 2 {
            return fail(format!("Expected `array` of length 2, got {n}"));
        }
        let a = r.i64().map_err(|f| f.at(Seg::Index(0)))?;
        let b = r.i64().map_err(|f| f.at(Seg::Index(1)))?;
        Ok((a, b))
    }
}

/// `dict[int, float]`: a map with int keys; a repeated key keeps its last value (as a Python
/// dict does). Written in key order (Python writes insertion order; see the docs).
impl Field for BTreeMap<i64, f64> {
    fn put(&self, e: &mut Enc) {
        e.map(self.len());
        for (k, v) in self {
            e.int(*k);
            e.float(*v);
        }
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        let n = r.map()?;
        let mut out = BTreeMap::new();
        for i in 0..n {
            let k = r.i64().map_err(|f| f.at(Seg::Key))?;
            let v = r.float().map_err(|f| f.at(Seg::Index(i)))?;
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// An IntEnum: its int value, which must be one of the members.
impl Field for FinishReason {
    fn put(&self, e: &mut Enc) {
        e.int(*self as i64)
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        match r.int()? {
            0 => Ok(FinishReason::Stop),
            1 => Ok(FinishReason::Length),
            2 => Ok(FinishReason::Abort),
            3 => Ok(FinishReason::Error),
            v => fail(format!("Invalid enum value {v}")),
        }
    }
}

/// `int | str` (the `None` of `stop_reason` is the Option around it).
impl Field for StopReason {
    fn put(&self, e: &mut Enc) {
        match self {
            StopReason::Token(t) => e.int(*t),
            StopReason::Text(s) => e.str(s),
        }
    }
    fn get(r: &mut Reader<'_>) -> Res<Self> {
        match r.int_or_str()? {
            Ok(v) => i64::try_from(v)
                .map(StopReason::Token)
                .or_else(|_| fail(format!("Integer {v} out of range for i64 (Rust)"))),
            Err(s) => Ok(StopReason::Text(s.to_owned())),
        }
    }
}

/// An `array_like=True` struct: every field written, in order (msgspec 0.23 writes trailing
/// defaults too, omit_defaults or not). Decoding wants at least the required fields, takes
/// defaults for missing trailing ones and skips extra elements, as msgspec does.
macro_rules! array_struct {
    ($ty:ident { $($req:ident),* $(; $($opt:ident = $def:expr),*)? }) => {
        impl Field for $ty {
            fn put(&self, e: &mut Enc) {
                e.array(0 $(+ { let _ = stringify!($req); 1 })* $($(+ { let _ = stringify!($opt); 1 })*)?);
                $(self.$req.put(e);)*
                $($(self.$opt.put(e);)*)?
            }

            fn get(r: &mut Reader<'_>) -> Res<Self> {
                const REQUIRED: usize = 0 $(+ { let _ = stringify!($req); 1 })*;
                let n = r.array()?;
                if n < REQUIRED {
                    return fail(format!("Expected `array` of at least length {REQUIRED}, got {n}"));
                }
                let mut i = 0usize;
                $(
                    let $req = Field::get(r).map_err(|f| f.at(Seg::Index(i)))?;
                    i += 1;
                )*
                $($(
                    let $opt = if i < n {
                        let v = Field::get(r).map_err(|f| f.at(Seg::Index(i)))?;
                        i += 1;
                        v
                    } else {
                        $def
                    };
                )*)?
                r.skip(n - i)?;
                Ok($ty { $($req,)* $($($opt,)*)? })
            }
        }
    };
}

/// A `kw_only=True, omit_defaults=True` struct: a map of the non-default fields in field order
/// (header placed as msgspec places it). Decoding starts from the defaults, takes known keys
/// (a repeated key: the last wins) and skips unknown ones.
macro_rules! map_struct {
    ($ty:ident { $($f:ident),* }) => {
        impl Field for $ty {
            fn put(&self, e: &mut Enc) {
                const NFIELDS: usize = 0 $(+ { let _ = stringify!($f); 1 })*;
                let defaults = $ty::default();
                let at = e.map_header_placeholder(NFIELDS);
                let mut count = 0usize;
                $(
                    if !self.$f.same(&defaults.$f) {
                        e.str(stringify!($f));
                        self.$f.put(e);
                        count += 1;
                    }
                )*
                e.patch_map_header(at, NFIELDS, count);
            }

            fn get(r: &mut Reader<'_>) -> Res<Self> {
                let n = r.map()?;
                let mut out = $ty::default();
                for _ in 0..n {
                    // Keys are matched as bytes: like msgspec, an unknown key is skipped
                    // without checking that it is UTF-8.
                    let key = r.str_bytes().map_err(|f| f.at(Seg::Key))?;
                    $(
                        if key == stringify!($f).as_bytes() {
                            out.$f = Field::get(r).map_err(|f| f.at(Seg::Field(stringify!($f))))?;
                            continue;
                        }
                    )*
                    r.skip(1)?;
                }
                out.after_decode();
                Ok(out)
            }
        }
    };
}

impl SamplingParams {
    /// What `SamplingParams.__post_init__` changes (not what it rejects: value checks stay
    /// the engine's): top_k -1 means 0.
    fn after_decode(&mut self) {
        if self.top_k == -1 {
            self.top_k = 0;
        }
    }
}

impl StructuredOutputsParams {
    fn after_decode(&mut self) {}
}

map_struct!(StructuredOutputsParams {
    json,
    regex,
    choice,
    grammar,
    json_object
});

map_struct!(SamplingParams {
    n,
    temperature,
    top_p,
    top_k,
    min_p,
    seed,
    max_tokens,
    min_tokens,
    stop,
    stop_token_ids,
    ignore_eos,
    logprobs,
    skip_special_tokens,
    include_stop_str_in_output,
    presence_penalty,
    frequency_penalty,
    repetition_penalty,
    logit_bias,
    allowed_token_ids,
    bad_words,
    bad_words_token_ids,
    prompt_logprobs,
    pooling,
    normalize,
    structured_outputs
});

array_struct!(EngineCoreRequest {
    request_id, prompt_token_ids, sampling_params, eos_token_id, arrival_time;
    client_index = 0, has_prompt_embeds = false
});

array_struct!(TokenLogprobs {
    token_id, logprob, rank;
    top_token_ids = Vec::new(), top_logprobs = Vec::new()
});

array_struct!(RequestPhaseTimes {
    queue_s,
    prefill_s,
    decode_s
});

array_struct!(EngineCoreOutput {
    request_id, new_token_ids;
    new_logprobs = None,
    finish_reason = None,
    stop_reason = None,
    num_cached_tokens = 0,
    phase_times = None,
    prompt_logprobs = None,
    embedding = Vec::new()
});

array_struct!(SchedulerStats {
    ;
    num_running_reqs = 0,
    num_waiting_reqs = 0,
    kv_cache_usage = 0.0,
    num_blocks_total = 0,
    num_blocks_free = 0,
    prefix_cache_queries = 0,
    prefix_cache_hits = 0,
    num_preemptions = 0,
    num_ctx_requests = 0,
    num_ctx_tokens = 0,
    num_generation_requests = 0,
    num_generation_tokens = 0,
    prefix_cache_queries_total = 0,
    prefix_cache_hits_total = 0,
    num_preemptions_total = 0,
    iteration_tokens_counts = Vec::new(),
    iteration_tokens_sum = 0
});

array_struct!(KVCacheStatus {
    engine_index, num_blocks, num_free_blocks;
    integrity = "ok".to_string()
});

array_struct!(UtilityRequest { call_id, method; client_index = 0 });

array_struct!(UtilityOutput { call_id; kv_cache = None, error = String::new() });

array_struct!(EngineCoreOutputs {
    ;
    engine_index = 0,
    outputs = Vec::new(),
    scheduler_stats = None,
    timestamp = 0.0,
    utility_output = None
});

array_struct!(EngineDead { engine_index; reason = String::new() });

array_struct!(EngineReady {
    engine_index, max_model_len, num_blocks, block_size;
    model_name = String::new(), vocab_size = 0, hidden_size = 0
});

array_struct!(AbortRequest { request_ids });

array_struct!(EngineLoad {
    engine_index, num_waiting_reqs, num_running_reqs;
    kv_cache_usage = 0.0
});

array_struct!(DPStats { loads; timestamp = 0.0 });

macro_rules! wire {
    ($($ty:ident),*) => {$(
        impl Wire for $ty {
            fn encode(&self) -> Vec<u8> {
                let mut e = Enc::new();
                self.put(&mut e);
                e.buf
            }

            fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
                let mut r = Reader::new(bytes);
                let value = <$ty as Field>::get(&mut r).map_err(|f| (*f).into_error())?;
                r.finish().map_err(|f| (*f).into_error())?;
                Ok(value)
            }
        }
    )*};
}

wire!(
    StructuredOutputsParams,
    SamplingParams,
    EngineCoreRequest,
    TokenLogprobs,
    RequestPhaseTimes,
    EngineCoreOutput,
    SchedulerStats,
    KVCacheStatus,
    UtilityRequest,
    UtilityOutput,
    EngineCoreOutputs,
    EngineDead,
    EngineReady,
    AbortRequest,
    EngineLoad,
    DPStats
);

/// Encodes any field value (the crate's unit tests check single forms with it).
#[cfg(test)]
pub(crate) fn put_for_tests<T: Field>(value: &T, e: &mut Enc) {
    value.put(e)
}
