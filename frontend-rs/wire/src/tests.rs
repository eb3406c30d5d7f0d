//! Golden bytes (captured from msgspec 0.23 by encoding the same Python objects), round trips,
//! malformed frames, and a seeded mutation fuzz over valid frames.

use super::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The test binary's allocator: System, noting the largest single allocation per thread (so
/// that tests running in parallel do not see each other's).
struct LargestAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(layout.size())));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new_size)));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: LargestAlloc = LargestAlloc;

fn request() -> EngineCoreRequest {
    let mut logit_bias = BTreeMap::new();
    logit_bias.insert(2, -3.0);
    logit_bias.insert(5, 1.0);
    EngineCoreRequest {
        request_id: "r".into(),
        prompt_token_ids: vec![1, 300],
        sampling_params: SamplingParams {
            temperature: 0.5,
            max_tokens: None,
            stop: vec!["x".into()],
            logit_bias: Some(logit_bias),
            structured_outputs: Some(StructuredOutputsParams {
                choice: Some(vec!["a".into(), "b".into()]),
                ..Default::default()
            }),
            ..Default::default()
        },
        eos_token_id: Some(7),
        arrival_time: 1.5,
        client_index: 2,
        has_prompt_embeds: true,
    }
}

/// msgspec: EngineCoreRequest('r', [1, 300], SamplingParams(temperature=0.5, max_tokens=None,
/// stop=['x'], logit_bias={2: -3.0, 5: 1.0}, structured_outputs=StructuredOutputsParams(
/// choice=['a', 'b'])), 7, 1.5, 2, True)
const REQUEST: &[u8] = b"\x97\xa1\x72\x92\x01\xcd\x01\x2c\xde\x00\x05\xab\x74\x65\x6d\x70\x65\x72\x61\x74\x75\x72\x65\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00\xaa\x6d\x61\x78\x5f\x74\x6f\x6b\x65\x6e\x73\xc0\xa4\x73\x74\x6f\x70\x91\xa1\x78\xaa\x6c\x6f\x67\x69\x74\x5f\x62\x69\x61\x73\x82\x02\xcb\xc0\x08\x00\x00\x00\x00\x00\x00\x05\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\xb2\x73\x74\x72\x75\x63\x74\x75\x72\x65\x64\x5f\x6f\x75\x74\x70\x75\x74\x73\x81\xa6\x63\x68\x6f\x69\x63\x65\x92\xa1\x61\xa1\x62\x07\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x02\xc3";

fn outputs() -> EngineCoreOutputs {
    EngineCoreOutputs {
        engine_index: 1,
        outputs: vec![EngineCoreOutput {
            request_id: "a".into(),
            new_token_ids: vec![1, 2],
            new_logprobs: Some(vec![TokenLogprobs {
                token_id: 3,
                logprob: -0.5,
                rank: 1,
                top_token_ids: vec![3, 4],
                top_logprobs: vec![-0.5, -1.0],
            }]),
            finish_reason: Some(FinishReason::Length),
            stop_reason: Some(StopReason::Token(-7)),
            num_cached_tokens: 5,
            phase_times: Some(RequestPhaseTimes {
                queue_s: 0.25,
                prefill_s: 0.5,
                decode_s: 1.0,
            }),
            prompt_logprobs: None,
            embedding: vec![0, 1],
        }],
        scheduler_stats: Some(SchedulerStats {
            num_running_reqs: 3,
            kv_cache_usage: 0.5,
            iteration_tokens_counts: vec![1, 2],
            ..Default::default()
        }),
        timestamp: 12.5,
        utility_output: None,
    }
}

const OUTPUTS: &[u8] = b"\x95\x01\x91\x99\xa1\x61\x92\x01\x02\x91\x95\x03\xcb\xbf\xe0\x00\x00\x00\x00\x00\x00\x01\x92\x03\x04\x92\xcb\xbf\xe0\x00\x00\x00\x00\x00\x00\xcb\xbf\xf0\x00\x00\x00\x00\x00\x00\x01\xf9\x05\x93\xcb\x3f\xd0\x00\x00\x00\x00\x00\x00\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\xc0\xc4\x02\x00\x01\xdc\x00\x11\x03\x00\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x92\x01\x02\x00\xcb\x40\x29\x00\x00\x00\x00\x00\x00\xc0";

fn utility() -> EngineCoreOutputs {
    EngineCoreOutputs {
        utility_output: Some(UtilityOutput {
            call_id: 9,
            kv_cache: Some(KVCacheStatus {
                engine_index: 0,
                num_blocks: 100,
                num_free_blocks: 40,
                integrity: "ok".into(),
            }),
            error: String::new(),
        }),
        ..Default::default()
    }
}

const UTILITY: &[u8] =
    b"\x95\x00\x90\xc0\xcb\x00\x00\x00\x00\x00\x00\x00\x00\x93\x09\x94\x00\x64\x28\xa2\x6f\x6b\xa0";

#[test]
fn encodes_as_msgspec_does() {
    assert_eq!(request().encode(), REQUEST);
    assert_eq!(outputs().encode(), OUTPUTS);
    assert_eq!(utility().encode(), UTILITY);
    assert_eq!(
        DPStats {
            loads: vec![(1, 2), (0, 300)],
            timestamp: 2.0
        }
        .encode(),
        b"\x92\x92\x92\x01\x02\x92\x00\xcd\x01\x2c\xcb\x40\x00\x00\x00\x00\x00\x00\x00"
    );
    let ready = EngineReady {
        engine_index: 1,
        max_model_len: 4096,
        num_blocks: 100,
        block_size: 16,
        model_name: "m".into(),
        vocab_size: 32000,
        hidden_size: 4096,
    };
    assert_eq!(
        ready.encode(),
        b"\x97\x01\xcd\x10\x00\x64\x10\xa1\x6d\xcd\x7d\x00\xcd\x10\x00"
    );
    // The map-struct headers: map16 for SamplingParams (25 fields), fixmap for 5 fields.
    assert_eq!(SamplingParams::default().encode(), b"\xde\x00\x00");
    assert_eq!(StructuredOutputsParams::default().encode(), b"\x80");
    let min_p = SamplingParams {
        min_p: -0.0,
        ..Default::default()
    };
    assert_eq!(
        min_p.encode(),
        b"\xde\x00\x01\xa5min_p\xcb\x80\x00\x00\x00\x00\x00\x00\x00"
    );
}

#[test]
fn ints_take_the_smallest_form() {
    let ints: Vec<i64> = vec![
        0,
        127,
        128,
        255,
        256,
        65535,
        65536,
        (1 << 32) - 1,
        1 << 32,
        i64::MAX,
        -1,
        -32,
        -33,
        -128,
        -129,
        -32768,
        -32769,
        -(1 << 31),
        -(1 << 31) - 1,
        i64::MIN,
    ];
    let expected: &[u8] = b"\xdc\x00\x14\x00\x7f\xcc\x80\xcc\xff\xcd\x01\x00\xcd\xff\xff\xce\x00\x01\x00\x00\xce\xff\xff\xff\xff\xcf\x00\x00\x00\x01\x00\x00\x00\x00\xcf\x7f\xff\xff\xff\xff\xff\xff\xff\xff\xe0\xd0\xdf\xd0\x80\xd1\xff\x7f\xd1\x80\x00\xd2\xff\xff\x7f\xff\xd2\x80\x00\x00\x00\xd3\xff\xff\xff\xff\x7f\xff\xff\xff\xd3\x80\x00\x00\x00\x00\x00\x00\x00";
    let mut e = codec::Enc::new();
    messages::put_for_tests(&ints, &mut e);
    assert_eq!(e.buf, expected);
}

#[test]
fn decodes_what_it_encodes() {
    assert_eq!(EngineCoreRequest::decode(REQUEST).unwrap(), request());
    assert_eq!(EngineCoreOutputs::decode(OUTPUTS).unwrap(), outputs());
    assert_eq!(EngineCoreOutputs::decode(UTILITY).unwrap(), utility());
}

#[test]
fn dead_notices() {
    let frame = engine_dead_frame(3, "oom");
    assert_eq!(frame, b"ENGINE_CORE_DEAD\x92\x03\xa3oom");
    let dead = decode_engine_dead(&frame).unwrap().unwrap();
    assert_eq!((dead.engine_index, dead.reason.as_str()), (3, "oom"));
    assert_eq!(decode_engine_dead(ENGINE_CORE_DEAD).unwrap(), None);
    assert!(decode_engine_dead(b"ENGINE_CORE_DEAD\x92").is_err());
    assert!(decode_engine_dead(b"\x95\x00\x90\xc0\x00\xc0").is_err());
}

#[test]
fn msgspec_decoding_rules() {
    // Missing trailing fields take their defaults; extra ones are skipped.
    let dead = EngineDead::decode(b"\x91\x07").unwrap();
    assert_eq!(
        dead,
        EngineDead {
            engine_index: 7,
            reason: String::new()
        }
    );
    assert_eq!(
        EngineDead::decode(b"\x93\x07\xa1x\xa1\xff").unwrap().reason,
        "x"
    );
    assert!(EngineDead::decode(b"\x90").is_err());
    // Ints (and float32) for floats; not floats or bools for ints.
    assert_eq!(
        EngineLoad::decode(b"\x94\x01\x02\x03\x04")
            .unwrap()
            .kv_cache_usage,
        4.0
    );
    assert_eq!(
        RequestPhaseTimes::decode(b"\x93\xca\x3f\x80\x00\x00\x01\x02")
            .unwrap()
            .queue_s,
        1.0
    );
    assert!(EngineDead::decode(b"\x92\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\xa0").is_err());
    assert!(EngineDead::decode(b"\x92\xc3\xa0").is_err());
    // Unknown map keys skipped, the last of a repeated key wins, top_k -1 means 0.
    let sp = SamplingParams::decode(b"\x84\xa2zz\x91\xc0\xa1n\x02\xa1n\x03\xa5top_k\xff").unwrap();
    assert_eq!((sp.n, sp.top_k), (3, 0));
    // Enum values, stop_reason types, trailing bytes.
    assert!(EngineCoreOutput::decode(b"\x94\xa0\x90\xc0\x04").is_err());
    assert!(EngineCoreOutput::decode(b"\x95\xa0\x90\xc0\x00\xc3").is_err());
    assert!(EngineDead::decode(b"\x92\x01\xa0\x00").is_err());
    // Out of the Rust type's range.
    let err = EngineCoreOutput::decode(b"\x92\xa0\x91\xff").unwrap_err();
    assert_eq!(
        err.0,
        "Integer -1 out of range for u32 (Rust) - at `$[1][0]`"
    );
}

#[test]
fn forged_lengths_fail_fast_without_allocating() {
    // 4-GB array / str / map / bin headers where such values belong: "truncated", at once.
    let truncated = |r: Result<(), DecodeError>| r.unwrap_err().0.contains("truncated");
    let outputs = |f: &[u8]| EngineCoreOutputs::decode(f).map(drop);
    let dead = |f: &[u8]| EngineDead::decode(f).map(drop);
    assert!(truncated(outputs(
        b"\x95\x00\xdd\xff\xff\xff\xff\x92\xa0\x90"
    )));
    assert!(truncated(outputs(b"\xdd\xff\xff\xff\xff")));
    assert!(truncated(dead(b"\x92\x01\xdb\xff\xff\xff\xff")));
    assert!(truncated(dead(b"\x93\x01\xa0\xdf\xff\xff\xff\xff\x01")));
    let sp = SamplingParams::decode(b"\x81\xaalogit_bias\xdf\xff\xff\xff\xff\x01\x02");
    assert!(truncated(sp.map(drop)));
    let bin = b"\x99\xa0\x90\xc0\xc0\xc0\x00\xc0\xc0\xc6\xff\xff\xff\xff";
    assert!(truncated(EngineCoreOutput::decode(bin).map(drop)));
}

#[test]
fn a_forged_count_reserves_little() {
    // 4 M outputs claimed, 4 MB of frame (each output would be ~200 bytes in memory): the
    // decoder reserves at most 1 MiB up front, then fails on the garbage.
    let mut frame = b"\x95\x00\xdd\x00\x40\x00\x00".to_vec();
    frame.resize(4 << 20, 0xc0);
    LARGEST.with(|m| m.set(0));
    assert!(EngineCoreOutputs::decode(&frame).is_err());
    let largest = LARGEST.with(|m| m.get());
    assert!(largest <= 1 << 20, "reserved {largest} bytes");
}

/// xorshift64*: a tiny seeded generator (no rand crate needed offline).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    const MARKERS: &[u8] = &[
        0x00, 0x7f, 0x80, 0x90, 0xa0, 0xc0, 0xc1, 0xc3, 0xc6, 0xca, 0xcb, 0xcf, 0xd3, 0xd4, 0xdb,
        0xdc, 0xdd, 0xde, 0xdf, 0xff,
    ];
    let mut data = frame.to_vec();
    let at = rng.below(data.len() + 1);
    match rng.below(6) {
        0 if !data.is_empty() => {
            let i = at.min(data.len() - 1);
            data[i] = rng.next() as u8;
        }
        1 => data.truncate(at),
        2 => data.insert(at, MARKERS[rng.below(MARKERS.len())]),
        3 if at < data.len() => {
            data.remove(at);
        }
        4 => data
            .splice(at..at, [0xdd, 0xff, 0xff, 0xff, 0xff])
            .for_each(drop),
        _ if !data.is_empty() => {
            let i = at.min(data.len() - 1);
            data[i] ^= 1 << rng.below(8);
        }
        _ => {}
    }
    data
}

/// Decodes `frame` as T; whatever decodes must re-encode to bytes that decode to the same
/// value and encode to the same bytes again (a stable, canonical form).
fn check<T: Wire + PartialEq + std::fmt::Debug>(frame: &[u8]) -> bool {
    match T::decode(frame) {
        Err(_) => false,
        Ok(value) => {
            let bytes = value.encode();
            let again = T::decode(&bytes).expect("own encoding must decode");
            assert_eq!(again.encode(), bytes);
            true
        }
    }
}

#[test]
fn seeded_mutation_fuzz() {
    let seeds: Vec<Vec<u8>> = vec![
        REQUEST.to_vec(),
        OUTPUTS.to_vec(),
        UTILITY.to_vec(),
        engine_dead_frame(2, "x"),
        DPStats {
            loads: vec![(1, 2)],
            timestamp: 0.5,
        }
        .encode(),
        AbortRequest {
            request_ids: vec!["a".into(), "bc".into()],
        }
        .encode(),
        UtilityRequest {
            call_id: 1,
            method: "kv_cache_status".into(),
            client_index: 1,
        }
        .encode(),
    ];
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut decoded = 0;
    for round in 0..30_000 {
        let mut frame = mutate(&mut rng, &seeds[round % seeds.len()]);
        if rng.below(3) == 0 {
            frame = mutate(&mut rng, &frame);
        }
        let results = [
            check::<EngineCoreRequest>(&frame),
            check::<EngineCoreOutputs>(&frame),
            check::<SamplingParams>(&frame),
            check::<DPStats>(&frame),
            check::<AbortRequest>(&frame),
            check::<UtilityRequest>(&frame),
            check::<EngineReady>(&frame),
            check::<EngineLoad>(&frame),
        ];
        decoded += results.iter().filter(|ok| **ok).count();
        let _ = decode_engine_dead(&frame);
    }
    // The mutations must leave some frames valid, or the re-encode checks proved nothing.
    assert!(decoded > 1000, "only {decoded} mutated frames decoded");
}

/// `cargo test --release -p shoal-wire -- --ignored --nocapture decode_speed`: the cost of one
/// engine step's EngineCoreOutputs (256 running requests, one new token each) on this CPU.
#[test]
#[ignore]
fn decode_speed() {
    let step = EngineCoreOutputs {
        engine_index: 0,
        outputs: (0..256)
            .map(|i| EngineCoreOutput {
                request_id: format!("chatcmpl-{i:032x}"),
                new_token_ids: vec![1000 + i],
                new_logprobs: None,
                finish_reason: None,
                stop_reason: None,
                num_cached_tokens: 0,
                phase_times: None,
                prompt_logprobs: None,
                embedding: Vec::new(),
            })
            .collect(),
        scheduler_stats: Some(SchedulerStats::default()),
        timestamp: 1.0,
        utility_output: None,
    };
    let frame = step.encode();
    let rounds = 2000;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        let decoded = EngineCoreOutputs::decode(std::hint::black_box(&frame)).unwrap();
        std::hint::black_box(decoded);
    }
    let per_step = start.elapsed() / rounds;
    println!(
        "{} bytes, 256 outputs: {per_step:?} per decode",
        frame.len()
    );
}

#[test]
fn sampling_params_check() {
    assert_eq!(SamplingParams::default().check(), Ok(()));
    let top_k = SamplingParams {
        top_k: -1,
        ..Default::default()
    };
    assert_eq!(top_k.check(), Ok(()));
    let nan = SamplingParams {
        temperature: f64::NAN,
        ..Default::default()
    };
    assert_eq!(
        nan.check().unwrap_err(),
        "temperature: must be non-negative"
    );
    let pooling = SamplingParams {
        pooling: Some("mean".into()),
        ..Default::default()
    };
    assert_eq!(
        pooling.check().unwrap_err(),
        "max_tokens: must be 0 for an embedding request"
    );
    let first = SamplingParams {
        n: 0,
        top_p: 2.0,
        ..Default::default()
    };
    assert_eq!(first.check().unwrap_err(), "n: must be at least 1");
}
