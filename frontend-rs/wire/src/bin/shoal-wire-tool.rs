//! shoal-wire-tool: lets Python check shoal-wire against msgspec (tests/native_frontend/
//! test_rust_wire.py). One request after another on stdin, one reply each on stdout:
//!
//! request: [mode: u8] [type: u8] [len: u32 LE] [payload: len bytes]
//!   mode b'D': payload is a msgpack frame: decode it as `type`, re-encode it.
//!   mode b'V': like b'D' for SamplingParams (`type` ignored), then `SamplingParams::check`:
//!              its message is the error reply.
//!   mode b'J': payload is a JSON description (below): turn it into msgpack in the LONGEST
//!              forms (int64/uint64, str32, array32, map32, bin32, float64), decode that as
//!              `type` and encode it: the reply is then Rust's own choice of forms.
//! reply:   [status: u8, 0 ok / 1 error] [len: u32 LE] [re-encoded bytes / UTF-8 error text]
//!
//! `type` is an index into TYPES (`shoal-wire-tool --list-types` prints them, one a line).
//! "EngineDeadFrame" is the whole dead-notice frame (`decode_engine_dead`, then
//! `engine_dead_frame`, or the bare prefix for the old form).
//!
//! JSON description: null, true/false, integers and strings stand for themselves; arrays for
//! msgpack arrays; {"float": "<16 hex digits: the IEEE-754 bits>"} (exact, NaN and inf
//! included); {"bin": "<hex>"}; {"map": [[key, value], ...]} (order kept).
//!
//! Any bad request gets an error reply and the tool reads the next one; it exits 0 at EOF.

use std::io::{self, Read, Write};

use serde_json::Value;
use shoal_wire::*;

/// The message types, by index (the request's `type` byte).
const TYPES: &[&str] = &[
    "EngineCoreRequest",
    "SamplingParams",
    "StructuredOutputsParams",
    "EngineCoreOutputs",
    "EngineCoreOutput",
    "TokenLogprobs",
    "RequestPhaseTimes",
    "SchedulerStats",
    "KVCacheStatus",
    "UtilityRequest",
    "UtilityOutput",
    "EngineDead",
    "EngineReady",
    "AbortRequest",
    "EngineLoad",
    "DPStats",
    "EngineDeadFrame",
];

/// Payloads larger than this are refused (and skipped) rather than buffered.
const MAX_PAYLOAD: u64 = 64 << 20;

fn roundtrip<T: Wire>(frame: &[u8]) -> Result<Vec<u8>, String> {
    T::decode(frame).map(|m| m.encode()).map_err(|e| e.0)
}

/// Decodes `frame` as TYPES[index] and encodes it again.
fn reencode(index: usize, frame: &[u8]) -> Result<Vec<u8>, String> {
    match TYPES.get(index).copied() {
        Some("EngineCoreRequest") => roundtrip::<EngineCoreRequest>(frame),
        Some("SamplingParams") => roundtrip::<SamplingParams>(frame),
        Some("StructuredOutputsParams") => roundtrip::<StructuredOutputsParams>(frame),
        Some("EngineCoreOutputs") => roundtrip::<EngineCoreOutputs>(frame),
        Some("EngineCoreOutput") => roundtrip::<EngineCoreOutput>(frame),
        Some("TokenLogprobs") => roundtrip::<TokenLogprobs>(frame),
        Some("RequestPhaseTimes") => roundtrip::<RequestPhaseTimes>(frame),
        Some("SchedulerStats") => roundtrip::<SchedulerStats>(frame),
        Some("KVCacheStatus") => roundtrip::<KVCacheStatus>(frame),
        Some("UtilityRequest") => roundtrip::<UtilityRequest>(frame),
        Some("UtilityOutput") => roundtrip::<UtilityOutput>(frame),
        Some("EngineDead") => roundtrip::<EngineDead>(frame),
        Some("EngineReady") => roundtrip::<EngineReady>(frame),
        Some("AbortRequest") => roundtrip::<AbortRequest>(frame),
        Some("EngineLoad") => roundtrip::<EngineLoad>(frame),
        Some("DPStats") => roundtrip::<DPStats>(frame),
        Some("EngineDeadFrame") => match decode_engine_dead(frame) {
            Ok(Some(dead)) => Ok(engine_dead_frame(dead.engine_index, &dead.reason)),
            Ok(None) => Ok(ENGINE_CORE_DEAD.to_vec()),
            Err(e) => Err(e.0),
        },
        _ => Err(format!("unknown type index {index}")),
    }
}

fn checked_sampling_params(frame: &[u8]) -> Result<Vec<u8>, String> {
    let params = SamplingParams::decode(frame).map_err(|e| e.0)?;
    params.check()?;
    Ok(params.encode())
}

fn hex(text: &str) -> Result<Vec<u8>, String> {
    if text.len() & 1 == 1 {
        return Err(format!("odd-length hex {text:?}"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| format!("bad hex {text:?}"))
        })
        .collect()
}

/// Writes the JSON description `v` as msgpack in the longest forms.
fn to_msgpack(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::Null => out.push(0xc0),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push(0xcf);
                out.extend_from_slice(&u.to_be_bytes());
            } else if let Some(i) = n.as_i64() {
                out.push(0xd3);
                out.extend_from_slice(&i.to_be_bytes());
            } else {
                return Err(format!(
                    "non-integer JSON number {n}: use {{\"float\": hex}}"
                ));
            }
        }
        Value::String(s) => {
            out.push(0xdb);
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            out.push(0xdd);
            out.extend_from_slice(&(items.len() as u32).to_be_bytes());
            for item in items {
                to_msgpack(item, out)?;
            }
        }
        Value::Object(obj) => match (obj.len(), obj.iter().next()) {
            (1, Some((tag, Value::String(h)))) if tag == "float" => {
                let bits: [u8; 8] = hex(h)?
                    .try_into()
                    .map_err(|_| format!("float needs 16 hex digits: {h}"))?;
                out.push(0xcb);
                out.extend_from_slice(&bits);
            }
            (1, Some((tag, Value::String(h)))) if tag == "bin" => {
                let bytes = hex(h)?;
                out.push(0xc6);
                out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(&bytes);
            }
            (1, Some((tag, Value::Array(pairs)))) if tag == "map" => {
                out.push(0xdf);
                out.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
                for pair in pairs {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([k, v]) => {
                            to_msgpack(k, out)?;
                            to_msgpack(v, out)?;
                        }
                        _ => return Err(format!("map entry is not [key, value]: {pair}")),
                    }
                }
            }
            _ => return Err(format!("unknown JSON description object {v}")),
        },
    }
    Ok(())
}

fn from_json(index: usize, payload: &[u8]) -> Result<Vec<u8>, String> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| format!("bad JSON: {e}"))?;
    let mut frame = Vec::new();
    to_msgpack(&value, &mut frame)?;
    reencode(index, &frame)
}

fn reply(out: &mut impl Write, result: Result<Vec<u8>, String>) -> io::Result<()> {
    let (status, body) = match result {
        Ok(bytes) => (0u8, bytes),
        Err(msg) => (1u8, msg.into_bytes()),
    };
    out.write_all(&[status])?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

fn serve() -> io::Result<()> {
    let mut input = io::stdin().lock();
    let mut output = io::BufWriter::new(io::stdout().lock());
    loop {
        let mut header = [0u8; 6];
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let (mode, index) = (header[0], header[1] as usize);
        let len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as u64;
        if len > MAX_PAYLOAD {
            io::copy(&mut (&mut input).take(len), &mut io::sink())?;
            reply(
                &mut output,
                Err(format!("payload of {len} bytes is over the limit")),
            )?;
            continue;
        }
        let mut payload = vec![0u8; len as usize];
        input.read_exact(&mut payload)?;
        let result = match mode {
            b'D' => reencode(index, &payload),
            b'J' => from_json(index, &payload),
            b'V' => checked_sampling_params(&payload),
            other => Err(format!("unknown mode {other:#04x}")),
        };
        reply(&mut output, result)?;
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--list-types") {
        for name in TYPES {
            println!("{name}");
        }
        return;
    }
    if let Err(e) = serve() {
        eprintln!("shoal-wire-tool: {e}");
        std::process::exit(1);
    }
}
