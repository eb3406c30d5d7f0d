//! The key-value metadata of a GGUF file (version 2 or 3), read up to the tensor index: what
//! shoal/gguf_file.py's `GGUFFile.all_metadata()` returns, without touching tensor data.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// One metadata value. Integers of every width are widened; strings are decoded as UTF-8
/// with U+FFFD for invalid bytes (Python's `errors="replace"`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_int(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// Python truthiness, as `if metadata.get(key)` sees the value.
    pub fn truthy(&self) -> bool {
        match self {
            Value::Int(i) => *i != 0,
            Value::Float(f) => *f != 0.0,
            Value::Bool(b) => *b,
            Value::Str(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
        }
    }
}

const STRING: u32 = 8;
const ARRAY: u32 = 9;

struct Reader<R: Read> {
    inner: R,
    path: String,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("{}: truncated GGUF header ({e})", self.path))?;
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes::<4>()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes::<8>()?))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        // A length past any sane metadata string is a corrupt file, not an allocation.
        if len > (1 << 32) {
            return Err(format!("{}: GGUF string of {len} bytes", self.path));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| format!("{}: truncated GGUF header ({e})", self.path))?;
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
    fn value(&mut self, kind: u32, key: &str) -> Result<Value, String> {
        Ok(match kind {
            0 => Value::Int(self.bytes::<1>()?[0] as i128),
            1 => Value::Int(self.bytes::<1>()?[0] as i8 as i128),
            2 => Value::Int(u16::from_le_bytes(self.bytes::<2>()?) as i128),
            3 => Value::Int(i16::from_le_bytes(self.bytes::<2>()?) as i128),
            4 => Value::Int(self.u32()? as i128),
            5 => Value::Int(i32::from_le_bytes(self.bytes::<4>()?) as i128),
            6 => Value::Float(f32::from_le_bytes(self.bytes::<4>()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            STRING => Value::Str(self.string()?),
            ARRAY => {
                let item = self.u32()?;
                let count = self.u64()?;
                if count > (1 << 32) {
                    return Err(format!("{}: GGUF array of {count} items", self.path));
                }
                let mut items = Vec::with_capacity(count.min(1 << 20) as usize);
                for _ in 0..count {
                    items.push(self.value(item, key)?);
                }
                Value::Array(items)
            }
            10 => Value::Int(self.u64()? as i128),
            11 => Value::Int(i64::from_le_bytes(self.bytes::<8>()?) as i128),
            12 => Value::Float(f64::from_le_bytes(self.bytes::<8>()?)),
            _ => {
                return Err(format!(
                    "{}: unknown GGUF value type {kind} for {key:?}",
                    self.path
                ))
            }
        })
    }
}

/// Every key-value pair of the GGUF file at `path`. `Err` if it is not GGUF (bad magic,
/// version other than 2 or 3) or the header is truncated.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>, String> {
    let shown = format!("{:?}", path.display().to_string());
    let file = File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut r = Reader {
        inner: BufReader::with_capacity(1 << 20, file),
        path: shown.clone(),
    };
    let magic = r
        .bytes::<4>()
        .map_err(|_| format!("{shown} is not a GGUF file (too short)"))?;
    if &magic != b"GGUF" {
        return Err(format!("{shown} is not a GGUF file (bad magic {magic:?})"));
    }
    let version = r.u32()?;
    if version != 2 && version != 3 {
        return Err(format!("{shown}: unsupported GGUF version {version}"));
    }
    let _num_tensors = r.u64()?;
    let num_kv = r.u64()?;
    let mut out = HashMap::new();
    for _ in 0..num_kv {
        let key = r.string()?;
        let kind = r.u32()?;
        let value = r.value(kind, &key)?;
        out.insert(key, value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    #[test]
    fn reads_scalars_strings_and_arrays() {
        let mut buf = b"GGUF".to_vec();
        buf.extend(3u32.to_le_bytes());
        buf.extend(0u64.to_le_bytes());
        buf.extend(3u64.to_le_bytes());
        put_str(&mut buf, "a.u32");
        buf.extend(4u32.to_le_bytes());
        buf.extend(7u32.to_le_bytes());
        put_str(&mut buf, "a.str");
        buf.extend(8u32.to_le_bytes());
        put_str(&mut buf, "héllo");
        put_str(&mut buf, "a.arr");
        buf.extend(9u32.to_le_bytes());
        buf.extend(8u32.to_le_bytes());
        buf.extend(2u64.to_le_bytes());
        put_str(&mut buf, "x");
        buf.extend(1u64.to_le_bytes());
        buf.push(0xff); // invalid UTF-8 -> U+FFFD
        let path = std::env::temp_dir().join(format!("shoal-gguf-test-{}", std::process::id()));
        std::fs::write(&path, &buf).unwrap();
        let meta = read_metadata(&path);
        std::fs::remove_file(&path).unwrap();
        let meta = meta.unwrap();
        assert_eq!(meta["a.u32"], Value::Int(7));
        assert_eq!(meta["a.str"].as_str(), Some("héllo"));
        assert_eq!(
            meta["a.arr"],
            Value::Array(vec![Value::Str("x".into()), Value::Str("\u{fffd}".into())])
        );
    }

    #[test]
    fn rejects_non_gguf() {
        let path = std::env::temp_dir().join(format!("shoal-gguf-bad-{}", std::process::id()));
        std::fs::write(&path, b"NOPE....").unwrap();
        let err = read_metadata(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
